"""Properties of the inverse forms (SPEC §2): what a least-squares solver of ``la_forward(...)[0] = o`` owes.

Per batch and head the problem is ``vec(O) = A vec(X) + c`` (:func:`iqa_verify.reference.la_inverse.la_linear_map`),
``b = vec(O) - c``, ``x_ref = pinv(A) b`` (float64), ``r = b - A x_ref`` (the part of b no X reaches),
``sigma`` the singular values of A, ``‖|A|‖`` the 2-norm of the map built from the knowns' magnitudes
(what input rounding perturbs A by, per unit eps), ``rank`` its rank (torch's pinv cut-off; for Type1
the exact rule "every q_t·k_t != 0"), ``kappa = ‖|A|‖ / sigma_rank`` and ``kappa_ls`` the same over the
singular values above the float64 cut-off (see :func:`analyse`). All norms are 2-norms per (batch,
head); ``eps``-based allowances come from the tolerance table (:data:`Kind.BACKWARD_ERROR`,
:data:`Kind.FORWARD_ERROR`). The properties:

- ``backward-error``: ``|A^T (A x - b)| <= atol * ‖A‖ (‖|A|‖ ‖x‖ + ‖o‖ + ‖c‖)`` elementwise, whatever the
  conditioning (the normal-equation residual of a backward-stable least-squares solver).
- ``o-roundtrip``: ``la_forward(x)`` equals the consistent part ``A x_ref + c`` of o (o itself when o
  is consistent) within ``atol * (‖|A|‖ max(‖x‖, ‖x_ref‖) + ‖o‖ + ‖c‖ + kappa_ls ‖r‖)``.
- ``unknown-roundtrip``: solving ``o' = la_forward(x_true)`` gives x_true where the unknown is
  identifiable (rank = its size: Type1 all q_t·k_t != 0; Type3 every S_t of full column rank; Type2 the
  map of K of full column rank), else its projection ``pinv(A) A x_true`` onto the row space; within
  ``atol * kappa (‖x_true‖ + (‖o‖ + ‖c‖) / ‖|A|‖)`` where ``kappa eps`` is small (see :func:`forward_checked`).
- ``idempotent``: solving ``la_forward(x)`` again gives x back (x is in the row space), same bound; where the
  system is rank deficient plus ``|P_null| ulp(x)`` elementwise (x's own rounding has a null-space part the
  second solve projects away).
- ``minimum-norm``: x equals the float64 ``pinv(A) b`` within ``atol * (kappa (‖x_ref‖ + (‖o‖ + ‖c‖) /
  ‖|A|‖) + kappa^2 ‖r‖ / ‖|A|‖)`` where ``kappa eps`` is small; where the system is worse conditioned
  only the backward error and the O round trip are demanded.
- ``finite``: never NaN where the float64 reference is finite; not inf either where the reference
  fits the dtype and the size of the answer is determined: the solution where ``kappa eps`` is small
  (forward errors are demanded), its gradients where the gradients property applies. Elsewhere an
  ill-conditioned answer (or the gradient of a pseudo-inverse) may legitimately overflow fp16.
  ``backward-error`` treats an overflowed answer the same way.
- ``gradients``: on full-column-rank systems with ``kappa eps`` small (there the pseudo-inverse is
  smooth), gradients equal those of the float64 dense pinv under the GRAD tolerance and baseline rule,
  its atol scaled up to ``kappa^2 * FORWARD_ERROR atol * ‖ref‖∞`` where that is larger (derivatives of a least-squares
  solution are conditioned like kappa^2), plus the decay gradient's natural scale (``eps (n + kappa) N``, see
  :func:`_dg_natural_scale`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import Case, PropertyContext, Violation
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.generic import reference_forward_backward, require_finite, run_forward_backward, spacing
from iqa_verify.properties.la_forward.natural import dg_natural_scale
from iqa_verify.properties.la_inverse.cases import build_solve_problem
from iqa_verify.reference.la_forward import la_forward_ref
from iqa_verify.reference.la_inverse import LinearMap, Unknown, la_linear_map

__all__ = [
    "DenseSystem",
    "analyse",
    "backward_error_checks",
    "check_backward_error",
    "check_finite",
    "check_gradients",
    "check_idempotent",
    "check_minimum_norm",
    "check_o_roundtrip",
    "check_unknown_roundtrip",
    "forward_checked",
    "forward_error_checks",
]

F64 = torch.float64


def forward_checked(kappa: float, dtype: torch.dtype) -> bool:
    """Forward errors are demanded where ``kappa <= 1 / sqrt(eps)`` of the compute dtype (float32 for
    bf16/fp16): there the nonzero singular values sit far above any solver's rank cut-off (a few
    hundred eps sigma_max), so the pseudo-inverse is continuous and ``kappa * eps`` a meaningful bound."""
    eps = torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps
    return math.isfinite(kappa) and kappa * math.sqrt(eps) <= 1.0


@dataclass(frozen=True)
class DenseSystem:
    """The float64 dense system of one case: map, rhs ``b`` [B, H, T*E], ``x_ref`` [B, T, H, n],
    ``data_norm = ‖vec(O)‖ + ‖c‖`` (what a solver forming b = vec(O) - c rounds), residual norm
    ``r_norm``, ``sigma_max`` = ‖A‖, ``size`` = ‖|A|‖ (the 2-norm of the map built from the knowns'
    magnitudes, see :func:`analyse`), ``rank``, ``kappa`` (forward-error condition number) and
    ``kappa_ls`` (over the singular values above the float64 cut-off), all [B, H], and ``n_cols = T*n``."""

    unknown: Unknown
    lmap: LinearMap
    b: torch.Tensor
    x_ref: torch.Tensor
    data_norm: torch.Tensor
    r_norm: torch.Tensor
    sigma_max: torch.Tensor
    size: torch.Tensor
    rank: torch.Tensor
    kappa: torch.Tensor
    kappa_ls: torch.Tensor
    n_cols: int
    ambiguous: torch.Tensor | None = None
    band: tuple[tuple[float, ...], ...] = ()
    magnitude: torch.Tensor | None = None
    cum_g: torch.Tensor | None = None
    D: int = 0
    # bounds derived from the system alone, computed once however many properties ask (see _skeel)
    derived: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def identifiable(self, bh: tuple[int, int]) -> bool:
        return int(self.rank[bh]) == self.n_cols

    def clear_gap(self, bh: tuple[int, int]) -> bool:
        """The rank is unambiguous: no singular value lies between the float64 noise floor of its block and
        the reference's zero cut-off (see :func:`analyse`, the rank-gap rule)."""
        return self.ambiguous is None or not bool(self.ambiguous[bh])

    def band_values(self, bh: tuple[int, int]) -> str:
        b, h = bh
        vals = self.band[b * self.rank.shape[1] + h] if self.band else ()
        return "[" + ", ".join(f"{v:.2g}" for v in vals) + "]"

    def sized(self, bh: tuple[int, int], dtype: torch.dtype) -> bool:
        """The answer's size is determined at the dtype's precision: forward errors are demanded."""
        return forward_checked(float(self.kappa[bh]), dtype)

    def determined(self, bh: tuple[int, int], dtype: torch.dtype) -> bool:
        """The size of the answer is determined at the dtype's precision: a clear rank gap and kappa small."""
        return self.clear_gap(bh) and self.sized(bh, dtype)

    def smooth(self, bh: tuple[int, int], dtype: torch.dtype) -> bool:
        """Full column rank and sized: the pseudo-inverse is differentiable there (gradients demanded)."""
        return self.identifiable(bh) and self.sized(bh, dtype)

    def describe(self, bh: tuple[int, int]) -> str:
        ident = "identifiable" if self.identifiable(bh) else "not identifiable (minimum-norm answer)"
        return (f"system {tuple(self.lmap.matrix.shape[-2:])} at (b={bh[0]}, h={bh[1]}): rank {int(self.rank[bh])} of"
                f" {self.n_cols} ({ident}), kappa {float(self.kappa[bh]):.3g} (over the nonzero singular values:"
                f" {float(self.kappa_ls[bh]):.3g}), sigma_max {float(self.sigma_max[bh]):.3g}, ‖|A|‖ {float(self.size[bh]):.3g},"
                f" inconsistent part ‖r‖ {float(self.r_norm[bh]):.3g}")


