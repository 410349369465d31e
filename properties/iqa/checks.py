"""The ``iqa``-specific properties (ids ``iqa/<name>``); the shared ones come from :mod:`iqa_verify.properties.generic`.

- ``fixed-point``: the output is a fixed point of the float64 map: ``f(y) - y`` is within the RESIDUAL
  tolerance of zero (plus the residual that rounding the exact fixed point to the dtype costs).
- ``values``: the output equals the reference fixed point (:mod:`iqa_verify.properties.iqa.judging`): the consensus
  ``1·mean(V)^T`` in the contractive regime, else the float64 fixed point refined from the output.
- ``convex-combination``: every output row is a convex combination of the values (softmax rows sum to 1).
- ``gradients``: gradients in x, w_q, w_k, w_v equal the float64 implicit gradient at that fixed point
  (or, for a kernel that declares an approximate backward, the reference of that approximation), with
  the baseline rule applied to backprop through plain iteration in the same precision (where that cannot reach
  the fixed point, to the implicit gradient solved directly in the same precision there); a failure says
  which known wrong gradient the kernel matches (one-step, truncated, untransposed adjoint).
- ``gradient-gap``: for declared approximations, the relative distance to the implicit gradient (never fails).
- ``convergence-honesty``: a reported "converged" means the recomputed residual is within the stated tol.
- ``finite``: output and gradients are finite (the fixed point is an average of finite values).
"""

from __future__ import annotations

import dataclasses

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.contracts import state_dtype_for
from iqa_verify.family import Property, PropertyContext, Violation, digest
from iqa_verify.iqa_claims import GradientClaim, OneStep, Truncated
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.generic import (
    ForwardBackward,
    HonestRefusal,
    cotangents_for,
    run_forward_backward,
    spacing,
    tolerating,
)
from iqa_verify.properties.iqa.cases import Regime
from iqa_verify.properties.iqa.judging import (
    GROUPS,
    RefPoint,
    inputs64,
    ref_point,
    reference_grads,
    values_of,
)
from iqa_verify.properties.iqa.kernels import claims, forward_stats, has_stats
from iqa_verify.reference.iqa import (
    iqa_implicit_grad_baseline,
    iqa_jacobian_y_ref,
    iqa_map_baseline,
    iqa_map_ref,
    iqa_plain_iteration_baseline,
)

__all__ = ["iqa_properties", "note"]

F64 = torch.float64


def note(ctx: PropertyContext, path: str, text: str) -> None:
    """Record a passing check that says what was (not) checked, so a pass is never silent."""
    ctx.record([TensorCheck(path=path, passed=True, ratio=0.0, note=text)])


def _output(ctx: PropertyContext) -> torch.Tensor:
    with torch.no_grad():
        return ctx.call()["y"]


def _map64(ctx: PropertyContext, y: torch.Tensor) -> torch.Tensor:
    i = inputs64(ctx.case)
    return iqa_map_ref(y.detach().to(F64), i["x"], i["w_q"], i["w_k"], i["w_v"], scale=ctx.case.kwargs.get("scale"))


def _value_scale(ctx: PropertyContext, y_star: torch.Tensor | None) -> float:
    """Errors of a fixed point (an average of the values) are judged relative to max(|y*|, |V|)."""
    v = float(values_of(ctx.case).abs().max())
    return max(v, float(y_star.abs().max()) if y_star is not None else 0.0)


def _rounded(ctx: PropertyContext, y_star: torch.Tensor) -> torch.Tensor:
    return y_star.to(device=ctx.case.device, dtype=ctx.case.dtype)


def _baseline_value(ctx: PropertyContext, y_star: torch.Tensor) -> torch.Tensor:
    """A same-precision evaluation at the exact fixed point: y* rounded to the dtype, one application of
    f in the compute dtype (float32 for bf16/fp16), rounded back: what the dtype alone costs here."""
    case = ctx.case
    cd = state_dtype_for(case.dtype)
    i = {n: (t.detach().to(cd) if t is not None else None) for n, t in case.inputs.items()}
    scale = case.kwargs.get("scale")
    s = i["w_k"].shape[1] ** -0.5 if scale is None else float(scale)
    k = i["x"] @ i["w_k"]
    v = i["x"] @ i["w_v"] if i["w_v"] is not None else i["x"]
    y = _rounded(ctx, y_star).to(cd)
    p = torch.softmax(s * (k @ (y @ i["w_q"]).transpose(-1, -2)), dim=-1)
    return (p @ v).to(case.dtype)


