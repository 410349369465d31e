"""Where and against what an ``iqa`` kernel is judged: the float64 fixed point at its output, the
reference gradients there (exact and approximate modes), and the kernel's own forward/backward.

Fixed points need not be unique outside the contractive regime (SPEC §3), so the reference point is

* the consensus ``1 · mean_j(v_j)^T`` (closed form, exact) in the contractive regime, where it is the
  unique fixed point;
* otherwise the float64 fixed point Newton reaches when started from the kernel's own output
  (:func:`iqa_verify.reference.iqa.iqa_solve_ref` with ``y0``); it is judged only when Newton converges.

Reference gradients of ``L = <g, y*>`` (θ = x, w_q, w_k, w_v), with ``J = ∂f/∂y`` at ``y*`` and
``u`` the adjoint::

    exact (implicit)   u = (I - J^T)^{-1} g
    Truncated(k)       u = sum_{t<k} (J^T)^t g
    OneStep            u = g
    dL/dθ = u^T ∂f/∂θ (a VJP of one application of f at y*)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iqa_verify.family import Case, KernelRaised, PropertyContext
from iqa_verify.iqa_claims import GradientClaim, OneStep, Truncated
from iqa_verify.properties.iqa.cases import Regime
from iqa_verify.reference.iqa import (
    REF_TOL,
    consensus_fixed_point,
    iqa_implicit_grad_ref,
    iqa_jacobian_y_ref,
    iqa_map_ref,
    iqa_solve_ref,
)

__all__ = [
    "GROUPS",
    "RefPoint",
    "convergence_refusal",
    "inputs64",
    "ref_point",
    "reference_grads",
    "values_of",
]

F64 = torch.float64
GROUPS = ("x", "w_q", "w_k", "w_v")


def inputs64(case: Case) -> dict[str, torch.Tensor | None]:
    return {n: (t.detach().to(F64) if t is not None else None) for n, t in case.inputs.items()}


def values_of(case: Case) -> torch.Tensor:
    """V [B, N, E] in float64."""
    i = inputs64(case)
    return i["x"] @ i["w_v"] if i["w_v"] is not None else i["x"]


@dataclass(frozen=True)
class RefPoint:
    """The float64 fixed point a kernel output is judged at. y: [B, N, E] (None when Newton failed);
    how: how it was found (for messages); consensus: y equals the consensus (dw_q = dw_k = 0 there);
    residual: Newton's final relative residual per batch element [B]."""

    y: torch.Tensor | None
    how: str
    consensus: bool
    residual: torch.Tensor | None = None


def ref_point(case: Case, y_kernel: torch.Tensor) -> RefPoint:
    """The reference fixed point for ``y_kernel`` (see the module docstring)."""
    i = inputs64(case)
    scale = case.kwargs.get("scale")
    cons = consensus_fixed_point(i["x"], i["w_v"])
    if case.spec.kind is Regime.CONTRACTIVE:
        return RefPoint(cons, "the consensus 1·mean(V)^T (closed form; the unique fixed point: f contracts)", True)
    start = y_kernel.detach().to(F64)
    if not bool(torch.isfinite(start).all()):
        start = values_of(case)
    sol = iqa_solve_ref(i["x"], i["w_q"], i["w_k"], i["w_v"], scale=scale, y0=start)
    if not sol.converged:
        return RefPoint(None, f"Newton from the kernel's output stalled at relative residual {float(sol.residual.max()):.3e}",
                        False, sol.residual)
    scale_v = max(float(values_of(case).abs().max()), torch.finfo(F64).tiny)
    at_cons = float((sol.y - cons).abs().max()) <= 1e3 * REF_TOL * scale_v
    return RefPoint(sol.y, "the float64 fixed point Newton reaches from the kernel's output", at_cons, sol.residual)


def _vjp(y_star, i, scale, u) -> dict[str, torch.Tensor]:
    leaves = {n: t.clone().requires_grad_(True) for n, t in i.items() if t is not None}
    with torch.enable_grad():
        fy = iqa_map_ref(y_star, leaves["x"], leaves["w_q"], leaves["w_k"], leaves.get("w_v"), scale=scale)
        grads = torch.autograd.grad(fy, list(leaves.values()), u, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, grads)}


def reference_grads(case: Case, y_star: torch.Tensor, g: torch.Tensor, mode: GradientClaim | None = None) -> dict[str, torch.Tensor]:
    """float64 gradients of ``<g, y*>`` for the gradient claim ``mode`` (None or exact: implicit; Truncated(k);
    OneStep)."""
    i = inputs64(case)
    scale = case.kwargs.get("scale")
    if mode is None or mode.exact:
        grads = iqa_implicit_grad_ref(y_star, i["x"], i["w_q"], i["w_k"], i["w_v"], scale, g)
        return {n: gr for n, gr in zip(GROUPS, grads) if gr is not None}
    k = 1 if isinstance(mode, OneStep) else (mode.k if isinstance(mode, Truncated) else None)
    if k is None:
        raise TypeError(f"backward={mode!r}: no float64 reference for this approximate mode (OneStep, Truncated)")
    B, N, E = y_star.shape
    jt = iqa_jacobian_y_ref(y_star, i["x"], i["w_q"], i["w_k"], i["w_v"], scale=scale).transpose(1, 2)
    term = g.to(F64).reshape(B, N * E, 1)
    u = term.clone()
    for _ in range(k - 1):
        term = jt @ term
        u = u + term
    return _vjp(y_star, i, scale, u.reshape(B, N, E))


def convergence_refusal(ctx: PropertyContext, exc: KernelRaised) -> str | None:
    """In the HARD regime a kernel may refuse honestly: an exception whose class name says it did not
    converge (e.g. the built-in solvers' ``ConvergenceError``). Returns a note, or None. The ``iqa`` family
    declares it as its honest-refusal policy (:data:`iqa_verify.properties.generic.HonestRefusal`)."""
    kind = exc.error_type
    if ctx.case.spec.kind is Regime.HARD and "convergence" in kind.lower():
        return f"the kernel raised {kind} (an honest refusal in the hard regime): {exc.message}"
    return None