def _unknown(case: Case) -> Unknown:
    return case.spec.unknown


def _float64_inputs(case: Case) -> dict[str, torch.Tensor | None]:
    return {n: (t.detach().to("cpu", F64) if t is not None else None) for n, t in case.inputs.items()}


def _case_system(ctx: PropertyContext) -> DenseSystem:
    """The dense analysis of the case's own system (an SVD per batch-head), once per case: every property judging
    the case reads the same one (it was computed again by each of six)."""
    case = ctx.case
    return ctx.memoized(("la-inverse", "system"),
                        lambda: analyse(_unknown(case), _float64_inputs(case), case.kwargs["scale"]))


def analyse(unknown: Unknown, inputs: dict[str, torch.Tensor | None], scale: float) -> DenseSystem:
    """Dense float64 analysis of the inverse problem with kernel inputs ``inputs`` (contract order).

    Two facts shape what the properties may demand:

    * Input rounding. A kernel forms A from the knowns in its own precision; each entry is off by up to
      ``eps`` times the same entry of ``|A|``-from-magnitudes (the map built from ``|a|, |b|, |S_0|``:
      q_t·k_t carries an error ``eps Σ|q_t[i] k_t[i]|`` however small q_t·k_t is). Condition numbers
      are therefore taken against ``size = ‖|A|‖ >= ‖A‖``, not ``‖A‖`` alone.
    * Rank. The float64 cut-off decides which singular values are zero. For Type1 that decision is
      exact instead: P is triangular, so A is invertible exactly when every ``q_t·k_t != 0`` (the
      issue's identifiability rule), however small its smallest singular value has become by growth
      along the substitution (no-decay triangular systems reach ``sigma_min < 1e-16 sigma_max`` by
      chance). Such a system is identifiable and so ill-conditioned that no forward error is demanded
      (``kappa`` over all singular values); the float64 pinv's rank decision would otherwise demand
      an answer that drops components a backward-stable substitution rightly keeps.
    """
    a, b_, o, g, s0 = inputs.values()
    lmap = la_linear_map(unknown, a, b_, o, g, s0, scale=scale)
    mags = la_linear_map(unknown, a.abs(), b_.abs(), o, g, s0.abs() if s0 is not None else None, scale=abs(scale))
    A = lmap.matrix
    sigma = torch.linalg.svdvals(A)  # [B, H, min(m, n)]
    smax = sigma[..., 0]
    size = torch.maximum(torch.linalg.matrix_norm(mags.matrix, ord=2), smax)
    cut = torch.finfo(F64).eps * max(A.shape[-2:]) * smax
    above_cut = sigma > cut.unsqueeze(-1)
    nonzero = above_cut
    if unknown is Unknown.V:  # exact rule: invertible iff every q_t·k_t != 0
        invertible = ((a * b_).sum(-1) != 0).all(1)  # [B, H]
        nonzero = torch.where(invertible.unsqueeze(-1), torch.ones_like(nonzero), nonzero)
    rank = nonzero.sum(-1)
    ambiguous, band = _rank_band(unknown, A, sigma, cut, lmap.n, lmap.e)

    def kappa_over(mask):
        smin = torch.where(mask, sigma, torch.full_like(sigma, math.inf)).min(-1).values
        return torch.where(mask.any(-1), size / smin, torch.ones_like(smax))

    rhs = lmap.rhs(o)
    x_ref = lmap.solve(o)
    r = rhs - (A @ _vec_unknown(x_ref).unsqueeze(-1)).squeeze(-1)
    data = lmap.offset.norm(dim=-1) + (rhs + lmap.offset).norm(dim=-1)
    return DenseSystem(unknown, lmap, rhs, x_ref, data, r.norm(dim=-1), smax, size, rank,
                       kappa_over(nonzero), kappa_over(above_cut), A.shape[-1], ambiguous, band, mags.matrix,
                       g.to(F64).transpose(1, 2).cumsum(-1), a.shape[-1])


