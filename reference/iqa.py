"""Float64 references for implicit query attention (family ``iqa``, SPEC §3).

Every forward here follows the kernel contract (same argument order and defaults)::

    x : [B, N, Din]   w_k : [Din, Dk]   w_q : [E, Dk]   w_v : [Din, E] or None (then V = x, E = Din)
    K = x w_k ;  V = x w_v (or x)
    f(y) = softmax(scale * K (y w_q)^T, dim=-1) V        scale defaults to Dk ** -0.5
    y* = f(y*), reached from y_0 = V

Per batch element, with ``P = softmax(S)``, ``S = scale K Q^T``, ``Q = y w_q`` and ``J_i = diag(p_i) - p_i p_i^T``
(the softmax Jacobian of row i), the map's derivative in y is::

    df_i = scale * V^T J_i (dy w_q k_i)                    (df_i, k_i: rows i of df, K)

Pieces:

* :func:`iqa_map_ref` one application of f; :func:`iqa_jacobian_y_ref` the dense ``∂f/∂y`` (autograd,
  ``[B, N*E, N*E]``); :func:`iqa_solve_ref` Newton on ``F(y) = y - f(y)`` with backtracking and a
  plain-iteration fallback, from ``y0`` (default V) or from a kernel's output ("refining", SPEC §3).
* Gradients of ``L = <g, y*>`` three ways (optimistix style): :func:`iqa_implicit_grad_ref` (dense adjoint
  solve ``(I - ∂f/∂y)^T u = g``, then ``u^T ∂f/∂θ``), :func:`iqa_unrolled_grad_ref` (backprop through k
  plain iterations from V) and :func:`iqa_finite_difference_grad_ref` (4-point central differences with
  the solve re-converged at each perturbation). :func:`iqa_forward_ref` is the contract-signature
  forward whose autograd backward is the exact implicit gradient.
* :func:`consensus_fixed_point` (SPEC §4) and :func:`lipschitz_bound`, a computable contraction bound.
* The same-precision baseline, written apart from the kernels under test: :func:`iqa_map_baseline` (one
  application of f in its arguments' dtype), :func:`iqa_plain_iteration_baseline` (plain iteration to
  about the compute dtype's roundoff) and :func:`iqa_forward_baseline` (both, contract signature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from iqa_verify.errors import check_shape
from iqa_verify.contracts import check_iqa_forward_inputs, state_dtype_for

__all__ = [
    "REF_MAX_ITER",
    "REF_TOL",
    "IqaGrads",
    "IqaRefSolution",
    "ReferenceConvergenceError",
    "consensus_fixed_point",
    "iqa_finite_difference_grad_ref",
    "iqa_forward_baseline",
    "iqa_forward_ref",
    "iqa_implicit_grad_baseline",
    "iqa_implicit_grad_ref",
    "iqa_jacobian_y_ref",
    "iqa_map_baseline",
    "iqa_map_ref",
    "iqa_plain_iteration_baseline",
    "iqa_solve_ref",
    "iqa_unrolled_grad_ref",
    "lipschitz_bound",
]

F64 = torch.float64
#: Newton stops at this relative residual ‖y - f(y)‖_F / max(‖y‖_F, ‖V‖_F) (then polishes one step).
REF_TOL = 1e-13
REF_MAX_ITER = 100
_BACKTRACK_STEPS = 30


class IqaGrads(NamedTuple):
    """Gradients of a scalar loss in each input: x [B, N, Din], w_q [E, Dk], w_k [Din, Dk], w_v [Din, E] or None."""

    x: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor | None


@dataclass
class IqaRefSolution:
    """A reference solve. y: [B, N, E] float64; residual: [B] ``‖y - f(y)‖_F / max(‖y‖_F, ‖V‖_F)``;
    converged: all batch elements reached :data:`REF_TOL`; iterations: Newton/fallback steps taken."""

    y: torch.Tensor
    converged: bool
    iterations: int
    residual: torch.Tensor


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def _scale(w_k: torch.Tensor, scale: float | None) -> float:
    return w_k.shape[-1] ** -0.5 if scale is None else float(scale)  # the contract's default, Dk ** -0.5


def _kv(x, w_k, w_v):
    x = x.to(F64)
    return x @ w_k.to(F64), (x @ w_v.to(F64) if w_v is not None else x)


def _map(y, k, v, w_q, scale):
    scores = scale * torch.einsum("bid,bjd->bij", k, y.to(F64) @ w_q.to(F64))
    return torch.softmax(scores, dim=-1) @ v


def iqa_map_ref(y, x, w_q, w_k, w_v=None, *, scale=None) -> torch.Tensor:
    """One application of f in float64: ``softmax(scale K (y w_q)^T) V``. y: [B, N, E] -> [B, N, E].
    Differentiable in every argument."""
    k, v = _kv(x, w_k, w_v)
    return _map(y, k, v, w_q, _scale(w_k, scale))


def iqa_jacobian_y_ref(y, x, w_q, w_k, w_v=None, *, scale=None) -> torch.Tensor:
    """Dense ``∂f/∂y`` per batch element in closed form: ``[B, N*E, N*E]`` (row-major flattening of [N, E])::

        ∂f_{i,e} / ∂y_{j,e'} = scale * p_ij (v_{j,e} - f_{i,e}) a_{i,e'},     A = K w_q^T   ([N, E])

    (from ``df_i = scale V^T J_i dy a_i`` and ``(V^T J_i)_{e,j} = p_ij (v_{j,e} - f_{i,e})``; checked
    against autograd in the tests). Not differentiable (inputs are detached)."""
    s = _scale(w_k, scale)
    with torch.no_grad():
        k, v = _kv(x, w_k, w_v)
        y = y.to(F64)
        p = torch.softmax(s * torch.einsum("bid,bjd->bij", k, y @ w_q.to(F64)), dim=-1)
        fy = p @ v
        a = k @ w_q.to(F64).transpose(0, 1)
        m = p[:, :, None, :] * (v.transpose(1, 2)[:, None, :, :] - fy[:, :, :, None])  # [B, i, e, j]
        jac = s * m[..., None] * a[:, :, None, None, :]  # [B, i, e, j, e']
    B, N, E = y.shape
    return jac.reshape(B, N * E, N * E)


def _residual(y, fy, v):
    num = torch.linalg.vector_norm((y - fy).flatten(1), dim=1)
    den = torch.maximum(torch.linalg.vector_norm(y.flatten(1), dim=1), torch.linalg.vector_norm(v.flatten(1), dim=1))
    return num / den.clamp_min(torch.finfo(F64).tiny)


def _newton_step(y, fy, jac):
    B, N, E = y.shape
    eye = torch.eye(N * E, dtype=F64, device=y.device)
    A = eye - jac
    rhs = (y - fy).reshape(B, N * E, 1)
    step, info = torch.linalg.solve_ex(A, rhs)
    if bool((info != 0).any()) or not bool(torch.isfinite(step).all()):
        step = torch.linalg.pinv(A) @ rhs  # singular (e.g. at a bifurcation): minimum-norm step
    return step.reshape(B, N, E)


def iqa_solve_ref(
    x, w_q, w_k, w_v=None, *, scale=None, y0=None, tol: float = REF_TOL, max_iter: int = REF_MAX_ITER
) -> IqaRefSolution:
    """High-accuracy float64 fixed point, started from ``y0`` (default ``V``).

    Newton on ``F(y) = y - f(y)``: ``y <- y - t (I - ∂f/∂y)^{-1} F(y)`` with the dense Jacobian, ``t``
    halved until ``‖F‖`` decreases; when no step size decreases it, one plain iteration ``y <- f(y)``
    is taken instead. After the relative residual reaches ``tol`` one more Newton step polishes the
    iterate (kept only if it is no worse). The best iterate per batch element is returned.
    """
    sizes = check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    if y0 is not None:
        check_shape("y0", y0, (sizes.B, sizes.N, sizes.E), "[B, N, E]")
    s = _scale(w_k, scale)
    with torch.no_grad():
        k, v = _kv(x, w_k, w_v)
        wq = w_q.to(F64)
        y = (v if y0 is None else y0.to(F64)).clone()
        fy = _map(y, k, v, wq, s)
        r = _residual(y, fy, v)
        it = 0
        polished = False
        while it < max_iter and not (polished and bool((r <= tol).all())):
            if bool((r <= tol).all()):
                polished = True
            jac = iqa_jacobian_y_ref(y, x, w_q, w_k, w_v, scale=s)
            step = _newton_step(y, fy, jac)
            t = torch.ones(y.shape[0], dtype=F64, device=y.device)
            best_y, best_fy, best_r = y, fy, r
            for _ in range(_BACKTRACK_STEPS):
                cand = y - t[:, None, None] * step
                fc = _map(cand, k, v, wq, s)
                rc = _residual(cand, fc, v)
                take = (rc < best_r) & torch.isfinite(rc)
                best_y = torch.where(take[:, None, None], cand, best_y)
                best_fy = torch.where(take[:, None, None], fc, best_fy)
                best_r = torch.where(take, rc, best_r)
                improved = (rc <= (1 - 1e-4 * t) * r) | (r <= tol)
                if bool(improved.all()):
                    break
                t = torch.where(improved, t, t / 2)
            stuck = (best_r >= r) & (r > tol)
            if bool(stuck.any()):  # Newton makes no progress: one plain iteration for those elements
                best_y = torch.where(stuck[:, None, None], fy, best_y)
                best_fy = torch.where(stuck[:, None, None], _map(fy, k, v, wq, s), best_fy)
                best_r = torch.where(stuck, _residual(best_y, best_fy, v), best_r)
            y, fy, r = best_y, best_fy, best_r
            it += 1
    return IqaRefSolution(y=y, converged=bool((r <= tol).all()), iterations=it, residual=r)


class ReferenceConvergenceError(RuntimeError):
    """The float64 reference's own Newton solve did not converge (written apart from the kernels' solvers)."""

    def __init__(self, what: str, sol: IqaRefSolution) -> None:
        super().__init__(f"{what}: no convergence after {sol.iterations} iterations; worst relative residual"
                         f" {float(sol.residual.max()):.3e} (target {REF_TOL:.0e})")
        self.solution = sol


def _params(x, w_q, w_k, w_v):
    return [t.detach().to(F64).clone().requires_grad_(True) if t is not None else None for t in (x, w_q, w_k, w_v)]


def _vjp_theta(y_star, params, scale, u) -> IqaGrads:
    x, w_q, w_k, w_v = params
    with torch.enable_grad():
        fy = _map(y_star.detach().to(F64), *_kv(x, w_k, w_v), w_q, scale)
        inputs = [t for t in params if t is not None]
        grads = torch.autograd.grad(fy, inputs, u, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return IqaGrads(*grads) if w_v is not None else IqaGrads(*grads, None)


def iqa_implicit_grad_ref(y_star, x, w_q, w_k, w_v, scale, g) -> IqaGrads:
    """Exact implicit gradient of ``L = <g, y*>`` at a converged fixed point ``y_star: [B, N, E]``.

    ``(I - ∂f/∂y)^T u = g`` is solved densely per batch element, then ``dL/dθ = u^T ∂f/∂θ`` by a VJP of
    one application of f (θ = x, w_q, w_k, w_v; x enters through K and V). float64 results."""
    s = _scale(w_k, scale)
    B, N, E = y_star.shape
    jac = iqa_jacobian_y_ref(y_star, x, w_q, w_k, w_v, scale=s)
    A_t = (torch.eye(N * E, dtype=F64, device=jac.device) - jac).transpose(1, 2)
    u = torch.linalg.solve(A_t, g.detach().to(F64).reshape(B, N * E, 1)).reshape(B, N, E)
    return _vjp_theta(y_star, _params(x, w_q, w_k, w_v), s, u)


def iqa_unrolled_grad_ref(x, w_q, w_k, w_v, scale, g, iterations: int) -> IqaGrads:
    """Gradient of ``L = <g, y_k>`` by backprop through ``k = iterations`` plain iterations
    ``y_{t+1} = f(y_t)`` from ``y_0 = V`` (float64; the path through ``y_0 = V`` included)."""
    params = _params(x, w_q, w_k, w_v)
    px, pq, pk, pv = params
    s = _scale(w_k, scale)
    with torch.enable_grad():
        k, v = _kv(px, pk, pv)
        y = v
        for _ in range(iterations):
            y = _map(y, k, v, pq, s)
        inputs = [t for t in params if t is not None]
        grads = torch.autograd.grad((g.detach().to(F64) * y).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs)]
    return IqaGrads(*grads) if pv is not None else IqaGrads(*grads, None)


def iqa_finite_difference_grad_ref(x, w_q, w_k, w_v, scale, g, *, y_star=None, step: float = 3e-4) -> IqaGrads:
    """Gradient of ``L(θ) = <g, y*(θ)>`` by the 4-point central difference
    ``(-L(θ+2h) + 8 L(θ+h) - 8 L(θ-h) + L(θ-2h)) / (12 h)``, ``h = step * max(1, |θ_i|)`` (error O(h^4)),
    one input entry at a time; the fixed point is re-converged by :func:`iqa_solve_ref` at each
    perturbation, warm-started from ``y_star`` (default: the solve from V) to stay on its branch."""
    s = _scale(w_k, scale)
    base = [t.detach().to(F64) if t is not None else None for t in (x, w_q, w_k, w_v)]
    if y_star is None:
        y_star = iqa_solve_ref(*base, scale=s).y
    gd = g.detach().to(F64)

    def loss(args):
        sol = iqa_solve_ref(*args, scale=s, y0=y_star)
        if not sol.converged:
            raise ReferenceConvergenceError("finite differences: perturbed reference solve", sol)
        return float((gd * sol.y).sum())

    out = []
    for idx, t in enumerate(base):
        if t is None:
            out.append(None)
            continue
        grad = torch.zeros_like(t)
        flat = grad.view(-1)
        for j in range(t.numel()):
            h = step * max(1.0, abs(float(t.view(-1)[j])))
            vals = []
            for c in (2, 1, -1, -2):
                pert = t.clone()
                pert.view(-1)[j] += c * h
                args = list(base)
                args[idx] = pert
                vals.append(loss(args))
            flat[j] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
        out.append(grad)
    return IqaGrads(*out)


class _ImplicitRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, scale):
        sol = iqa_solve_ref(x, w_q, w_k, w_v, scale=scale)
        if not sol.converged:
            raise ReferenceConvergenceError("iqa_forward_ref: reference Newton solve", sol)
        ctx.scale = scale
        ctx.save_for_backward(sol.y, x, w_q, w_k, *(() if w_v is None else (w_v,)))
        ctx.has_v = w_v is not None
        return sol.y

    @staticmethod
    def backward(ctx, g):
        y, x, w_q, w_k, *rest = ctx.saved_tensors
        w_v = rest[0] if ctx.has_v else None
        gr = iqa_implicit_grad_ref(y, x, w_q, w_k, w_v, ctx.scale, g)
        cast = [None if t is None else gt.to(t.dtype) for gt, t in zip(gr, (x, w_q, w_k, w_v))]
        return (*cast, None)


def iqa_forward_ref(x, w_q, w_k, w_v=None, *, scale=None) -> torch.Tensor:
    """float64 fixed point from ``y_0 = V`` (contract signature; y: [B, N, E] float64) whose autograd
    backward is the exact implicit gradient :func:`iqa_implicit_grad_ref`. Raises ReferenceConvergenceError if
    Newton does not converge (outside the contractive regime: refine a kernel output instead)."""
    check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    return _ImplicitRef.apply(x, w_q, w_k, w_v, _scale(w_k, scale))


def consensus_fixed_point(x, w_v=None) -> torch.Tensor:
    """``y* = 1 · mean_j(v_j)^T`` ([B, N, E] float64): a fixed point for every input and weight (SPEC §4);
    the fixed point when f is a contraction."""
    v = x.to(F64) @ w_v.to(F64) if w_v is not None else x.to(F64)
    return v.mean(dim=1, keepdim=True).expand_as(v).clone()


def lipschitz_bound(x, w_q, w_k, w_v=None, scale=None) -> torch.Tensor:
    """Upper bound ``L: [B]`` on the Lipschitz constant of f (Frobenius norm on y, any y)::

        L = 1/2 * scale * ‖K w_q^T‖_2 * ‖V_c‖_2,     V_c = V - 1 mean_j(v_j)^T   (spectral norms)

    Derivation (per batch element): ``df_i = scale V^T J_i dy a_i`` with ``a_i = w_q k_i`` (row i of
    ``A = K w_q^T``, [N, E]) and ``J_i = diag(p_i) - p_i p_i^T``.
    (1) ``J_i`` is PSD with ``z^T J_i z = Var_{p_i}(z) <= (max z - min z)^2 / 4 <= ‖z‖^2 / 2``, so
        ``‖J_i‖_2 <= 1/2``; (2) ``J_i 1 = 0``, so ``V^T J_i = V_c^T J_i`` for the centred values, and
        ``‖V^T J_i‖_2 <= ‖V_c‖_2 / 2``; (3) ``sum_i ‖dy a_i‖^2 = ‖dy A^T‖_F^2 <= ‖A‖_2^2 ‖dy‖_F^2``.
    Hence ``‖df‖_F^2 = sum_i ‖df_i‖^2 <= (scale ‖V_c‖_2 / 2)^2 ‖A‖_2^2 ‖dy‖_F^2``; the bound holds for
    the Jacobian at every y, so f is a contraction (unique fixed point = consensus) when ``L < 1``.
    It is <= ``scale/2 ‖K‖_2 ‖w_q‖_2 ‖V‖_2`` and is homogeneous of degree 1 in each of w_q, w_k and
    w_v (degree 2 in x): scaling w_q and w_k by c scales L by c^2.
    """
    check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    s = _scale(w_k, scale)
    k, v = _kv(x.detach(), w_k.detach(), None if w_v is None else w_v.detach())
    a = k @ w_q.detach().to(F64).transpose(0, 1)
    vc = v - v.mean(dim=1, keepdim=True)
    return 0.5 * abs(s) * torch.linalg.matrix_norm(a, ord=2) * torch.linalg.matrix_norm(vc, ord=2)


# -- the same-precision baseline (written apart from the kernels under test) ---------------------------

#: Stopping targets of the baseline's plain iteration, by compute dtype: about the unit roundoff of the
#: dtype the map is computed in (solver settings, not comparison tolerances).
BASELINE_STOP: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 1e-6}


def iqa_map_baseline(y, k, v, w_q, scale: float) -> torch.Tensor:
    """One application of f in the dtype of its arguments: ``softmax(scale K (y w_q)^T) V`` with K, V
    given ([B, N, Dk], [B, N, E]); y: [B, N, E] -> [B, N, E]. Differentiable in every argument."""
    return torch.softmax(scale * (k @ (y @ w_q).transpose(-1, -2)), dim=-1) @ v


def iqa_plain_iteration_baseline(fn, y0: torch.Tensor, *, max_iter: int = 1000) -> tuple[torch.Tensor, bool]:
    """Plain iteration ``y <- fn(y)`` from ``y0`` [B, N, E] until every batch element's relative residual
    ``‖fn(y) - y‖_F / max(‖y‖_F, ‖y0‖_F)`` is at most :data:`BASELINE_STOP` of y0's dtype, or ``max_iter``
    updates. Returns ``(y, converged)``; differentiable through the iterations (backprop through plain
    iteration: the straightforward same-precision gradient)."""
    stop = BASELINE_STOP.get(y0.dtype, BASELINE_STOP[torch.float32])
    scale0 = y0.detach().flatten(1).norm(dim=1)
    y = y0
    for _ in range(max_iter + 1):
        fy = fn(y)
        with torch.no_grad():
            den = torch.maximum(y.detach().flatten(1).norm(dim=1), scale0).clamp_min(torch.finfo(y0.dtype).tiny)
            r = (fy.detach() - y.detach()).flatten(1).norm(dim=1) / den
        if not bool(torch.isfinite(r).all()):
            return y, False
        if bool((r <= stop).all()):
            return y, True
        y = fy
    return y, False


def iqa_implicit_grad_baseline(y_star: torch.Tensor, fn, leaves: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor | None]:
    """The straightforward same-precision implicit gradient at a given fixed point, for fixed points plain
    iteration cannot reach (it repels them, or another attracts): ``y_star`` [B, N, E] in the compute dtype,
    ``fn(y)`` one application of the map built from ``leaves`` (differentiable in them) in that dtype. The
    Jacobian ``∂f/∂y`` is formed from N·E vector-Jacobian products, ``(I - ∂f/∂y)^T u = g`` solved densely
    (LU) in the compute dtype, then ``u^T ∂f/∂θ`` by one more. Its error is the rounding of the map's
    derivatives in that dtype amplified by the conditioning of ``I - ∂f/∂y``: the error no correct kernel in
    that dtype avoids. Returns the gradients of ``leaves`` (None where unused)."""
    B, N, E = y_star.shape
    y = y_star.detach().requires_grad_(True)
    with torch.enable_grad():
        fy = fn(y)
        basis = torch.eye(N * E, dtype=y.dtype, device=y.device).reshape(N * E, 1, N, E).expand(N * E, B, N, E)
        (rows,) = torch.autograd.grad(fy, y, basis, retain_graph=True, is_grads_batched=True)  # rows[m, b] = e_m^T J_b
        jac = rows.reshape(N * E, B, N * E).transpose(0, 1)  # [B, N*E (out), N*E (in)]
        eye = torch.eye(N * E, dtype=y.dtype, device=y.device)
        u = torch.linalg.solve((eye - jac).transpose(1, 2), g.to(y.dtype).reshape(B, N * E, 1)).reshape(B, N, E)
        return list(torch.autograd.grad(fy, leaves, u, allow_unused=True))


def iqa_forward_baseline(x, w_q, w_k, w_v=None, *, scale=None) -> torch.Tensor:
    """The same-precision baseline (contract signature): plain iteration from ``y_0 = V``
    (:func:`iqa_plain_iteration_baseline`) of :func:`iqa_map_baseline`, computed in the compute dtype
    (float32 for bf16/fp16, else the input dtype); y: [B, N, E] in the input dtype. Differentiable
    (backprop through the iterations); returns the last iterate whether or not it converged."""
    check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    cd = state_dtype_for(x.dtype)
    xc, wq = x.to(cd), w_q.to(cd)
    k = xc @ w_k.to(cd)
    v = xc @ w_v.to(cd) if w_v is not None else xc
    s = _scale(w_k, scale)
    y, _ = iqa_plain_iteration_baseline(lambda y: iqa_map_baseline(y, k, v, wq, s), v)
    return y.to(x.dtype)