def _require_point(ctx: PropertyContext, rp: RefPoint, what: str) -> bool:
    """False (with a note) when the reference could not converge in the HARD regime; raises elsewhere."""
    if rp.y is not None:
        return True
    if ctx.case.spec.kind is Regime.HARD:
        note(ctx, "reference", f"not judged: {rp.how} (hard regime: only honesty properties apply)")
        return False
    raise Violation(f"{what}: the output is not near any fixed point of the float64 map ({rp.how})")


# ---------------------------------------------------------------------------------------------- checks


def _rounding_residual(ctx: PropertyContext, y_star: torch.Tensor) -> torch.Tensor:
    """``|I - ∂f/∂y| ulp(y*)`` elementwise ([B, N, E], float64): the residual ``f(y) - y`` a point one ulp of the
    output dtype from the exact fixed point y* (in each entry, either side) may have, to first order. A correct
    kernel computes y* in a wider dtype and rounds it: every entry within half an ulp (allowed twice, as for
    ``convex-combination``), whose effect on the residual the map's Jacobian amplifies. Without it every correct
    bf16 kernel sat at 0.89 of the allowance on a non-contractive ci case (calibration seed 3; issue #14's
    headroom), where rounding y* itself to bf16 happened to cancel better than a float32 solve rounded."""
    i = inputs64(ctx.case)
    B, N, E = y_star.shape
    jac = iqa_jacobian_y_ref(y_star, i["x"], i["w_q"], i["w_k"], i["w_v"], scale=ctx.case.kwargs.get("scale"))
    amplify = (torch.eye(N * E, dtype=F64) - jac).abs()
    return (amplify @ spacing(y_star.to(F64), ctx.case.dtype).reshape(B, N * E, 1)).reshape(B, N, E)


def _ref_point(ctx: PropertyContext, y: torch.Tensor) -> RefPoint:
    """:func:`ref_point` for the kernel's output ``y`` (a float64 Newton solve), once per case and output: the
    fixed-point, values, gradients and gradient-gap properties all judge at it."""
    return ctx.memoized(("iqa/ref-point", digest({"y": y})), lambda: ref_point(ctx.case, y))


def _fixed_point(ctx: PropertyContext) -> None:
    y = _output(ctx)
    dtype = ctx.case.dtype
    resid = _map64(ctx, y) - y.detach().to(F64)
    rp = _ref_point(ctx, y) if bool(torch.isfinite(y).all()) else RefPoint(None, "non-finite output", False)
    base = None if rp.y is None else _map64(ctx, _rounded(ctx, rp.y)) - _rounded(ctx, rp.y).to(F64)
    tol, scale = tolerance(Kind.RESIDUAL, dtype), _value_scale(ctx, None)
    if rp.y is not None:  # the output's own rounding, amplified by the map (see _rounding_residual)
        scale = scale + _rounding_residual(ctx, rp.y) / tol.atol
    check = compare("residual/f(y)-y", resid, torch.zeros_like(resid), tol, dtype=dtype, baseline=base, scale=scale)
    ctx.require([check], "the output is not a fixed point y = f(y) of the float64 map")


def _values(ctx: PropertyContext) -> None:
    y = _output(ctx)
    rp = _ref_point(ctx, y)
    if not _require_point(ctx, rp, "values"):
        return
    dtype = ctx.case.dtype
    check = compare("out/y", y, rp.y, tolerance(Kind.VALUE, dtype), dtype=dtype,
                    baseline=_baseline_value(ctx, rp.y), scale=_value_scale(ctx, rp.y))
    ctx.require([check], f"values differ from {rp.how}")


