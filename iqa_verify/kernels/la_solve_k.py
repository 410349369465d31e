"""Type2 inverse of linear attention with decay (family ``la-solve-k``): matrix-free least squares for K.

Contract (SPEC §2)::

    la_solve_k(q, v, o, g, initial_state=None, *, scale=1.0) -> k
      q: [B, T, H, D]   v, o: [B, T, H, E]   g: [B, T, H] (<= 0)   initial_state: [B, H, D, E] or None
      k: the minimum-norm least-squares solution of  la_forward(q, k, v, g, initial_state)[0] = o

Per batch and head ``vec(O) = A vec(K) + c`` is a (T E) x (T D) system. It is solved by LSQR (Paige &
Saunders 1982) without forming A:

* ``A x  = la_forward_chunked(q, x, v, g, None)[0]`` (the forward is linear in k when S_0 = 0);
* ``c    = la_forward_chunked(q, 0, v, g, S_0)[0]``;
* ``A^T r`` is the vector-Jacobian product of the forward in k,
  ``(A^T r)_j = scale * sum_{t >= j} M_tj (r_t · v_j) q_t``: the same forward run backwards in time,
  ``flip(la_forward_chunked(flip(v), flip(r), flip(q), g', None)[0])`` with ``g'_0 = 0`` and
  ``g'_u = g_{T-u}`` (0-based), which shifts the decays by one step.

LSQR from x_0 = 0 stays in range(A^T), so its limit is the minimum-norm solution. It stops per (batch,
head) when either holds (the LSQR tests, ``‖A‖`` its running Frobenius estimate)::

    ‖r‖ <= btol ‖b‖ + atol ‖A‖ ‖x‖           (consistent systems)
    ‖A^T r‖ / (‖A‖ ‖r‖) <= atol               (normal-equation residual: least-squares systems)

The design notes' step-wise recursion is :func:`la_solve_k_recursion`: exact for E = 1 only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from iqa_verify.contracts import state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
from iqa_verify.kernels.la_solve_v import DEFAULT_CHUNK_SIZE, check_chunk_size, check_la_solve_inputs

__all__ = [
    "LsqrOutcome",
    "LsqrSettings",
    "LsqrStats",
    "MAX_ITER_PER_UNKNOWN",
    "STOP_TOL_ULPS",
    "la_solve_k",
    "la_solve_k_recursion",
    "la_solve_k_with_stats",
]

STOP_TOL_ULPS = 2
"""Solver setting: the default ``atol`` and ``btol`` of LSQR are ``STOP_TOL_ULPS * eps`` of the accumulation dtype."""

MAX_ITER_PER_UNKNOWN = 4
"""Solver setting: the default iteration cap is ``MAX_ITER_PER_UNKNOWN * min(T E, T D)`` (LSQR needs at most
rank(A) steps in exact arithmetic; in float32 lost orthogonality delays it to about twice that)."""


class LsqrOutcome(enum.Enum):
    """How an LSQR solve ended (for the whole batch)."""

    CONVERGED = "converged: the stopping rule held for every (batch, head)"
    MAX_ITER = "maximum iterations reached before the stopping rule held for every (batch, head): raise max_iter or loosen atol/btol"


@dataclass(frozen=True)
class LsqrSettings:
    """LSQR stopping tolerances and iteration cap; ``None`` takes the module defaults for the dtype."""

    atol: float | None = None
    btol: float | None = None
    max_iter: int | None = None


@dataclass(frozen=True)
class LsqrStats:
    """Solver statistics, per batch and head (all [B, H]).

    iterations: LSQR steps taken (int64);
    residual: ‖r‖ / ‖b‖ with r = b - A x, b = vec(O) - c (0 where b = 0);
    normal_residual: ‖A^T r‖ / (‖A‖_est ‖r‖) (0 where r = 0);
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


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (a finished or empty problem)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