def _rank_band(unknown: Unknown, A: torch.Tensor, sigma: torch.Tensor, cut: torch.Tensor, n: int, e: int):
    """The rank-gap rule (SPEC §5, "numerical rank depends on the precision"): ``ambiguous`` [B, H] is true
    where some singular value lies in the band ``(eps64 * sigma_block, cut]``: above the float64 noise floor
    of the block a solver decomposes (a float64 SVD cannot tell a singular value below ``eps64 * sigma_block``
    from zero, so every solver drops those), yet at or below the reference's cut-off
    ``eps64 * max(m, n) * sigma_max`` (the reference drops it too). A solver that keeps such a value (a per-step
    pseudo-inverse in float64, whose cut is relative to the step's own sigma_max) answers differently along it
    by ``component / sigma``, and both answers are minimum-norm at some precision, so the minimum-norm answer
    is not determined: forward errors are not demanded there, only the backward error and the O round trip.
    Values above the cut but below ``sqrt(eps) ‖|A|‖`` make kappa too large for forward errors anyway
    (:func:`forward_checked`). Blocks: Type3's map is block diagonal (one [E, D] block per step, and a
    per-step solver cuts relative to the step's sigma_max); Type2's is one block; Type1's rank is decided
    by the exact rule (every q_t·k_t != 0), never ambiguous. ``band``: the values in the band, per (b, h)."""
    B, H = A.shape[:2]
    if unknown is Unknown.V:
        return torch.zeros(B, H, dtype=torch.bool), tuple(() for _ in range(B * H))
    if unknown is Unknown.Q:
        T = A.shape[-1] // n
        blocks = torch.stack([A[..., t * e:(t + 1) * e, t * n:(t + 1) * n] for t in range(T)], dim=2)
        sig = torch.linalg.svdvals(blocks)  # [B, H, T, min(E, D)]
        floor = torch.finfo(F64).eps * sig[..., :1]
        sig, floor = sig.flatten(2), floor.expand_as(sig).flatten(2)
    else:
        sig, floor = sigma, torch.finfo(F64).eps * sigma[..., :1].expand_as(sigma)
    inband = (sig > floor) & (sig <= cut.unsqueeze(-1))
    band = tuple(tuple(float(x) for x in sig[b, h][inband[b, h]]) for b in range(B) for h in range(H))
    return inband.any(-1), band


def _vec_unknown(x: torch.Tensor) -> torch.Tensor:
    B, T, H, n = x.shape
    return x.to(F64).transpose(1, 2).reshape(B, H, T * n)


def _bh_list(sys_: DenseSystem) -> list[tuple[int, int]]:
    B, H = sys_.rank.shape
    return [(b, h) for b in range(B) for h in range(H)]


def _solve(ctx: PropertyContext) -> torch.Tensor:
    return _checked_output(ctx, ctx.call())


def _checked_output(ctx: PropertyContext, out: dict[str, torch.Tensor]) -> torch.Tensor:
    name = ctx.family.output_names[0]
    expected = ctx.family.output_contract(ctx.case)[name].shape
    if tuple(out[name].shape) != expected:
        raise Violation(f"out/{name}: shape {tuple(out[name].shape)} but the contract requires {expected}")
    return out[name].detach()


def _with_note(check: TensorCheck, note: str) -> TensorCheck:
    return dataclasses.replace(check, note=(check.note + "; " if check.note else "") + note)


