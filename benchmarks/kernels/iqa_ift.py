"""An implicit query attention kernel written from the textbook, for the engine benchmark.

Forward: plain fixed-point iteration y <- f(y) = softmax(scale K (y W_q)^T) V from y_0 = V, in the
input dtype (float32 accumulation for bf16/fp16), until ‖f(y) - y‖ <= 1e-6 ‖y‖ (float32) or 1e-12
(float64), at most 2000 steps. Backward (implicit function theorem): the adjoint u = g + (∂f/∂y)^T u by
fixed-point iteration on vector-Jacobian products of f, then the parameters' gradients u^T ∂f/∂θ.
Nothing is shared with the suite's own IQA kernels. Counts its calls like ``plain_loop``.
"""

from __future__ import annotations

import os

import torch


def _count() -> None:
    path = os.environ.get("IQA_BENCH_CALLS")
    if path:
        with open(path, "a") as f:
            f.write("call\n")


def _f(y, x, w_q, w_k, w_v, scale):
    k = x @ w_k
    v = x @ w_v if w_v is not None else x
    return torch.softmax(scale * (k @ (y @ w_q).transpose(-1, -2)), dim=-1) @ v


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-6


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, scale):
        with torch.no_grad():
            y = x @ w_v if w_v is not None else x
            for _ in range(2000):
                y_next = _f(y, x, w_q, w_k, w_v, scale)
                done = (y_next - y).norm() <= _tol(y.dtype) * y_next.norm().clamp_min(1e-30)
                y = y_next
                if done:
                    break
        ctx.save_for_backward(y, x, w_q, w_k, w_v if w_v is not None else torch.empty(0))
        ctx.has_v, ctx.scale = w_v is not None, scale
        return y

    @staticmethod
    def backward(ctx, g):
        y, x, w_q, w_k, w_v = ctx.saved_tensors
        w_v = w_v if ctx.has_v else None
        with torch.enable_grad():
            y = y.detach().requires_grad_()
            params = [t.detach().requires_grad_() for t in (x, w_q, w_k)] + (
                [w_v.detach().requires_grad_()] if w_v is not None else [])
            fy = _f(y, *params[:3], params[3] if w_v is not None else None, ctx.scale)
            u = g
            for _ in range(2000):
                (ju,) = torch.autograd.grad(fy, y, u, retain_graph=True)
                u_next = g + ju
                done = (u_next - u).norm() <= _tol(g.dtype) * u_next.norm().clamp_min(1e-30)
                u = u_next
                if done:
                    break
            grads = torch.autograd.grad(fy, params, u, allow_unused=True)
        return (*grads[:3], grads[3] if w_v is not None else None, None)


def iqa_forward_ift(x, w_q, w_k, w_v=None, *, scale=None):
    """[B, N, Din] x; [E, Dk] w_q; [Din, Dk] w_k; [Din, E] w_v or None -> y [B, N, E]."""
    _count()
    s = w_k.shape[1] ** -0.5 if scale is None else float(scale)
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    args = [t.to(acc) if t is not None else None for t in (x, w_q, w_k, w_v)]
    return _Implicit.apply(*args, s).to(x.dtype)