class _Operator:
    """A x = forward in k (S_0 = 0) and its adjoint by time reversal, all in the accumulation dtype."""

    def __init__(self, q, v, g, scale, chunk_size):
        self.q, self.v, self.g, self.scale, self.chunk_size = q, v, g, scale, chunk_size
        flipped = g.flip(1)
        self.g_rev = torch.cat([torch.zeros_like(flipped[:, :1]), flipped[:, :-1]], dim=1)
        self.q_rev, self.v_rev = q.flip(1), v.flip(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return la_forward_chunked(self.q, x, self.v, self.g, None, scale=self.scale, chunk_size=self.chunk_size)[0]

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        out = la_forward_chunked(self.v_rev, r.flip(1), self.q_rev, self.g_rev, None, scale=self.scale, chunk_size=self.chunk_size)[0]
        return out.flip(1)


def _lsqr(op: _Operator, b: torch.Tensor, n: int, atol: float, btol: float, max_iter: int):
    """Batched LSQR for min ‖A x - b‖, b [B, T, H, E] -> x [B, T, H, n] and per-(batch, head) statistics."""
    B, T, H, _ = b.shape
    bnorm = _norm(b)
    beta = bnorm
    u = b * _bh(_div(torch.ones_like(beta), beta))
    v = op.adjoint(u)
    alpha = _norm(v)
    v = v * _bh(_div(torch.ones_like(alpha), alpha))
    w = v
    x = torch.zeros(B, T, H, n, dtype=b.dtype, device=b.device)
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
        u = u * _bh(_div(torch.ones_like(beta), beta))
        anorm = torch.where(active, torch.sqrt(anorm.square() + alpha.square() + beta.square()), anorm)
        v_next = op.adjoint(u) - _bh(beta) * v
        alpha = _norm(v_next)
        v = v_next * _bh(_div(torch.ones_like(alpha), alpha))
        rho = torch.sqrt(rhobar.square() + beta.square())
        c, s = _div(rhobar, rho), _div(beta, rho)
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar_next = c * phibar, s * phibar
        keep = _bh(active)
        x = torch.where(keep, x + _bh(_div(phi, rho)) * w, x)
        w = v - _bh(_div(theta, rho)) * w
        phibar = torch.where(active, phibar_next, phibar)
        arnorm = torch.where(active, alpha * c.abs() * phibar_next, arnorm)
        iterations = iterations + active.long()
        consistent = phibar <= btol * bnorm + atol * anorm * _norm(x)
        normal = arnorm <= atol * anorm * phibar
        active = active & ~(consistent | normal)
    residual = _div(phibar, bnorm).detach()
    normal_residual = _div(arnorm, anorm * phibar).detach()
    outcome = LsqrOutcome.MAX_ITER if bool(active.any()) else LsqrOutcome.CONVERGED
    return x, LsqrStats(iterations, residual, normal_residual, outcome)


def la_solve_k_with_stats(
    q: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    settings: LsqrSettings = LsqrSettings(),
) -> tuple[torch.Tensor, LsqrStats]:
    """:func:`la_solve_k` that also returns the solver's :class:`LsqrStats`."""
    B, T, H, D, E = check_la_solve_inputs({"q": q, "v": v, "o": o}, g, initial_state)
    check_chunk_size(chunk_size)
    if not isinstance(settings, LsqrSettings):
        raise IqaVerifyError(f"settings={settings!r}: must be an LsqrSettings")
    acc = state_dtype_for(q.dtype)
    eps = torch.finfo(acc).eps
    atol = STOP_TOL_ULPS * eps if settings.atol is None else settings.atol
    btol = STOP_TOL_ULPS * eps if settings.btol is None else settings.btol
    max_iter = MAX_ITER_PER_UNKNOWN * T * min(D, E) if settings.max_iter is None else settings.max_iter
    check_at_least("settings.max_iter", max_iter, 1, "iteration cap")
    Q, V, O, G = (x.to(acc) for x in (q, v, o, g))
    op = _Operator(Q, V, G, scale, chunk_size)
    b = O
    if initial_state is not None:
        b = O - la_forward_chunked(Q, torch.zeros_like(Q), V, G, initial_state.to(acc), scale=scale, chunk_size=chunk_size)[0]
    k, stats = _lsqr(op, b, D, atol, btol, max_iter)
    return k.to(q.dtype), stats


def la_solve_k(
    q: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    settings: LsqrSettings = LsqrSettings(),
) -> torch.Tensor:
    """Type2: K from Q, V, O as the minimum-norm least-squares solution, matrix-free (LSQR).

    Args:
        q: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H] log-decay (<= 0); initial_state: [B, H, D, E] or None.
        scale: the forward's output scale.
        chunk_size: chunk length of the forward kernel used as the operator.
        settings: LSQR tolerances and iteration cap (:class:`LsqrSettings`; defaults :data:`STOP_TOL_ULPS`,
            :data:`MAX_ITER_PER_UNKNOWN`).

    Returns:
        k: [B, T, H, D] in the input dtype (float32 accumulation for bf16/fp16). The math is in the
        module docstring; statistics come from :func:`la_solve_k_with_stats`. Each iteration costs one
        forward and one reversed forward. Differentiable by autograd through the iterations (an
        approximation of the exact derivative of the minimum-norm solution that improves as the solve
        converges); inputs are never modified.
    """
    return la_solve_k_with_stats(q, v, o, g, initial_state, scale=scale, chunk_size=chunk_size, settings=settings)[0]


def la_solve_k_recursion(
    q: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """The design notes' step-wise Type2 recursion. **Exact (reproduces O) only for E = 1**::

        s_0 = S_0 (zeros if None)
        s_t = q_t o_t^T / (scale |q_t|^2)                     minimum-norm state fitting o_t alone
        k_t = (s_t - exp(g_t) s_{t-1}) v_t / |v_t|^2          rank-one fit of the state increment

    q: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H]. Returns k [B, T, H, D] in the input dtype. For
    E > 1 the state increment is not rank one along v_t, the rest is lost, and the round trip is
    typically off by tens of percent even for consistent O: it is NOT a solver of the Type2
    contract (use :func:`la_solve_k`). Needs q_t != 0 and v_t != 0 (division by zero otherwise).
    """
    B, T, H, D, E = check_la_solve_inputs({"q": q, "v": v, "o": o}, g, initial_state)
    acc = state_dtype_for(q.dtype)
    Q, V, O, G = (x.to(acc) for x in (q, v, o, g))
    s = Q.unsqueeze(-1) * O.unsqueeze(-2) / (scale * Q.square().sum(-1)[..., None, None])  # [B, T, H, D, E]
    first = torch.zeros_like(s[:, :1]) if initial_state is None else initial_state.to(acc).unsqueeze(1)
    prev = torch.cat([first, s[:, :-1]], dim=1)
    incr = s - torch.exp(G)[..., None, None] * prev
    k = (incr @ V.unsqueeze(-1)).squeeze(-1) / V.square().sum(-1, keepdim=True)
    return k.to(q.dtype)
