"""Independent correct ``iqa_forward`` kernels (SPEC §3), for calibration: the fixed point
``y = f(y) = softmax(scale K (y w_q)^T) V`` from ``y_0 = V`` and the exact implicit gradient, written without
the suite's solvers and backward modes.

- :func:`iqa_newton_f64`: damped Newton on ``F(y) = f(y) - y`` with the dense Jacobian (autograd), in float64,
  to a relative residual of 1e-13; backward by the implicit function theorem with a dense solve
  ``(I - J)^T u = dL/dy`` at the fixed point.
- :func:`iqa_picard_acc`: plain iteration in the accumulation dtype to the dtype's residual tolerance, backward
  by the adjoint fixed-point iteration ``u <- dL/dy + J^T u`` (vector-Jacobian products) to the same tolerance,
  or, where the change stalls at the rounding floor of ``J^T u`` above it (a strongly non-normal J), to that floor.

Both attach the adjoint to one differentiable application ``y = f(y*, theta)`` at the detached fixed point
y* (a gradient hook replaces dL/dy by u), so ``dL/dtheta = u^T ∂f/∂theta``.
"""

from __future__ import annotations

import torch

__all__ = ["iqa_newton_f64", "iqa_picard_acc"]


def _acc(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _f(y, K, V, w_q, scale):
    return torch.softmax(scale * (K @ (y @ w_q).transpose(-1, -2)), dim=-1) @ V


def _rel_res(y, fy, V):
    den = torch.maximum(y.flatten(1).norm(dim=-1), V.flatten(1).norm(dim=-1)).clamp_min(1e-300)
    return ((fy - y).flatten(1).norm(dim=-1) / den).max()


def _setup(x, w_q, w_k, w_v, scale, dtype):
    xc = x.to(dtype)
    K = xc @ w_k.to(dtype)
    V = xc @ w_v.to(dtype) if w_v is not None else xc
    s = w_k.shape[1] ** -0.5 if scale is None else scale
    return K, V, w_q.to(dtype), s


def _attach(y_star, K, V, w_q, scale, adjoint):
    """y = f(y*, theta) with dL/dy replaced by the adjoint u (IFT)."""
    y = _f(y_star, K, V, w_q, scale)
    if y.requires_grad:
        y.register_hook(lambda g: adjoint(g))
    return y


def iqa_newton_f64(x, w_q, w_k, w_v=None, *, scale=None):
    f64 = torch.float64
    K, V, wq, s = _setup(x, w_q, w_k, w_v, scale, f64)
    Kd, Vd, wqd = K.detach(), V.detach(), wq.detach()
    B, N, E = Vd.shape
    eye = torch.eye(N * E, dtype=f64)

    def jac(y):
        J = torch.autograd.functional.jacobian(lambda z: _f(z, Kd, Vd, wqd, s).sum(0), y, vectorize=True)
        # [N, E, B, N, E] -> per batch [N*E, N*E]
        return torch.stack([J[:, :, b].reshape(N * E, N * E) for b in range(B)])

    with torch.no_grad():
        y = Vd.clone()
        for _ in range(200):
            fy = _f(y, Kd, Vd, wqd, s)
            if _rel_res(y, fy, Vd) <= 1e-13:
                break
            with torch.enable_grad():
                J = jac(y)
            step = torch.linalg.solve(eye - J, (fy - y).reshape(B, N * E, 1)).reshape(B, N, E)
            cand = y + step
            fc = _f(cand, Kd, Vd, wqd, s)
            # damping: keep the Newton step only where it lowers the residual, else a plain step
            better = (fc - cand).flatten(1).norm(dim=-1) < (fy - y).flatten(1).norm(dim=-1)
            y = torch.where(better[:, None, None], cand, fy)
        else:
            raise RuntimeError("Newton did not converge in 200 steps")
        y_star = y
        with torch.enable_grad():
            JT = jac(y_star).transpose(-1, -2)

    def adjoint(g):
        return torch.linalg.solve(eye - JT, g.reshape(B, N * E, 1)).reshape(B, N, E)

    return _attach(y_star, K, V, wq, s, adjoint).to(x.dtype)


def iqa_picard_acc(x, w_q, w_k, w_v=None, *, scale=None):
    dtype = _acc(x.dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(x.dtype, 1e-5)
    K, V, wq, s = _setup(x, w_q, w_k, w_v, scale, dtype)
    Kd, Vd, wqd = K.detach(), V.detach(), wq.detach()
    with torch.no_grad():
        y = Vd.clone()
        for _ in range(5000):
            fy = _f(y, Kd, Vd, wqd, s)
            done = _rel_res(y, fy, Vd) <= tol
            y = fy
            if done:
                break
        else:
            raise RuntimeError("plain iteration did not converge in 5000 steps")
    y_star = y

    def adjoint(g):
        with torch.enable_grad():
            z = y_star.detach().requires_grad_()
            fz = _f(z, Kd, Vd, wqd, s)
            u = g.clone()
            best, since = float("inf"), 0
            for _ in range(5000):
                (jtu,) = torch.autograd.grad(fz, z, u, retain_graph=True)
                nxt = g + jtu
                change = float((nxt - u).norm()) / max(float(nxt.norm()), 1e-300)
                if change <= tol:
                    return nxt
                # a strongly non-normal J (‖J‖ >> its spectral radius) leaves the change cycling at the rounding
                # floor of J^T u, which can sit just above tol: stop once it no longer falls, if near tol
                best, since = (change, 0) if change < best else (best, since + 1)
                if since >= 50 and best <= 100 * tol:
                    return nxt
                u = nxt
        raise RuntimeError("adjoint iteration did not converge in 5000 steps")

    return _attach(y_star, K, V, wq, s, adjoint).to(x.dtype)
