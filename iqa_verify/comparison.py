"""Compare one tensor with its float64 reference under the tolerance rule of :mod:`iqa_verify.tolerances`.

:func:`compare` never raises on a mismatch: it returns a :class:`TensorCheck` that says what differed,
where, by how much, what was allowed and why, so that a property can report *all* failing tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from iqa_verify.tolerances import Kind, Tolerance

__all__ = ["TensorCheck", "compare", "shape_mismatch"]


def _flat64(t: torch.Tensor) -> np.ndarray:
    """A flat float64 numpy copy of ``t`` (any dtype or device)."""
    return t.detach().to("cpu", torch.float64).reshape(-1).numpy()


def _nan_first(x: np.ndarray) -> np.ndarray:
    """x for argmax with NaN above everything and +inf just below it (as ``nan_to_num(x, nan=inf)``: infinite
    values become the largest finite float, so a NaN is found first)."""
    return np.where(np.isnan(x), np.inf, np.where(x == np.inf, np.finfo(np.float64).max, x))


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size if size else 0)
        flat = flat // size if size else 0
    return tuple(reversed(out))


@dataclass(frozen=True)
class TensorCheck:
    """The outcome of comparing one tensor (``path`` such as ``out/o`` or ``grad/dg``) with its reference.

    ratio: max_i err_i / allowed_i (inf where the kernel is non-finite and the reference is not).
    """

    path: str
    passed: bool
    ratio: float
    mismatches: int = 0
    numel: int = 0
    worst_index: tuple[int, ...] = ()
    worst_abs: float = 0.0
    actual_at_worst: float = 0.0
    expected_at_worst: float = 0.0
    allowed_at_worst: float = 0.0
    allowed_terms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    worst_rel: float = 0.0
    worst_rel_index: tuple[int, ...] = ()
    max_abs: float = 0.0
    max_abs_index: tuple[int, ...] = ()
    nonfinite: int = 0
    baseline_err: float | None = None
    tolerance: Tolerance | None = None
    note: str = ""
    natural_at_worst: float = 0.0
    natural_tolerance: Tolerance | None = None

    def describe(self) -> str:
        if self.note and not self.numel:
            return f"{self.path}: {self.note}"
        share = 100.0 * self.mismatches / max(self.numel, 1)
        head = (
            f"{self.path}: {self.mismatches} of {self.numel} elements ({share:.3g}%) outside tolerance;"
            f" worst error ratio {self.ratio:.3g} at {list(self.worst_index)}"
        )
        if self.passed:
            head = f"{self.path}: ok, worst error ratio {self.ratio:.3g} at {list(self.worst_index)}"
        rt, at, bt = self.allowed_terms
        factor = self.tolerance.baseline_factor if self.tolerance else 0.0
        lines = [
            head,
            f"  abs diff {self.worst_abs:.3e} at {list(self.worst_index)}"
            f" (kernel {self.actual_at_worst:.6g}, reference {self.expected_at_worst:.6g});"
            f" allowed there {self.allowed_at_worst:.3e} = rtol*|ref| {rt:.2e} + atol*scale {at:.2e}"
            f" + {factor:g}*baseline {bt:.2e}"
            + (f" + natural scale {self.natural_at_worst:.2e}" if self.natural_tolerance is not None else ""),
            f"  largest abs diff {self.max_abs:.3e} at {list(self.max_abs_index)};"
            f" largest rel diff {self.worst_rel:.3e} at {list(self.worst_rel_index)}",
        ]
        if self.nonfinite:
            lines.append(f"  {self.nonfinite} non-finite kernel values where the reference is finite")
        if self.tolerance is not None:
            lines.append(f"  tolerance: {self.tolerance.describe()}")
        if self.natural_tolerance is not None:
            nat = self.natural_tolerance
            what = ("eps_x * N, N = root-sum-square of the terms whose operands tensor-core products round"
                    if nat.source.startswith(f"tolerances.TABLE[{Kind.OPERAND_ROUNDING.value},") else
                    "eps_acc * N, N = n * sum|terms| the standard algorithms subtract")
            lines.append(f"  natural scale: {what} (rtol={nat.rtol:g} from {nat.source})")
        if self.baseline_err is not None:
            lines.append(f"  baseline (same-dtype PyTorch computation) max abs error {self.baseline_err:.3e}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def shape_mismatch(path: str, actual: torch.Tensor, expected_shape: tuple[int, ...]) -> TensorCheck:
    return TensorCheck(
        path=path,
        passed=False,
        ratio=float("inf"),
        note=f"shape {tuple(actual.shape)} but the contract requires {tuple(expected_shape)}",
    )


def compare(
    path: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: Tolerance,
    *,
    dtype: torch.dtype,
    baseline: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    natural: torch.Tensor | None = None,
    natural_tol: Tolerance | None = None,
) -> TensorCheck:
    """Compare ``actual`` (any dtype/device) with the float64 ``expected`` under ``tol``.

    ``dtype`` is the kernel's compute dtype: reference entries beyond its finite range — or so close
    to it that an allowed error could overflow — are not compared, and its smallest normal number
    floors the scale.
    ``scale`` replaces ``‖expected‖∞`` in the atol term when the natural scale of a tensor is set by
    others (a gradient that is exactly zero in theory is judged against the scale of its siblings,
    not against its own round-off); a tensor of ``expected``'s shape gives each element its own scale
    (componentwise bounds such as Skeel's).
    ``natural`` (same shape, float64) with ``natural_tol``: the natural scale N_i of each element (the size of
    the terms standard algorithms subtract to form it, times their rounding-chain length); adds
    ``natural_tol.rtol * N_i`` to the allowance (see :attr:`~iqa_verify.tolerances.Kind.NATURAL_SCALE`).
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return shape_mismatch(path, actual, tuple(expected.shape))
    # the arithmetic in numpy on float64 copies: the same IEEE operations as torch's (abs, -, +, *, / correctly
    # rounded; argmax the first maximum), at a fraction of the per-call overhead on the small tensors judged here
    a, r = _flat64(actual), _flat64(expected)
    finfo = torch.finfo(dtype)
    tiny, big = float(finfo.tiny), float(finfo.max)
    with np.errstate(all="ignore"):
        comparable = np.isfinite(r) & (np.abs(r) <= big)
        numel = int(comparable.sum())
        if numel == 0:
            return TensorCheck(path=path, passed=True, ratio=0.0, tolerance=tol, note="no comparable elements")
        r_c = np.where(comparable, r, 0.0)
        if scale is None:
            scale = float(np.abs(r_c).max())
        base_err = None
        if baseline is not None:
            b = _flat64(baseline)
            ok = comparable & np.isfinite(b)
            base_err = float(np.abs(b - r)[ok].max()) if bool(ok.any()) else 0.0
        rel_term = tol.rtol * np.abs(r_c)
        if isinstance(scale, torch.Tensor):  # an elementwise scale (componentwise bounds)
            abs_term = tol.atol * np.maximum(_flat64(scale), tiny)
        else:
            abs_term = tol.atol * max(scale, tiny)
        base_term = tol.baseline_factor * (base_err or 0.0)
        allowed = rel_term + abs_term + base_term
        nat_term = np.zeros_like(r)
        if natural is not None and natural_tol is not None:
            nat = _flat64(natural)
            nat_term = natural_tol.rtol * np.where(np.isfinite(nat), nat, 0.0)
            allowed = allowed + nat_term
        # a result the tolerance allows may overflow the dtype when the reference sits within `allowed` of its
        # largest finite number: such entries are not judged (no computation in this dtype can be asked for them)
        comparable = comparable & (np.abs(r_c) + allowed <= big)
        nonfinite_mask = comparable & ~np.isfinite(a)
        err = np.where(comparable, np.abs(a - r), 0.0)
        err = np.where(nonfinite_mask, np.inf, err)
        ratio_all = np.where(comparable, err / allowed, 0.0)
        worst = int(np.argmax(np.where(np.isnan(ratio_all), np.inf, ratio_all)))  # NaN counts as the worst
        ratio = float(ratio_all[worst])
        rel = np.where(comparable & (r_c != 0), err / np.maximum(np.abs(r_c), tiny), 0.0)
        worst_rel = int(np.argmax(_nan_first(rel)))
        largest = int(np.argmax(_nan_first(err)))
        mismatches = int((ratio_all > 1).sum())
    shape = tuple(actual.shape)
    return TensorCheck(
        path=path,
        passed=mismatches == 0,
        ratio=ratio,
        mismatches=mismatches,
        numel=numel,
        worst_index=_index(worst, shape),
        worst_abs=float(err[worst]),
        actual_at_worst=float(a[worst]),
        expected_at_worst=float(r[worst]),
        allowed_at_worst=float(allowed[worst]),
        allowed_terms=(float(rel_term[worst]), float(abs_term[worst]) if isinstance(abs_term, np.ndarray) else abs_term,
                       base_term),
        worst_rel=float(rel[worst_rel]),
        worst_rel_index=_index(worst_rel, shape),
        max_abs=float(err[largest]),
        max_abs_index=_index(largest, shape),
        nonfinite=int(nonfinite_mask.sum()),
        baseline_err=base_err,
        tolerance=tol,
        natural_at_worst=float(nat_term[worst]),
        natural_tolerance=natural_tol if natural is not None else None,
    )
