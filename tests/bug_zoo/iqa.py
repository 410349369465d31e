"""Planted bugs in implicit query attention kernels: each must be caught by ``iqa-verify check`` (ci profile).

Every bug is a plausible mistake (several are in the design notes, seeds/000–003), planted in one small
but otherwise correct kernel (:func:`_iqa`: the map ``f(y) = softmax(scale K (y w_q)^T) V`` solved by
Anderson from ``y_0 = V`` with the exact implicit backward of :mod:`iqa_verify.iqa`). Each public
function here is a kernel with the contract's signature, so a person can run one by hand::

    iqa-verify check tests/bug_zoo/iqa.py:one_step_gradient --family iqa --only iqa/gradients
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from iqa_verify.contracts import state_dtype_for
from iqa_verify.iqa.backward import BackwardMode, Implicit, OneStep, Truncated
from iqa_verify.iqa.kernel import IqaStats
from iqa_verify.iqa.solvers import Anderson, FixedPointIteration, Outcome, Solver
from iqa_verify.iqa_claims import IqaKernelInfo
from tests.bug_zoo.planted import PlantedBug

__all__ = ["BUGS"]


def _iqa(x, w_q, w_k, w_v, scale, bug: str = "", *, solver: Solver | None = None,
         backward: BackwardMode | None = None):
    """Returns (y, forward Solution) with ``bug`` planted."""
    cd = state_dtype_for(x.dtype)
    xc, wq, wk = x.to(cd), w_q.to(cd), w_k.to(cd)
    wv = w_v.to(cd) if w_v is not None else None
    if bug == "w_v-not-differentiated" and wv is not None:
        wv = wv.detach()
    if scale is None:
        dim = w_k.shape[0] if bug == "default-scale-of-Din" else w_k.shape[1]
        scale = dim**-0.5
    elif bug == "scale-ignored":  # the keyword is accepted, then the default is used anyway
        scale = w_k.shape[1] ** -0.5
    k = xc @ wk
    v = xc if (wv is None or bug == "w_v-ignored") else xc @ wv

    def fn(y: torch.Tensor) -> torch.Tensor:
        q = F.linear(y, wq) if bug == "w_q-transposed" else y @ wq  # F.linear computes y @ w_q^T
        scores = scale * (q @ k.transpose(-1, -2) if bug == "scores-transposed" else k @ q.transpose(-1, -2))
        p = torch.softmax(scores, dim=-2 if bug == "softmax-over-keys" else -1)
        return p @ v

    y0 = torch.zeros_like(v) if bug == "y0-zero" else v
    y, sol, _ = (backward or Implicit(Anderson())).run(fn, y0, solver or Anderson())
    return y.to(x.dtype), sol, fn


def scores_transposed(x, w_q, w_k, w_v=None, *, scale=None):
    """softmax(Q K^T) instead of softmax(K Q^T): rows pair query i with all keys."""
    return _iqa(x, w_q, w_k, w_v, scale, "scores-transposed")[0]


def softmax_over_keys(x, w_q, w_k, w_v=None, *, scale=None):
    """softmax over dim=-2 (the key index i) instead of the token index j."""
    return _iqa(x, w_q, w_k, w_v, scale, "softmax-over-keys")[0]


def one_step_gradient(x, w_q, w_k, w_v=None, *, scale=None):
    """seeds/000: the gradient of a single application of f at the fixed point, claimed exact."""
    return _iqa(x, w_q, w_k, w_v, scale, backward=OneStep())[0]


def truncated_gradient(x, w_q, w_k, w_v=None, *, scale=None):
    """Backprop through the last 3 applications of f only, claimed exact."""
    return _iqa(x, w_q, w_k, w_v, scale, backward=Truncated(3))[0]


def detached_output(x, w_q, w_k, w_v=None, *, scale=None):
    """seeds/000: returns ``y.detach()``: no downstream loss gets any gradient."""
    return _iqa(x, w_q, w_k, w_v, scale)[0].detach()


def scale_ignored(x, w_q, w_k, w_v=None, *, scale=None):
    return _iqa(x, w_q, w_k, w_v, scale, "scale-ignored")[0]


def default_scale_of_din(x, w_q, w_k, w_v=None, *, scale=None):
    """scale=None becomes Din**-0.5 instead of Dk**-0.5 (invisible while Din == Dk)."""
    return _iqa(x, w_q, w_k, w_v, scale, "default-scale-of-Din")[0]


def w_v_ignored(x, w_q, w_k, w_v=None, *, scale=None):
    """V = x even when w_v is given (the notes' V = x variant hard-wired)."""
    return _iqa(x, w_q, w_k, w_v, scale, "w_v-ignored")[0]


def w_v_not_differentiated(x, w_q, w_k, w_v=None, *, scale=None):
    """w_v detached: no gradient reaches the value projection."""
    return _iqa(x, w_q, w_k, w_v, scale, "w_v-not-differentiated")[0]


def w_q_transposed(x, w_q, w_k, w_v=None, *, scale=None):
    """w_q applied like an nn.Linear weight (y @ w_q^T): raises unless E == Dk, wrong values when square."""
    return _iqa(x, w_q, w_k, w_v, scale, "w_q-transposed")[0]


def _adjoint_not_transposed(x, w_q, w_k, w_v, scale):
    y_star, sol, fn = _iqa(x, w_q, w_k, w_v, scale, backward=OneStep())  # value and the graph of f(y*)
    y_det = y_star.detach().to(state_dtype_for(x.dtype))

    def hook(g: torch.Tensor) -> torch.Tensor:
        # Solves u = g + (∂f/∂y) u (a JVP) where the adjoint needs u = g + (∂f/∂y)^T u (a VJP).
        def adjoint_map(u):
            return g + torch.autograd.functional.jvp(fn, y_det, u)[1].detach()

        return Anderson(max_iter=500).solve(adjoint_map, g).raise_if_failed("adjoint").y

    if y_star.requires_grad:
        y_star.register_hook(hook)
    return y_star


def adjoint_not_transposed(x, w_q, w_k, w_v=None, *, scale=None):
    """Implicit backward whose adjoint solve uses ∂f/∂y instead of its transpose."""
    return _adjoint_not_transposed(x, w_q, w_k, w_v, scale)


class _UncenteredSoftmax(torch.autograd.Function):
    """softmax whose backward forgets the row-sum term: p * dp instead of p * (dp - sum_j p_j dp_j)."""

    @staticmethod
    def forward(ctx, scores):  # type: ignore[override]
        p = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return p * dp


def _score_grads_uncentered(x, w_q, w_k, w_v, scale):
    """Exact adjoint u = g + (∂f/∂y)^T u at y*, then the parameter gradients u^T ∂f/∂θ taken through a hand-written
    softmax backward without its row-sum term (flash attention's D_i = rowsum(dO * O) forgotten)."""
    cd = state_dtype_for(x.dtype)
    y_star, _, fn = _iqa(x, w_q, w_k, w_v, scale, backward=OneStep())
    y_det = y_star.detach().to(cd)
    xc, wq, wk = x.to(cd), w_q.to(cd), w_k.to(cd)
    s = w_k.shape[1] ** -0.5 if scale is None else scale
    k = xc @ wk
    v = xc if w_v is None else xc @ w_v.to(cd)
    p = _UncenteredSoftmax.apply(s * k @ (y_det @ wq).transpose(-1, -2))
    f_bad = p @ v  # f(y*) with the wrong score backward, differentiable in x, w_q, w_k, w_v (y* held fixed)

    def adjoint(g: torch.Tensor) -> torch.Tensor:  # the correct transposed adjoint, through the correct f
        return Anderson(max_iter=500).solve(
            lambda u: g + torch.autograd.functional.vjp(fn, y_det, u)[1].detach(), g).raise_if_failed("adjoint").y

    class _Swap(torch.autograd.Function):  # value of y*, gradients through f_bad with the adjoint as cotangent
        @staticmethod
        def forward(ctx, f_bad_):  # type: ignore[override]
            return y_det.to(x.dtype).clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return adjoint(g.to(cd)).to(f_bad.dtype)

    return _Swap.apply(f_bad)


def score_grads_uncentered(x, w_q, w_k, w_v=None, *, scale=None):
    """Exact adjoint, but the score gradients (dw_q, dw_k and dx through the keys) from a softmax backward that
    forgets its row-sum term: wrong most where V is nearly a fixed point, where the exact dw_q, dw_k vanish."""
    return _score_grads_uncentered(x, w_q, w_k, w_v, scale)


def _too_few_iterations(x, w_q, w_k, w_v=None, *, scale=None):
    y, sol, _ = _iqa(x, w_q, w_k, w_v, scale, solver=FixedPointIteration(max_iter=3))
    # "reached max_iter without blowing up" taken for convergence
    sol = replace(sol, converged=torch.ones_like(sol.converged), outcome=Outcome.CONVERGED)
    return y, IqaStats(forward=sol, backward=None)


def too_few_iterations(x, w_q, w_k, w_v=None, *, scale=None):
    """Three plain iterations, reported as converged."""
    return _too_few_iterations(x, w_q, w_k, w_v, scale=scale)[0]


too_few_iterations.iqa_info = IqaKernelInfo(with_stats=_too_few_iterations)  # type: ignore[attr-defined]


def y0_zero(x, w_q, w_k, w_v=None, *, scale=None):
    """Starts from y_0 = 0: one step lands on the consensus, a fixed point, but not the one reached from V."""
    return _iqa(x, w_q, w_k, w_v, scale, "y0-zero")[0]


def _bug(kernel: str, dtype: str, caught_by: tuple[str, ...], kind: str, says: str = "") -> PlantedBug:
    return PlantedBug(__file__, "iqa", kernel, dtype, caught_by, kind, says)


def _p(name: str) -> str:
    return f"iqa/{name}"


BUGS: tuple[PlantedBug, ...] = (
    _bug("scores_transposed", "float32", (_p("values"),), "score orientation Q K^T instead of K Q^T"),
    _bug("softmax_over_keys", "float32", (_p("values"), _p("convex-combination")), "softmax axis",
               "convex combinations"),
    _bug("one_step_gradient", "float32", (_p("gradients"),), "one-step (Jacobian-free) gradient", "one-step"),
    _bug("truncated_gradient", "float32", (_p("gradients"),), "truncated backprop claimed exact",
               "truncated backprop through 3"),
    _bug("detached_output", "float32", (_p("gradients"),), "detached output", "detached"),
    _bug("scale_ignored", "float32", (_p("values"), _p("gradients")), "scale keyword ignored"),
    _bug("default_scale_of_din", "float32", (_p("gradients"),), "wrong default scale (Din**-0.5)"),
    _bug("w_v_ignored", "float32", (_p("contract"), _p("values")), "w_v ignored (V = x)"),
    _bug("w_v_not_differentiated", "float32", (_p("gradients"),), "no gradient to w_v", "no gradient flows"),
    _bug("w_q_transposed", "float32", (_p("contract"), _p("values")), "w_q transposed (y w_q^T)"),
    _bug("adjoint_not_transposed", "float32", (_p("gradients"),), "adjoint with ∂f/∂y not transposed",
               "not transposed"),
    _bug("score_grads_uncentered", "float32", (_p("gradients"),), "softmax backward without its row-sum term"),
    _bug("too_few_iterations", "float32", (_p("fixed-point"), _p("convergence-honesty")),
               "too few iterations reported as converged", "reported converged"),
)
