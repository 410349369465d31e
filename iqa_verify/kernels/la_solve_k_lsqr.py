"""Matrix-free Type2 solve: LSQR on the forward kernel and its adjoint, with an implicit backward.

Per batch and head the Type2 system is ``vec(O) - c = A vec(K)`` (see :mod:`iqa_verify.kernels.la_solve_k`).
A is never formed:

* ``A x  = la_forward_chunked(q, x, v, g, None)[0]`` (the forward is linear in k when S_0 = 0);
* ``A^T r`` is the vector-Jacobian product of the forward in k,
  ``(A^T r)_j = scale * sum_{t >= j} M_tj (r_t · v_j) q_t``: the same forward run backwards in time,
  ``flip(la_forward_chunked(flip(v), flip(r), flip(q), g', None)[0])`` with ``g'_0 = 0`` and
  ``g'_u = g_{T-u}`` (0-based), which shifts the decays by one step.

LSQR (Paige & Saunders) from x_0 = 0 stays in range(A^T), so its limit is the minimum-norm solution
``x = A^+ b``. It stops per (batch, head) when ``‖r‖ <= btol ‖b‖ + atol ‖A‖ ‖x‖`` or
``‖A^T r‖ / (‖A‖ ‖r‖) <= atol`` (the normal-equation residual; ‖A‖ its running Frobenius estimate).

**Backward.** Differentiating through the iterations is wrong twice over (the iterate is not the
solution, and the Givens/normalisation steps have 0/0 derivatives once a problem is solved), so the
backward is implicit, the derivative of the pseudo-inverse solution (Golub & Pereyra 1973)::

    dx = -A^+ dA x + (A^T A)^+ dA^T r + (I - A^+ A) dA^T (A^+)^T x,     r = b - A x

whose vector-Jacobian product for a cotangent ``gx`` is ``gb = w`` and
``gA = -w x^T + r y^T + z n^T`` with ``w = (A^+)^T gx``, ``y = A^+ w = (A^T A)^+ gx``,
``n = (I - A^+ A) gx``, ``z = (A^+)^T x`` — four more matrix-free LSQR solves (with A^T for w and z).
``gA`` is never formed either: ``<gA, dA> = d/dθ (-<w, A_θ x> + <r, A_θ y> + <z, A_θ n>)``, one autograd
pass through the forward kernel. Exact where LSQR converges (the same accuracy as the forward).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from iqa_verify.kernels.la_forward_chunked import la_forward_chunked

__all__ = ["LinearAttentionKeyMap", "LsqrOutcome", "LsqrStats", "divide_or_zero", "lsqr", "lsqr_solve_k"]


class LsqrOutcome(enum.Enum):
    """How a solve ended (for the whole batch)."""

    CONVERGED = "converged: the stopping rule held for every (batch, head)"
    MAX_ITER = "maximum iterations reached before the stopping rule held for every (batch, head): raise max_iter or loosen atol/btol"


@dataclass(frozen=True)
class LsqrStats:
    """Solver statistics, per batch and head (all [B, H]).

    iterations: LSQR steps taken, or for DIRECT the solves with the factors (1 + refinement steps) (int64);
    residual: ‖r‖ / ‖b‖ with r = b - A x, b = vec(O) - c (0 where b = 0);
    normal_residual: ‖A^T r‖ / (‖A‖ ‖r‖) (0 where r = 0); ‖A‖ is LSQR's running Frobenius estimate,
        for DIRECT the exact Frobenius norm and r the true residual;
    outcome: :class:`LsqrOutcome` for the whole call.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    normal_residual: torch.Tensor
    outcome: LsqrOutcome


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) 2-norm of [B, T, H, n] -> [B, H]."""
    return x.square().sum((1, 3)).sqrt()


def _bh(s: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, 1, H, 1] to scale [B, T, H, n] per batch and head."""
    return s[:, None, :, None]


def divide_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (a finished or empty problem)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


class LinearAttentionKeyMap:
    """``A x`` = the forward in k with S_0 = 0, and ``A^T r`` by time reversal (module docstring).

    q [B, T, H, D], v [B, T, H, E], g [B, T, H] in one dtype; x [B, T, H, D] -> [B, T, H, E].
    ``transposed()`` is the same pair of maps the other way round (for solves with A^T).
    """

    def __init__(self, q, v, g, scale: float, chunk_size: int) -> None:
        self.q, self.v, self.g, self.scale, self.chunk_size = q, v, g, scale, chunk_size
        flipped = g.flip(1)
        self.g_rev = torch.cat([torch.zeros_like(flipped[:, :1]), flipped[:, :-1]], dim=1)
        self.q_rev, self.v_rev = q.flip(1), v.flip(1)
        self.cols, self.rows = q.shape[-1], v.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return la_forward_chunked(self.q, x, self.v, self.g, None, scale=self.scale, chunk_size=self.chunk_size)[0]

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        out = la_forward_chunked(self.v_rev, r.flip(1), self.q_rev, self.g_rev, None, scale=self.scale,
                                 chunk_size=self.chunk_size)[0]
        return out.flip(1)

    def transposed(self) -> "_Transposed":
        return _Transposed(self)


