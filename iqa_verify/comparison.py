"""Compare one tensor with its float64 reference under the tolerance rule of :mod:`iqa_verify.tolerances`.

:func:`compare` never raises on a mismatch: it returns a :class:`TensorCheck` that says what differed,
where, by how much, what was allowed and why, so that a property can report *all* failing tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iqa_verify.tolerances import Tolerance

__all__ = ["TensorCheck", "compare", "shape_mismatch"]


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
            lines.append(f"  natural scale: eps_acc * N, N = n * sum|terms| the standard algorithms subtract"
                         f" (rtol={self.natural_tolerance.rtol:g} from {self.natural_tolerance.source})")
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
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    r = expected.detach().to("cpu", torch.float64).reshape(-1)
    finfo = torch.finfo(dtype)
    comparable = torch.isfinite(r) & (r.abs() <= finfo.max)
    numel = int(comparable.sum())
    if numel == 0:
        return TensorCheck(path=path, passed=True, ratio=0.0, tolerance=tol, note="no comparable elements")
    r_c = torch.where(comparable, r, torch.zeros_like(r))
    if scale is None:
        scale = float(r_c.abs().max())
    base_err = None
    if baseline is not None:
        b = baseline.detach().to("cpu", torch.float64).reshape(-1)
        ok = comparable & torch.isfinite(b)
        base_err = float((b - r).abs()[ok].max()) if bool(ok.any()) else 0.0
    rel_term = tol.rtol * r_c.abs()
    if isinstance(scale, torch.Tensor):  # an elementwise scale (componentwise bounds)
        abs_term = tol.atol * scale.detach().to("cpu", torch.float64).reshape(-1).clamp_min(finfo.tiny)
    else:
        abs_term = tol.atol * max(scale, finfo.tiny)
    base_term = tol.baseline_factor * (base_err or 0.0)
    allowed = rel_term + abs_term + base_term
    nat_term = torch.zeros_like(r)
    if natural is not None and natural_tol is not None:
        nat = natural.detach().to("cpu", torch.float64).reshape(-1)
        nat_term = natural_tol.rtol * torch.where(torch.isfinite(nat), nat, torch.zeros_like(nat))
        allowed = allowed + nat_term
    # a result the tolerance allows may overflow the dtype when the reference sits within `allowed` of its
    # largest finite number: such entries are not judged (no computation in this dtype can be asked for them)
    comparable = comparable & (r_c.abs() + allowed <= finfo.max)
    nonfinite_mask = comparable & ~torch.isfinite(a)
    err = torch.where(comparable, (a - r).abs(), torch.zeros_like(r))
    err = torch.where(nonfinite_mask, torch.full_like(err, float("inf")), err)
    ratio_all = torch.where(comparable, err / allowed, torch.zeros_like(err))
    worst = int(torch.argmax(torch.nan_to_num(ratio_all, nan=float("inf"), posinf=float("inf"))))
    ratio = float(ratio_all[worst])
    rel = torch.where(comparable & (r_c != 0), err / r_c.abs().clamp_min(finfo.tiny), torch.zeros_like(err))
    worst_rel = int(torch.argmax(torch.nan_to_num(rel, nan=float("inf"))))
    largest = int(torch.argmax(torch.nan_to_num(err, nan=float("inf"))))
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
        allowed_terms=(float(rel_term[worst]), float(abs_term[worst]) if isinstance(abs_term, torch.Tensor) else abs_term,
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