def _convex_combination(ctx: PropertyContext) -> None:
    """Allowed outside the hull, elementwise: ``ulp(max(|lo|, |hi|))`` in the output dtype (rounding the answer
    to the dtype moves a point of the hull by up to half of it, round-to-nearest being monotonic: allowed twice,
    as the componentwise bound of la-solve-v does) plus the VALUE atol times the values' scale (the solver's
    own slack: extrapolating methods such as Anderson mix iterates with weights that may be negative). Without
    the first term every correct bf16 kernel, float64 solvers included, sat at up to 0.65 of the allowance (its
    output's rounding alone; issue #14's headroom)."""
    y = _output(ctx).detach().to(F64)
    v = values_of(ctx.case)
    lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
    outside = torch.clamp(y - hi, min=0) + torch.clamp(lo - y, min=0)
    dtype = ctx.case.dtype
    tol, scale = tolerance(Kind.VALUE, dtype), _value_scale(ctx, None)
    rounding = spacing(torch.maximum(lo.abs(), hi.abs()), dtype).expand_as(outside)
    check = compare("out/y outside [min_j V, max_j V]", outside, torch.zeros_like(outside), tol,
                    dtype=dtype, scale=scale + rounding / tol.atol)
    ctx.require([check], "output rows are not convex combinations of the values (softmax rows must sum to 1 over"
                         " the tokens j: check the softmax axis and the orientation K Q^T)")


def _kernel_grads(ctx: PropertyContext) -> tuple[ForwardBackward, torch.Tensor]:
    shape = (ctx.case.spec.B, ctx.case.spec.N, ctx.case.spec.E_eff)
    cots = cotangents_for(ctx.case, {"y": torch.zeros(shape)})
    return run_forward_backward(ctx, cots), cots["y"]


def _baseline_grads(ctx: PropertyContext, g: torch.Tensor, rp: RefPoint,
                    mode: GradientClaim | None = None) -> dict[str, torch.Tensor] | None:
    """The straightforward same-precision gradient whose error the baseline rule allows a multiple of.

    Exact kernels: backprop through plain iteration from V in the compute dtype, run to the solver's
    default tolerance (seeds/002; error: truncation ~ k rho^k plus rounding); where that does not converge to
    the judged fixed point (a repelling one, found as a near false alarm: the Anderson built-in at 0.98 on ci
    seed 7, float32, Jacobian eigenvalue 1.38, kappa(I - J) = 55), the implicit gradient solved directly in the
    compute dtype at the fixed point (:func:`iqa_implicit_grad_baseline`): the rounding of the map's
    derivatives amplified by kappa(I - J), which a correct kernel's adjoint cannot avoid either. A declared
    OneStep/Truncated(k): backprop through k applications of f from a same-precision plain-iteration solve
    (else y* rounded): the truncated series amplifies
    the solver error of y* by ~‖∂f/∂y‖^k where f does not contract, for the kernel and baseline alike."""
    case = ctx.case
    if mode is not None and not mode.exact:
        return _baseline_truncated(ctx, g, rp, mode.k if isinstance(mode, Truncated) else 1)
    cd = state_dtype_for(case.dtype)
    leaves = {n: t.detach().to(cd).requires_grad_(True) for n, t in case.inputs.items() if t is not None}
    scale = case.kwargs.get("scale")
    s = leaves["w_k"].shape[1] ** -0.5 if scale is None else float(scale)
    with torch.enable_grad():
        k = leaves["x"] @ leaves["w_k"]
        v = leaves["x"] @ leaves["w_v"] if "w_v" in leaves else leaves["x"]
        y, converged = iqa_plain_iteration_baseline(lambda y: iqa_map_baseline(y, k, v, leaves["w_q"], s), v)
        near = float((y.detach().to(F64) - rp.y).abs().max()) <= tolerance(Kind.VALUE, cd).atol * _value_scale(ctx, rp.y)
        if converged and near:
            grads = torch.autograd.grad(y, list(leaves.values()), g.to(cd), allow_unused=True)
        else:  # the judged fixed point repels plain iteration (or another attracts it): a direct solve there
            try:
                grads = iqa_implicit_grad_baseline(rp.y.to(cd), lambda y: iqa_map_baseline(y, k, v, leaves["w_q"], s),
                                                   list(leaves.values()), g)
            except torch.linalg.LinAlgError:  # I - ∂f/∂y singular in the compute dtype: no baseline to offer
                return None
    return {n: (gr if gr is not None else torch.zeros_like(leaves[n])).to(case.dtype) for n, gr in zip(leaves, grads)}