def _per_bh(path: str, actual: torch.Tensor, expected: torch.Tensor, kind: Kind, dtype: torch.dtype,
            scales: dict[tuple[int, int], float | torch.Tensor], notes: dict[tuple[int, int], str]) -> list[TensorCheck]:
    """Compare [B, T, H, n] tensors one (batch, head) at a time, each with its own normwise scale (or [T, n]
    componentwise scales)."""
    tol = tolerance(kind, dtype)
    checks = []
    for (b, h), scale in scales.items():
        c = compare(f"{path}[b={b},h={h}]", actual[b, :, h], expected[b, :, h], tol, dtype=dtype, scale=scale)
        checks.append(_with_note(c, notes[(b, h)]))
    return checks


def _unvec(x: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """[B, H, T*n] -> [B, T, H, n]."""
    B, H, _ = x.shape
    return x.reshape(B, H, T, n).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- checks


def check_backward_error(ctx: PropertyContext) -> None:
    x = _solve(ctx)
    case = ctx.case
    sys_ = _case_system(ctx)
    checks = backward_error_checks(f"out/{_unknown(case).value}", "normal-residual", x, sys_, case.dtype)
    ctx.require(checks, "normal-equation residual A^T(A x - b) too large: x is not a least-squares solution")


def backward_error_checks(out_path: str, path: str, x: torch.Tensor, sys_: DenseSystem,
                          dtype: torch.dtype) -> list[TensorCheck]:
    """The ``backward-error`` judgement of the solution x [B, T, H, n] of ``sys_`` (a Violation for NaN, or inf
    where the answer's size is determined; ``out_path`` names x, ``path`` the residual in the checks)."""
    A = sys_.lmap.matrix
    xv = _vec_unknown(x)
    unjudged = []
    room = 1.0 + tolerance(Kind.FORWARD_ERROR, dtype).rtol
    ref_peak = _vec_unknown(sys_.x_ref).abs().amax(-1)  # [B, H]
    for bh in _bh_list(sys_):
        nan, inf = int(torch.isnan(xv[bh]).sum()), int(torch.isinf(xv[bh]).sum())
        # an answer whose float64 value does not fit the dtype (fp16 tops out at 65504) may only come back as inf
        fits = float(ref_peak[bh]) * room <= torch.finfo(dtype).max
        if nan or (inf and sys_.determined(bh, dtype) and fits):
            raise Violation(f"{out_path} at (b={bh[0]}, h={bh[1]}): {nan} NaN and {inf} inf values; the minimum-norm"
                            " least-squares solution is finite for finite inputs (a pseudo-inverse, not an exact"
                            f" inverse, is needed where the system is singular); {sys_.describe(bh)}")
        if inf:  # an ill-conditioned answer too large for the dtype (fp16): overflow is not judged
            unjudged.append(bh)
    xv = torch.where(torch.isinf(xv), torch.zeros((), dtype=F64), xv)
    resid = (A @ xv.unsqueeze(-1)).squeeze(-1) - sys_.b
    normal = (A.transpose(-1, -2) @ resid.unsqueeze(-1)).squeeze(-1)  # [B, H, T*n]
    T, n = x.shape[1], sys_.lmap.n
    scales, notes = {}, {}
    for bh in _bh_list(sys_):
        if bh in unjudged:
            continue
        smax, size = float(sys_.sigma_max[bh]), float(sys_.size[bh])
        scales[bh] = smax * (size * float(xv[bh].norm()) + float(sys_.data_norm[bh]))
        notes[bh] = f"A^T(A x - b) against 0, scale ‖A‖(‖|A|‖‖x‖+‖o‖+‖c‖) = {scales[bh]:.3g}; {sys_.describe(bh)}"
    checks = _per_bh(path, _unvec(normal, T, n), torch.zeros_like(_unvec(normal, T, n)),
                     Kind.BACKWARD_ERROR, dtype, scales, notes)
    if unjudged:
        checks.append(TensorCheck(path=f"{path}[overflowed]", passed=True, ratio=0.0,
                                  note="not judged: the answer overflowed the dtype on a system too ill-conditioned for"
                                       " its size to be determined (kappa > 1/sqrt(eps)), or whose float64 answer does"
                                       " not fit the dtype, at " +
                                       ", ".join(f"(b={b}, h={h})" for b, h in unjudged)))
    return checks


def check_o_roundtrip(ctx: PropertyContext) -> None:
    x = _solve(ctx)
    case = ctx.case
    sys_ = _case_system(ctx)
    lm = sys_.lmap
    got = lm.apply(x)  # la_forward with the solution, float64
    want = lm.apply(sys_.x_ref)  # the consistent part of o
    scales, notes = {}, {}
    for bh in _bh_list(sys_):
        size, kappa = float(sys_.size[bh]), float(sys_.kappa_ls[bh])
        xn = max(float(_vec_unknown(x)[bh].norm()), float(_vec_unknown(sys_.x_ref)[bh].norm()))
        scales[bh] = size * xn + float(sys_.data_norm[bh]) + kappa * float(sys_.r_norm[bh])
        notes[bh] = (f"la_forward(x) against the consistent part of o, scale ‖|A|‖max(‖x‖,‖x_ref‖)+‖o‖+‖c‖+kappa_ls‖r‖"
                     f" = {scales[bh]:.3g}; {sys_.describe(bh)}")
    checks = _per_bh("o-roundtrip/o", got, want, Kind.BACKWARD_ERROR, case.dtype, scales, notes)
    ctx.require(checks, "la_forward of the solution does not reproduce the consistent part of o")


def _rounding_vec(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round_dtype(o) - o, vectorised per (batch, head): o [B, T, H, E] float64 -> [B, H, T*E]."""
    return _vec_unknown(exact.to(dtype).to(F64) - exact)


def _rounding_norm(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖round_dtype(o) - o‖ per (batch, head): o [B, T, H, E] float64 -> [B, H] (subnormals included)."""
    return (exact.to(dtype).to(F64) - exact).transpose(1, 2).flatten(2).norm(dim=-1)


def _skeel(sys_: DenseSystem, want: torch.Tensor, o_rounding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Componentwise (Skeel) forward-error allowance for Type1, [B, T, H, E] float64, or None for the other unknowns.

    Type1 is a lower-triangular system (``P ⊗ I_E``). Substitution is componentwise backward stable (Higham,
    Accuracy and Stability of Numerical Algorithms, Thm 8.5): the computed x solves ``(A + ΔA) x = b + Δb``
    with ``|ΔA| <= gamma_n |A|``. Forming A and b in the accumulation dtype adds, per entry, the rounding of
    q_t·k_j (D terms, hence ``|A|_mag`` from |q|, |k|) and of the decay ``exp(b_t - b_j)`` from the cumulative
    log-decay ``b = cumsum(g)`` (SPEC §1's stable form; its exponent is off by eps (|b_t| + |b_j|)), and of
    ``c = alpha Q S_0``. So every correct solver that accumulates in a dtype with unit eps_acc satisfies,
    element by element::

        |x - x_ref| <= ulp(|x_ref| + atol z) + COMPONENTWISE.atol * z,
        z = |A^{-1}| ( (n + |b_t| + |b_j|) ⊙ |A|_mag |x_ref| + (n + |b_t|) (|o| + |c|) ),   n = T + D + 3

    (``ulp(|x_ref| + atol z)``: the spacing of the output dtype at the largest value the unrounded answer may take,
    twice the rounding of the answer; at x_ref itself it would be half that where the answer crosses a binade
    boundary, as round trips of answers at a power of two do). A solver that
    loses precision the accumulation dtype keeps (a state carried in bf16: errors of eps_bf16 times the carried
    term at every step) exceeds this element by element, where the normwise ``kappa ‖x‖`` spread over all T·E
    entries does not (issue #14). ``o_rounding`` (round trips): ``want`` is the answer for the unrounded o, so
    ``|A^{-1}| |δo|`` is allowed on top, twice (at T = 1 the answer moves by exactly that much: like the ulp, the
    bound is doubled so a correct solver sits at half of it). Returned as the scale of ``COMPONENTWISE.atol``.
    For the system's own answer (``want`` is ``x_ref``, no rounding of o) it is computed once per system: the
    ``minimum-norm`` check and the gradients' natural scale both ask for it."""
    if sys_.unknown is not Unknown.V or sys_.magnitude is None or sys_.cum_g is None:
        return None
    if want is sys_.x_ref and o_rounding is None:
        key = ("skeel", dtype)
        if key not in sys_.derived:
            sys_.derived[key] = _skeel_bound(sys_, want, None, dtype)
        return sys_.derived[key]
    return _skeel_bound(sys_, want, o_rounding, dtype)


def _skeel_bound(sys_: DenseSystem, want: torch.Tensor, o_rounding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    atol = tolerance(Kind.COMPONENTWISE, dtype).atol
    A, Amag = sys_.lmap.matrix, sys_.magnitude
    T, E = want.shape[1], sys_.lmap.n
    if "|inv|" not in sys_.derived:  # |A^{-1}| of the identifiable blocks, shared by every bound on this system
        full = (sys_.rank == sys_.n_cols)[..., None, None]
        sys_.derived["|inv|"] = torch.linalg.inv(torch.where(full, A, torch.eye(A.shape[-1], dtype=F64))).abs()
    inv_abs = sys_.derived["|inv|"]
    bt = sys_.cum_g.abs().repeat_interleave(E, dim=-1)  # |b_t| per row/column of A: [B, H, T*E]
    n = T + sys_.D + 3
    xw = _vec_unknown(want)
    o_vec = (A @ xw.unsqueeze(-1)).squeeze(-1) + sys_.lmap.offset
    weights = n + bt.unsqueeze(-1) + bt.unsqueeze(-2)
    data = ((weights * Amag) @ xw.abs().unsqueeze(-1)).squeeze(-1) + (n + bt) * (o_vec.abs() + sys_.lmap.offset.abs())
    z = (inv_abs @ data.unsqueeze(-1)).squeeze(-1)
    if o_rounding is not None:
        z = z + 2 * (inv_abs @ o_rounding.abs().unsqueeze(-1)).squeeze(-1) / atol
    # the answer is rounded where it lies, anywhere within its allowance of x_ref: the spacing at the largest value
    # it may take (an answer just across a binade boundary from x_ref is rounded to the coarser spacing)
    return _unvec(z + spacing(_vec_unknown(want).abs() + atol * z, dtype) / atol, T, E)


def _null_projector_abs(sys_: DenseSystem) -> torch.Tensor:
    """``|I - A^+ A|`` per (batch, head), [B, H, n, n] float64: the projector onto the map's null space (the
    reference's rank), elementwise magnitude; computed once per system."""
    if "|P_null|" not in sys_.derived:
        A = sys_.lmap.matrix
        eye = torch.eye(A.shape[-1], dtype=F64)
        sys_.derived["|P_null|"] = (eye - torch.linalg.pinv(A) @ A).abs()
    return sys_.derived["|P_null|"]


def forward_error_checks(path: str, got: torch.Tensor, want: torch.Tensor, sys_: DenseSystem, dtype: torch.dtype,
                          extra: str, kappa2_term: bool, o_rounding: torch.Tensor | None = None,
                          o_delta: torch.Tensor | None = None, want_rounded: bool = False) -> list[TensorCheck]:
    """Forward-error checks per (batch, head). ``o_rounding`` [B, H]: the norm of the perturbation the
    property itself put on o by rounding it to the case dtype (round trips): ``want`` is the answer
    for the unrounded o, so ``‖A^+ δo‖ <= kappa ‖δo‖ / ‖|A|‖`` is allowed on top, twice (the bound is
    attained, and a correct solver should sit at half its allowance). ``o_delta`` [B, H, T*E]: the same
    perturbation elementwise (componentwise Type1 bound). ``want_rounded``: ``want`` is itself an answer the
    kernel rounded to the dtype (``idempotent``), whose rounding r (|r| <= half an ulp of want, elementwise) has,
    where the system is rank deficient, a part ``P_null r`` in the null space that the second solve rightly
    projects away; ``|P_null| ulp(want)`` is allowed on top there (twice the bound, as above)."""
    scales, notes, skipped = {}, {}, []
    atol = tolerance(Kind.FORWARD_ERROR, dtype).atol
    ambiguous = []
    skeel = _skeel(sys_, want, o_delta, dtype)
    null_part = None
    if want_rounded and any(not sys_.identifiable(bh) for bh in _bh_list(sys_)):
        ulp_want = spacing(_vec_unknown(want).abs(), dtype)
        null_part = _unvec((_null_projector_abs(sys_) @ ulp_want.unsqueeze(-1)).squeeze(-1), want.shape[1], sys_.lmap.n)
    comp_checks, comp_notes = {}, {}
    for bh in _bh_list(sys_):
        kappa = float(sys_.kappa[bh])
        if not sys_.clear_gap(bh):
            ambiguous.append(f"(b={bh[0]}, h={bh[1]}) singular values {sys_.band_values(bh)}")
            continue
        if not sys_.sized(bh, dtype):
            skipped.append(f"(b={bh[0]}, h={bh[1]}) kappa {kappa:.3g}")
            continue
        size = max(float(sys_.size[bh]), 1e-300)
        scale = kappa * (float(_vec_unknown(want)[bh].norm()) + float(sys_.data_norm[bh]) / size)
        if kappa2_term:
            scale += kappa * kappa * float(sys_.r_norm[bh]) / size
        terms = ' + kappa^2 ‖r‖/‖|A|‖' if kappa2_term else ''
        if o_rounding is not None:
            # the property's own perturbation of o moves the answer by up to kappa ‖δo‖ / ‖|A|‖, a bound that is
            # attained (one step, one unknown): allowed twice, so a correct solver sits at half of it
            scale += 2 * kappa * float(o_rounding[bh]) / size / atol
            terms += f' + 2 kappa ‖δo‖/‖|A|‖/atol (o rounded to the dtype, ‖δo‖ = {float(o_rounding[bh]):.3g})'
        if skeel is not None and sys_.identifiable(bh):
            # the float64 reference is itself only normwise accurate (pinv: 1024 eps64 kappa (‖x‖ + ...)); that is
            # negligible beside eps32 bounds but not beside a float64 kernel's componentwise bound
            ref_err = tolerance(Kind.FORWARD_ERROR, F64).atol * kappa * (
                float(_vec_unknown(want)[bh].norm()) + float(sys_.data_norm[bh]) / size)
            comp_checks[bh] = skeel[bh[0], :, bh[1]] + ref_err / tolerance(Kind.COMPONENTWISE, dtype).atol
            comp_notes[bh] = (f"{extra}; allowed elementwise ulp(|x_ref| + atol z) + atol * z, z = |A^-1|((n + |b_t| + |b_j|)"
                              f" |A|_mag |x_ref| + (n + |b_t|)(|o| + |c|)){' + 2|A^-1||δo|/atol' if o_delta is not None else ''}"
                              f" + the float64 reference's own error {ref_err:.2g}/atol"
                              f" (Skeel's componentwise bound for a triangular solve in the accumulation dtype),"
                              f" max scale {float(comp_checks[bh].max()):.3g}; {sys_.describe(bh)}")
            continue
        notes[bh] = f"{extra}; allowed rtol |x_ref| + atol * scale, scale = kappa (‖x_ref‖ + (‖o‖+‖c‖)/‖|A|‖){terms} = {scale:.3g}"
        if null_part is not None and not sys_.identifiable(bh):
            extra_scale = null_part[bh[0], :, bh[1]] / atol
            scale = scale + extra_scale
            notes[bh] += (f" + |P_null| ulp(x)/atol elementwise (the null-space part of the first answer's rounding,"
                          f" which the second solve projects away; max {float(extra_scale.max()):.3g})")
        scales[bh] = scale
        notes[bh] += f"; {sys_.describe(bh)}"
    checks = _per_bh(path, got, want, Kind.FORWARD_ERROR, dtype, scales, notes)
    checks += _per_bh(path, got, want, Kind.COMPONENTWISE, dtype, comp_checks, comp_notes)
    if ambiguous:
        checks.append(TensorCheck(
            path=f"{path}[rank ambiguous]", passed=True, ratio=0.0,
            note="forward error not demanded, judged by backward-error and o-roundtrip only (rank-gap rule: singular"
                 " values between the float64 noise floor eps*sigma_block and the reference's zero cut-off, so whether"
                 " they are zero depends on the precision and the minimum-norm answer is ambiguous) for "
                 + ", ".join(ambiguous)))
    if skipped:
        checks.append(TensorCheck(path=f"{path}[too ill-conditioned]", passed=True, ratio=0.0,
                                  note="forward error not demanded (kappa > 1/sqrt(eps)) for " + ", ".join(skipped)))
    return checks


def check_minimum_norm(ctx: PropertyContext) -> None:
    x = _solve(ctx)
    case = ctx.case
    sys_ = _case_system(ctx)
    u = _unknown(case).value
    checks = forward_error_checks(f"out/{u}", x, sys_.x_ref, sys_, case.dtype,
                                   "kernel against the float64 minimum-norm solution pinv(A) b", True)
    ctx.require(checks, "the solution is not the minimum-norm least-squares solution (float64 pinv(A) b)")


def _solve_for(ctx: PropertyContext, o: torch.Tensor) -> torch.Tensor:
    """Call the kernel on the case's knowns with ``o`` replaced (o [B, T, H, E] float64)."""
    inputs = dict(ctx.case.inputs)
    inputs["o"] = o.to(device=ctx.case.device, dtype=ctx.case.dtype)
    return _checked_output(ctx, ctx.call(inputs))


def check_unknown_roundtrip(ctx: PropertyContext) -> None:
    case = ctx.case
    u = _unknown(case)
    problem = build_solve_problem(case.spec, case.dtype)
    fwd = problem.forward_inputs
    exact = la_forward_ref(fwd["q"], fwd["k"], fwd["v"], fwd["g"], fwd["initial_state"], scale=case.kwargs["scale"])[0]
    o = exact.to(case.dtype).to(F64)
    x = _solve_for(ctx, o)
    inputs = {**_float64_inputs(case), "o": o}
    sys_ = analyse(u, inputs, case.kwargs["scale"])
    A = sys_.lmap.matrix
    xt = _vec_unknown(problem.x_true)
    projected = (torch.linalg.pinv(A) @ (A @ xt.unsqueeze(-1))).squeeze(-1)
    want = _unvec(projected, x.shape[1], sys_.lmap.n)
    checks = forward_error_checks(f"roundtrip/{u.value}", x, want, sys_, case.dtype,
                                   "solve(la_forward(x_true)) against x_true (its row-space projection where"
                                   " not identifiable)", False, _rounding_norm(exact, case.dtype),
                                   _rounding_vec(exact, case.dtype))
    ctx.require(checks, "solving la_forward(x_true) does not give x_true back (or its projection)")


def check_idempotent(ctx: PropertyContext) -> None:
    case = ctx.case
    u = _unknown(case)
    x1 = _solve(ctx)
    inputs = _float64_inputs(case)
    sys_ = _case_system(ctx)
    exact = sys_.lmap.apply(x1)
    o2 = exact.to(case.dtype).to(F64)
    x2 = _solve_for(ctx, o2)
    sys2 = analyse(u, {**inputs, "o": o2}, case.kwargs["scale"])
    checks = forward_error_checks(f"idempotent/{u.value}", x2, x1.to(F64), sys2, case.dtype,
                                   "solve(la_forward(x)) against x, x the first solution", False,
                                   _rounding_norm(exact, case.dtype), _rounding_vec(exact, case.dtype),
                                   want_rounded=True)
    ctx.require(checks, "solving la_forward(x) for the kernel's own solution x does not give x back")


def check_gradients(ctx: PropertyContext) -> None:
    case = ctx.case
    sys_ = _case_system(ctx)
    if not all(sys_.smooth(bh, case.dtype) for bh in _bh_list(sys_)):
        ctx.record([TensorCheck(path="grad/*", passed=True, ratio=0.0,
                                note="not demanded: the system is rank deficient or ill-conditioned in some (batch,"
                                     " head), where the pseudo-inverse is not smooth")])
        return
    ref, cots = reference_forward_backward(ctx)
    got = run_forward_backward(ctx, cots)
    base = _baseline_grads(ctx, cots)
    tol = tolerance(Kind.GRAD, case.dtype)
    kappa = float(sys_.kappa.max())
    # derivatives of a least-squares solution are conditioned like kappa^2: allow kappa^2 * FORWARD_ERROR atol
    widen = max(1.0, kappa * kappa * tolerance(Kind.FORWARD_ERROR, case.dtype).atol / tol.atol)
    w = ref.grads.get("o")
    natural = merge_natural({"g": _dg_natural_scale(case, sys_, w, kappa)},
                            solution_rounding_natural(sys_, _float64_inputs(case), w, case.kwargs["scale"], case.dtype))
    nat_tol = tolerance(Kind.NATURAL_SCALE, case.dtype)
    checks = []
    for n, r in ref.grads.items():
        r = r if r is not None else torch.zeros_like(case.inputs[n], dtype=F64)
        g = got.grads[n]
        if g is None:
            g = torch.zeros_like(r)
        c = compare(f"grad/d{n}", g, r, tol, dtype=case.dtype, baseline=base.get(n),
                    scale=widen * float(r.abs().max()), natural=natural.get(n), natural_tol=nat_tol)
        checks.append(_with_note(c, f"atol x scale with scale = max(1, kappa^2 atol_fwd / atol) ‖ref‖∞, kappa {kappa:.3g}"))
    ctx.require(checks, "gradients differ from those of the float64 dense pseudo-inverse")


def solution_rounding_natural(sys_: DenseSystem, inputs: dict[str, torch.Tensor | None], w: torch.Tensor | None,
                              scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Natural scales of Type1's q, k, g gradients from the error of the solution itself (SPEC §5).

    The gradients are ``-(∂ la_forward / ∂θ)^T w`` at the solution x, bilinear in (x, w), so an error δx of the
    solution moves them by the same vjp taken at δx. A correct solver's δx is bounded element by element by
    Skeel's bound (:func:`_skeel`: ``|A^{-1}|`` times the rounding of A, of the carried terms and of the right-hand
    side ``o/scale - c``), which is large where that right-hand side cancels: a one-step sequence with S_0 whose
    ``o/scale - exp(g) S_0^T q`` is 1e5 times below its terms (calibration seed 12, float32: every such solver's dk
    1.3 % off, a single same-precision baseline run off by 14 times less by chance). The bound on the gradients'
    error is that vjp on magnitudes, ``|∂F/∂θ|^T |w|`` at ``|δx|`` with |q|, |k| (every term non-negative, so no
    cancellation hides in it), returned as the scale N of ``NATURAL_SCALE`` (``eps_acc N``). Empty for the other
    unknowns (no componentwise bound) or without a cotangent."""
    z = _skeel(sys_, sys_.x_ref, None, dtype) if w is not None else None
    if z is None:
        return {}
    dx = z * (tolerance(Kind.COMPONENTWISE, dtype).atol / tolerance(Kind.NATURAL_SCALE, dtype).rtol)
    q, k, g = (inputs[n].detach().to("cpu", F64) for n in ("q", "k", "g"))
    leaves = [q.abs().requires_grad_(), k.abs().requires_grad_(), g.clone().requires_grad_()]
    with torch.enable_grad():
        o = la_forward_ref(*leaves[:2], dx, leaves[2], None, scale=abs(scale))[0]
        grads = torch.autograd.grad(o, leaves, w.detach().to("cpu", F64).abs())
    return {n: t.abs() for n, t in zip(("q", "k", "g"), grads)}


def merge_natural(*scales: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Natural scales by input name, summed where several sources give one (each is a bound of its own error)."""
    out: dict[str, torch.Tensor] = {}
    for d in scales:
        for n, t in d.items():
            if t is not None:
                out[n] = out[n] + t if n in out else t
    return out


def _dg_natural_scale(case: Case, sys_: DenseSystem, w: torch.Tensor | None, kappa: float) -> torch.Tensor | None:
    """Natural scale of the decay gradient of a solve (SPEC §5). With x the solution and ``w = dL/do`` the
    adjoint (``A^{+T} dL/dx``), ``dL/dg = -(∂ la_forward / ∂g)^T w`` at x: the forward's decay gradient with
    cotangent w, which standard kernels form as a difference of larger terms (a triangular solve through
    ``exp(G_t - G_s)``, or the GLA identity; see :mod:`iqa_verify.properties.la_forward.natural`). Its rounding is
    ``gamma_n N``; the solve adds relative errors of ``kappa eps`` to x and w, hence ``(n + kappa) N``."""
    if w is None or case.inputs.get("g") is None:
        return None
    x = {n: t for n, t in _float64_inputs(case).items()}
    a, b, _, g, s0 = x.values()
    sol = sys_.x_ref
    q, k, v = {Unknown.V: (a, b, sol), Unknown.K: (a, sol, b), Unknown.Q: (sol, a, b)}[_unknown(case)]
    return dg_natural_scale(q, k, v, g, s0, w, None, scale=case.kwargs["scale"], extra=kappa)


def _baseline_grads(ctx: PropertyContext, cots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    case, fam = ctx.case, ctx.family
    inputs = {n: (t.detach() if t is not None else None) for n, t in case.inputs.items()}
    leaves = {n: inputs[n].requires_grad_() for n in fam.differentiable(case)}
    with torch.enable_grad():
        outs = fam.baseline(inputs, case.kwargs)
        names = list(cots)
        grads = torch.autograd.grad([outs[n] for n in names], list(leaves.values()),
                                    [cots[n].to(outs[n].dtype) for n in names], allow_unused=True)
    return dict(zip(leaves, grads))



def check_finite(ctx: PropertyContext) -> None:
    case = ctx.case
    sys_ = _case_system(ctx)
    sized = all(sys_.determined(bh, case.dtype) for bh in _bh_list(sys_))
    smooth = sized and all(sys_.identifiable(bh) for bh in _bh_list(sys_))
    why = "" if smooth else (" (overflow of gradients not judged: the system is rank deficient or ill-conditioned"
                             + ("" if sized else "; nor of the solution: kappa > 1/sqrt(eps)") + ")")
    require_finite(ctx, output_kind=Kind.FORWARD_ERROR, judge_output_overflow=sized, judge_grad_overflow=smooth,
                   why=why)