class _Transposed:
    def __init__(self, op: LinearAttentionKeyMap) -> None:
        self.op, self.cols, self.rows = op, op.rows, op.cols

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.adjoint(x)

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        return self.op(r)


def lsqr(op, b: torch.Tensor, atol: float, btol: float, max_iter: int) -> tuple[torch.Tensor, LsqrStats]:
    """Batched LSQR for min ‖A x - b‖ with ``op`` (``op(x)``, ``op.adjoint(r)``, ``op.cols``):
    b [B, T, H, rows] -> x [B, T, H, cols], the minimum-norm solution where it converges."""
    B, T, H, _ = b.shape
    bnorm = _norm(b)
    beta = bnorm
    u = b * _bh(divide_or_zero(torch.ones_like(beta), beta))
    v = op.adjoint(u)
    alpha = _norm(v)
    v = v * _bh(divide_or_zero(torch.ones_like(alpha), alpha))
    w = v
    x = torch.zeros(B, T, H, op.cols, dtype=b.dtype, device=b.device)
    phibar, rhobar = beta, alpha
    anorm = torch.zeros_like(beta)
    arnorm = alpha * beta
    active = (beta > 0) & (alpha > 0)
    iterations = torch.zeros(B, H, dtype=torch.int64, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        u = op(v) - _bh(alpha) * u
        beta = _norm(u)
        u = u * _bh(divide_or_zero(torch.ones_like(beta), beta))
        anorm = torch.where(active, torch.sqrt(anorm.square() + alpha.square() + beta.square()), anorm)
        v_next = op.adjoint(u) - _bh(beta) * v
        alpha = _norm(v_next)
        v = v_next * _bh(divide_or_zero(torch.ones_like(alpha), alpha))
        rho = torch.sqrt(rhobar.square() + beta.square())
        c, s = divide_or_zero(rhobar, rho), divide_or_zero(beta, rho)
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar_next = c * phibar, s * phibar
        keep = _bh(active)
        x = torch.where(keep, x + _bh(divide_or_zero(phi, rho)) * w, x)
        w = v - _bh(divide_or_zero(theta, rho)) * w
        phibar = torch.where(active, phibar_next, phibar)
        arnorm = torch.where(active, alpha * c.abs() * phibar_next, arnorm)
        iterations = iterations + active.long()
        consistent = phibar <= btol * bnorm + atol * anorm * _norm(x)
        normal = arnorm <= atol * anorm * phibar
        active = active & ~(consistent | normal)
    residual = divide_or_zero(phibar, bnorm)
    normal_residual = divide_or_zero(arnorm, anorm * phibar)
    outcome = LsqrOutcome.MAX_ITER if bool(active.any()) else LsqrOutcome.CONVERGED
    return x, LsqrStats(iterations, residual, normal_residual, outcome)


class _ImplicitLsqr(torch.autograd.Function):
    """x = A^+ b by LSQR, with the implicit (pseudo-inverse) backward of the module docstring."""

    @staticmethod
    def forward(ctx, q, v, g, b, scale, chunk_size, atol, btol, max_iter, stats_out):
        x, stats = lsqr(LinearAttentionKeyMap(q, v, g, scale, chunk_size), b, atol, btol, max_iter)
        stats_out.append(stats)
        ctx.save_for_backward(q, v, g, b, x)
        ctx.settings = (scale, chunk_size, atol, btol, max_iter)
        return x

    @staticmethod
    def backward(ctx, gx):
        q, v, g, b, x = ctx.saved_tensors
        scale, chunk_size, atol, btol, max_iter = ctx.settings
        op = LinearAttentionKeyMap(q, v, g, scale, chunk_size)
        op_t = op.transposed()
        gx = gx.to(x.dtype)
        w = lsqr(op_t, gx, atol, btol, max_iter)[0]  # (A^+)^T gx
        y = lsqr(op, w, atol, btol, max_iter)[0]  # (A^T A)^+ gx
        null = gx - lsqr(op, op(gx), atol, btol, max_iter)[0]  # (I - A^+ A) gx
        z = lsqr(op_t, x, atol, btol, max_iter)[0]  # (A^+)^T x
        r = b - op(x)
        with torch.enable_grad():
            qd, vd, gd = (t.detach().requires_grad_() for t in (q, v, g))
            apply = LinearAttentionKeyMap(qd, vd, gd, scale, chunk_size)
            f = -(w * apply(x)).sum() + (r * apply(y)).sum() + (z * apply(null)).sum()
            gq, gv, gg = torch.autograd.grad(f, [qd, vd, gd], allow_unused=True)
        return gq, gv, gg, w, None, None, None, None, None, None


def lsqr_solve_k(q, v, g, b, *, scale: float, chunk_size: int, atol: float, btol: float,
                 max_iter: int) -> tuple[torch.Tensor, LsqrStats]:
    """K = A^+ b for q [B, T, H, D], v [B, T, H, E], g [B, T, H], b = vec(O) - c [B, T, H, E] (one
    dtype, the accumulation dtype). Differentiable in q, v, g and b by the implicit backward."""
    stats: list[LsqrStats] = []
    x = _ImplicitLsqr.apply(q, v, g, b, scale, chunk_size, atol, btol, max_iter, stats)
    return x, stats[0]