def _baseline_truncated(ctx: PropertyContext, g: torch.Tensor, rp: RefPoint, steps: int) -> dict[str, torch.Tensor]:
    case = ctx.case
    cd = state_dtype_for(case.dtype)
    leaves = {n: t.detach().to(cd).requires_grad_(True) for n, t in case.inputs.items() if t is not None}
    scale = case.kwargs.get("scale")
    s = leaves["w_k"].shape[1] ** -0.5 if scale is None else float(scale)
    with torch.enable_grad():
        k = leaves["x"] @ leaves["w_k"]
        v = leaves["x"] @ leaves["w_v"] if "w_v" in leaves else leaves["x"]
        fn = lambda y: iqa_map_baseline(y, k.detach(), v.detach(), leaves["w_q"].detach(), s)  # noqa: E731
        with torch.no_grad():  # a same-precision solve from V, as the kernel's (its error is amplified too)
            y, converged = iqa_plain_iteration_baseline(fn, v.detach())
        near = float((y.to(F64) - rp.y).abs().max()) <= tolerance(Kind.VALUE, cd).atol * _value_scale(ctx, rp.y)
        z = y if converged and near else _rounded(ctx, rp.y).to(cd)
        for _ in range(steps):
            z = iqa_map_baseline(z, k, v, leaves["w_q"], s)
        grads = torch.autograd.grad(z, list(leaves.values()), g.to(cd), allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(leaves[n])).to(case.dtype) for n, gr in zip(leaves, grads)}


def _values_pass_as_fixed_point(ctx: PropertyContext) -> bool:
    """Whether y = V (the start of plain iteration) already passes ``fixed-point`` in the kernel's dtype: its
    residual ``f(V) - V`` is within the RESIDUAL tolerance. A correct solver may then stop at once (zero
    iterations), and its output depends on neither w_q nor w_k: the score gradients ``p_ij u_i·(v_j - f_i)``
    are, relative to their terms, below what the dtype's accepted residual resolves (the scores' effect on y is
    that small). Found as a false alarm: ``iqa_forward_fixed_point_unrolled`` in float16, ci seed 1, dw_k of
    9.5e-7 against siblings of order 1, returned as None (issue #14)."""
    def compute() -> bool:
        v = values_of(ctx.case)
        resid = (_map64(ctx, v) - v).abs().max()
        return bool(resid <= tolerance(Kind.RESIDUAL, ctx.case.dtype).atol * _value_scale(ctx, None))

    return ctx.memoized("iqa/values-pass-as-fixed-point", compute)  # once per case, not per diagnosed candidate


def _grad_checks(ctx: PropertyContext, got: ForwardBackward, want: dict[str, torch.Tensor], rp: RefPoint,
                 base: dict[str, torch.Tensor] | None = None) -> list[TensorCheck]:
    dtype = ctx.case.dtype
    tol = tolerance(Kind.GRAD, dtype)
    base = base or {}
    siblings = max(float(w.abs().max()) for w in want.values())
    scores_at_noise = rp.consensus or _values_pass_as_fixed_point(ctx)
    checks = []
    for n, w in want.items():
        # dw_q, dw_k vanish exactly at the consensus (SPEC §4), and are below what a solver must resolve where V
        # itself passes as a fixed point: judge them on the scale of the others there
        scale = siblings if scores_at_noise and n in ("w_q", "w_k") else None
        g = got.grads.get(n)
        if g is None:
            c = compare(f"grad/d{n}", torch.zeros_like(w), w, tol, dtype=dtype, scale=scale, baseline=base.get(n))
            if not c.passed:
                c = dataclasses.replace(
                    c, note=f"no gradient flows to {n} (autograd returned None) but the reference is not zero")
        else:
            c = compare(f"grad/d{n}", g, w, tol, dtype=dtype, scale=scale, baseline=base.get(n))
        checks.append(c)
    return checks


def _untransposed_adjoint(ctx: PropertyContext, y_star: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The wrong gradient of an adjoint solved as (I - J) u = g instead of (I - J^T) u = g."""
    i = inputs64(ctx.case)
    scale = ctx.case.kwargs.get("scale")
    B, N, E = y_star.shape
    jac = iqa_jacobian_y_ref(y_star, i["x"], i["w_q"], i["w_k"], i["w_v"], scale=scale)
    u = torch.linalg.solve(torch.eye(N * E, dtype=F64) - jac, g.to(F64).reshape(B, N * E, 1)).reshape(B, N, E)
    leaves = {n: t.clone().requires_grad_(True) for n, t in i.items() if t is not None}
    with torch.enable_grad():
        fy = iqa_map_ref(y_star, leaves["x"], leaves["w_q"], leaves["w_k"], leaves.get("w_v"), scale=scale)
        grads = torch.autograd.grad(fy, list(leaves.values()), u, allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(leaves[n])) for n, gr in zip(leaves, grads)}


def _diagnose(ctx: PropertyContext, got: ForwardBackward, y_star: torch.Tensor, g: torch.Tensor, rp: RefPoint) -> str:
    """Name the known wrong gradient the kernel's matches, if any."""
    if all(got.grads.get(n) is None or not bool(got.grads[n].any()) for n in got.grads):
        return "no gradient reaches any input (all zero or None)"
    candidates = [
        ("the one-step (Jacobian-free) approximation g^T ∂f/∂θ at y*, not the implicit gradient: the backward"
         " ignores that y* depends on itself (solve u = g + (∂f/∂y)^T u instead)",
         lambda: reference_grads(ctx.case, y_star, g, OneStep())),
        *[(f"truncated backprop through {k} applications of f, not the implicit gradient (iterate the adjoint to"
           " convergence or solve it)", (lambda k=k: reference_grads(ctx.case, y_star, g, Truncated(k))))
          for k in (2, 3, 5)],
        ("an adjoint solved as (I - ∂f/∂y) u = g, not (I - ∂f/∂y)^T u = g: the Jacobian is not transposed",
         lambda: _untransposed_adjoint(ctx, y_star, g)),
    ]
    matches = [text for text, make in candidates if all(c.passed for c in _grad_checks(ctx, got, make(), rp))]
    if not matches:
        return ""
    also = "".join(f"\n(on this case it equally matches {t})" for t in matches[1:])
    return f"the gradient matches {matches[0]}{also}"


def _gradients(ctx: PropertyContext) -> None:
    info = ctx.extra(claims)
    got, g = _kernel_grads(ctx)
    rp = _ref_point(ctx, got.outputs["y"])
    if not _require_point(ctx, rp, "gradients"):
        return
    mode = None if info.exact else info.backward
    base = _baseline_grads(ctx, g, rp, mode)
    checks = _grad_checks(ctx, got, reference_grads(ctx.case, rp.y, g, mode), rp, base)
    ctx.record(checks)
    if all(c.passed for c in checks):
        return
    failing = [c for c in checks if not c.passed]
    if info.exact:
        why = _diagnose(ctx, got, rp.y, g, rp)
        what = f"gradients differ from the float64 implicit gradient at {rp.how}"
    else:
        why = ""
        what = f"gradients differ from the float64 reference of the declared approximation {info.describe_backward()}"
    detail = "\n".join(c.describe() for c in failing)
    head = f"{what}: {len(failing)} of {len(checks)} tensors out of tolerance" + (f"\n{why}" if why else "")
    raise Violation(f"{head}\n{detail}", checks)


def _gradient_gap(ctx: PropertyContext) -> None:
    info = ctx.extra(claims)
    if info.exact:
        note(ctx, "grad", f"{info.describe_backward()}: judged by iqa/gradients (no approximation to quantify)")
        return
    got, g = _kernel_grads(ctx)
    rp = _ref_point(ctx, got.outputs["y"])
    if rp.y is None:
        note(ctx, "grad", f"not measured: {rp.how}")
        return
    want = reference_grads(ctx.case, rp.y, g)
    total = sum(float(w.pow(2).sum()) for w in want.values()) ** 0.5
    for n, w in want.items():
        gk = got.grads.get(n)
        gap = float((gk.detach().to(F64) - w).norm()) if gk is not None else float(w.norm())
        note(ctx, f"grad-gap/d{n}", f"declared approximation {info.describe_backward()}: ‖g - g_implicit‖ = {gap:.3e},"
                                    f" relative to ‖all implicit grads‖ {gap / max(total, 1e-300):.3e} (reported, not judged)")


def _convergence_honesty(ctx: PropertyContext) -> None:
    if not ctx.extra(has_stats):
        note(ctx, "stats", "the kernel reports no solver stats (no `iqa_info.with_stats`): nothing to cross-check;"
                           " its output's residual is judged by iqa/fixed-point")
        return
    case = ctx.case
    stats = ctx.extra(forward_stats, dict(case.inputs), dict(case.kwargs))
    y_it, tol = stats["y"], stats["tol"]
    slack = tolerance(Kind.RESIDUAL, y_it.dtype if y_it.dtype in (F64, torch.float32) else torch.float32).atol
    i = inputs64(case)
    y64 = y_it.to(F64)
    fy = iqa_map_ref(y64, i["x"], i["w_q"], i["w_k"], i["w_v"], scale=case.kwargs.get("scale"))
    v = values_of(case)
    den = torch.maximum(y64.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1)).clamp_min(torch.finfo(F64).tiny)
    resid = (fy - y64).flatten(1).norm(dim=1) / den
    claimed = stats["converged"]
    lying = claimed & ~(resid <= tol + slack)
    problems = [f"batch element {b}: reported converged, but the recomputed relative residual ‖f(y) - y‖/max(‖y‖, ‖V‖)"
                f" of its iterate is {float(resid[b]):.3e} > stated tol {tol:.1e} (+ {slack:.0e} float64 recomputation"
                f" slack, tolerances.TABLE[residual])" for b in torch.nonzero(lying).flatten().tolist()]
    if stats["outcome"] == "CONVERGED" and not bool(claimed.all()):
        problems.append(f"outcome CONVERGED but only {int(claimed.sum())}/{claimed.numel()} batch elements converged")
    if problems:
        raise Violation("reported convergence is not honest:\n  " + "\n  ".join(problems))
    note(ctx, "stats", f"{int(claimed.sum())}/{claimed.numel()} reported converged; worst recomputed residual"
                       f" {float(resid.max()):.3e} (stated tol {tol:.1e})")


def _finite(ctx: PropertyContext) -> None:
    got, _ = _kernel_grads(ctx)
    problems = []
    for path, t in [("out/y", got.outputs["y"]), *[(f"grad/d{n}", g) for n, g in got.grads.items()]]:
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            first = [int(j) for j in torch.nonzero(bad)[0]]
            problems.append(f"{path}: {int(bad.sum())} of {t.numel()} non-finite, first at {first}")
    if problems:
        raise Violation("non-finite values (the fixed point is an average of finite values; its gradient is finite"
                        " where I - ∂f/∂y is invertible):\n  " + "\n  ".join(problems))


def iqa_properties(*, honest_refusal: HonestRefusal | None = None) -> tuple[Property, ...]:
    """The ``iqa``-specific properties; ``honest_refusal``: the family's policy for a kernel that refuses a
    case (:data:`~iqa_verify.properties.generic.HonestRefusal`; None: every exception fails)."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        check = fn if honest_refusal is None else tolerating(fn, honest_refusal)
        return Property(id=f"iqa/{name}", title=title, check=check, catches=catches)

    return (
        p("fixed-point", "the output is a fixed point of the float64 map", _fixed_point,
          "too few iterations, wrong map, solver stopping early, low-precision iterates"),
        p("values", "the output equals the float64 fixed point (consensus where f contracts)", _values,
          "score orientation, softmax axis, scale, ignored w_v, transposed w_q"),
        p("convex-combination", "output rows are convex combinations of the values", _convex_combination,
          "softmax over the wrong axis"),
        p("gradients", "gradients equal the float64 implicit gradient at the kernel's fixed point", _gradients,
          "one-step / truncated gradients, untransposed adjoint, detached outputs, missing gradients"),
        p("gradient-gap", "declared approximate backward: distance to the implicit gradient (reported)", _gradient_gap,
          "nothing: quantifies truncated/one-step gradients"),
        p("convergence-honesty", "a reported 'converged' has its residual within the stated tolerance",
          _convergence_honesty, "solvers that report convergence they did not reach"),
        p("finite", "output and gradients are finite", _finite, "overflow in the scores, singular adjoint solves"),
    )
