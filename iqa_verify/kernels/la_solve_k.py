"""Type2 inverse of linear attention with decay (family ``la-solve-k``): least squares for K.

Contract (SPEC §2)::

    la_solve_k(q, v, o, g, initial_state=None, *, scale=1.0) -> k
      q: [B, T, H, D]   v, o: [B, T, H, E]   g: [B, T, H] (<= 0)   initial_state: [B, H, D, E] or None
      k: the minimum-norm least-squares solution of  la_forward(q, k, v, g, initial_state)[0] = o

Per batch and head ``vec(O) = A vec(K) + c``, a (T E) x (T D) system with
``A[(t, e), (j, d)] = scale * M_tj * v_j[e] * q_t[d]`` (t >= j) and ``c`` the initial state's share.

**Why not matrix-free.** A is very ill-conditioned: cond(A) = 2e4 at T = 32, D = E = 8 and 1e6 at
T = 64, D = E = 16 (random q, v, g in [-0.05, 0]; measured), and block-Jacobi preconditioning of the
normal equations (the D x D blocks ``scale^2 |v_j|^2 sum_{t>=j} M_tj^2 q_t q_t^T``) only lowers it by
2-3x. Plain and block-Jacobi right-preconditioned LSQR were both still 10% off the pseudo-inverse
solution after 6000 iterations (6x the rank) at T = 64. So the default is a direct method
(:attr:`Type2Method.DIRECT`, in :mod:`iqa_verify.kernels.la_solve_k_direct`), always in float64 (a
float32 solve would lose every digit):

1. Remove the *local* null spaces. Row block t of A lies in span(v_1..v_t) and k_j is only seen
   through ``q_t · k_j`` for t >= j, so only ``min(E, t)`` output and ``min(D, T - j + 1)`` unknown
   directions matter (1-based). Orthonormal bases W_t, U_j (nested, from one QR each of the first
   v's and the last q's) give the compressed matrix ``C = W^T A U``, formed blockwise.
2. Factor C once per (batch, head): LU (square; the D = E case), QR (tall) or QR of C^T (wide,
   minimum norm ``y = Q R^{-T} W^T b``), and return ``x = U y``. If C has full rank, null(A) is
   exactly range(U)'s complement, so x lies in range(A^T): it *is* the minimum-norm solution.
3. Rank check: a factor whose smallest |pivot| is <= ``RANK_CUT_ULPS * eps * max(m, n)`` times its
   largest (data with extra null spaces: q's in a subspace, v_j = 0, ...) sends that (batch, head)
   to the dense pseudo-inverse (same cut-off as the reference).
4. Iterative refinement with the same factors, stopping per (batch, head) on the normal-equation
   residual ``‖A^T r‖ <= atol ‖A‖_F (‖A‖_F ‖x‖ + ‖r‖)`` (backward-error form: a plain
   ``‖A^T r‖ / (‖A‖ ‖r‖)`` test cannot be met when r is at rounding level), at most ``max_iter`` steps.

Cost O((T D)^3) like the reference, but an LU/QR of the compressed matrix instead of a full SVD and
pseudo-inverse. :attr:`Type2Method.LSQR` is the matrix-free solver of
:mod:`iqa_verify.kernels.la_solve_k_lsqr` (LSQR on the forward kernel and its adjoint, stopping on the
normal-equation residual, implicit pseudo-inverse backward): O(T^2 (D + E)) per step and no T D x T D
matrix, for systems too large for the direct method and conditioned well enough for LSQR; in float32
for bf16/fp16 inputs.

The design notes' step-wise recursion is :func:`la_solve_k_recursion`: exact for E = 1 only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from iqa_verify.contracts import check_la_solve_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
from iqa_verify.kernels.la_solve_k_direct import RANK_CUT_ULPS, direct_solve_k
from iqa_verify.kernels.la_solve_k_lsqr import LsqrOutcome, LsqrStats, lsqr_solve_k
from iqa_verify.kernels.la_solve_v import DEFAULT_CHUNK_SIZE, check_chunk_size

__all__ = [
    "LsqrOutcome",
    "LsqrSettings",
    "LsqrStats",
    "MAX_ITER_PER_UNKNOWN",
    "DIRECT_TOL_ULPS",
    "RANK_CUT_ULPS",
    "REFINE_STEPS",
    "Type2Method",
    "STOP_TOL_ULPS",
    "la_solve_k",
    "la_solve_k_lsqr",
    "la_solve_k_recursion",
    "la_solve_k_with_stats",
]

STOP_TOL_ULPS = 8
"""Solver setting: the default ``atol`` and ``btol`` of LSQR are ``STOP_TOL_ULPS * eps`` of the accumulation dtype
(each application of A rounds at ~T eps, so 2 eps stalled float32 LSQR at a 4e-3 normal residual; the
backward-error property allows 1024 eps)."""

MAX_ITER_PER_UNKNOWN = 16
"""Solver setting: the default iteration cap is ``MAX_ITER_PER_UNKNOWN * min(T E, T D)``. LSQR needs at most
rank(A) steps in exact arithmetic; lost orthogonality delays it: 6-8x the rank measured in float64 at
T = 67, D = E = 1 (kappa 2e4), where a cap of 4x stopped short of the float64 tolerance."""


DIRECT_TOL_ULPS = 64
"""Solver setting (direct method): the default ``atol`` of the refinement rule is ``DIRECT_TOL_ULPS * eps(float64)``."""

REFINE_STEPS = 2
"""Solver setting (direct method): the default cap on iterative-refinement steps after the direct solve."""


class Type2Method(enum.Enum):
    """Which algorithm :func:`la_solve_k` uses."""

    DIRECT = "direct: compressed dense factorisation in float64 plus refinement (default)"
    LSQR = "lsqr: matrix-free LSQR with the forward kernel (slow: the system is very ill-conditioned)"


@dataclass(frozen=True)
class LsqrSettings:
    """LSQR stopping tolerances and iteration cap; ``None`` takes the module defaults for the dtype."""

    atol: float | None = None
    btol: float | None = None
    max_iter: int | None = None


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
    method: Type2Method = Type2Method.DIRECT,
) -> tuple[torch.Tensor, LsqrStats]:
    """:func:`la_solve_k` that also returns the solver's :class:`LsqrStats`."""
    B, T, H, D, E = check_la_solve_inputs({"q": q, "v": v, "o": o}, g, initial_state)
    check_chunk_size(chunk_size)
    if not isinstance(settings, LsqrSettings):
        raise IqaVerifyError(f"settings={settings!r}: must be an LsqrSettings")
    if not isinstance(method, Type2Method):
        raise IqaVerifyError(f"method={method!r}: must be a Type2Method (DIRECT or LSQR)")
    if method is Type2Method.DIRECT:
        acc = torch.float64
        atol = DIRECT_TOL_ULPS * torch.finfo(acc).eps if settings.atol is None else settings.atol
        steps = REFINE_STEPS if settings.max_iter is None else settings.max_iter
        check_at_least("settings.max_iter", steps, 0, "refinement cap")
    else:
        acc = state_dtype_for(q.dtype)
        eps = torch.finfo(acc).eps
        atol = STOP_TOL_ULPS * eps if settings.atol is None else settings.atol
        btol = STOP_TOL_ULPS * eps if settings.btol is None else settings.btol
        max_iter = MAX_ITER_PER_UNKNOWN * T * min(D, E) if settings.max_iter is None else settings.max_iter
        check_at_least("settings.max_iter", max_iter, 1, "iteration cap")
    Q, V, O, G = (x.to(acc) for x in (q, v, o, g))
    b = O
    if initial_state is not None:
        b = O - la_forward_chunked(Q, torch.zeros_like(Q), V, G, initial_state.to(acc), scale=scale, chunk_size=chunk_size)[0]
    if method is Type2Method.DIRECT:
        heads = lambda x: x.transpose(1, 2)  # noqa: E731
        k, stats = direct_solve_k(heads(Q), heads(V), G.transpose(1, 2), heads(b), scale, atol, steps)
        return k.transpose(1, 2).to(q.dtype), stats
    k, stats = lsqr_solve_k(Q, V, G, b, scale=scale, chunk_size=chunk_size, atol=atol, btol=btol, max_iter=max_iter)
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
    method: Type2Method = Type2Method.DIRECT,
) -> torch.Tensor:
    """Type2: K from Q, V, O as the minimum-norm least-squares solution.

    Args:
        q: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H] log-decay (<= 0); initial_state: [B, H, D, E] or None.
        scale: the forward's output scale.
        chunk_size: chunk length of the forward kernel (initial-state offset; LSQR's operator).
        settings: stopping tolerance and step cap (:class:`LsqrSettings`): for DIRECT ``atol`` of the
            refinement rule (default ``DIRECT_TOL_ULPS * eps``) and ``max_iter`` refinement steps
            (default :data:`REFINE_STEPS`); for LSQR as in the module docstring.
        method: :class:`Type2Method` (default DIRECT).

    Returns:
        k: [B, T, H, D] in the input dtype. DIRECT solves in float64 whatever the input dtype (the
        system's condition number grows quickly with T, so a float32 solve loses all digits); LSQR
        accumulates in float32 for bf16/fp16. Statistics come from :func:`la_solve_k_with_stats`.
        LSQR that reaches ``max_iter`` raises :class:`~iqa_verify.errors.IqaVerifyError` here (an
        unconverged iterate is not the minimum-norm solution); the default cap is
        :data:`MAX_ITER_PER_UNKNOWN` times the number of unknowns.
        Differentiable by autograd (DIRECT: through the factorisation, the exact derivative of the
        minimum-norm solution where the rank is locally constant); inputs are never modified.
    """
    k, stats = la_solve_k_with_stats(
        q, v, o, g, initial_state, scale=scale, chunk_size=chunk_size, settings=settings, method=method
    )
    if method is Type2Method.LSQR and stats.outcome is LsqrOutcome.MAX_ITER:
        # an unconverged iterate is not the contract's answer: say so instead of returning it
        b, h = (int(i) for i in (stats.normal_residual == stats.normal_residual.max()).nonzero()[0])
        raise IqaVerifyError(
            f"method=LSQR: no convergence in {int(stats.iterations.max())} iterations (batch {b}, head {h}: normal"
            f" residual ‖A^T r‖/(‖A‖‖r‖) = {float(stats.normal_residual[b, h]):.3g}); raise settings.max_iter or use"
            " Type2Method.DIRECT (la_solve_k_with_stats returns the iterate with its statistics)")
    return k


def la_solve_k_lsqr(
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
    """:func:`la_solve_k` with ``method=Type2Method.LSQR``: the matrix-free solver (forward kernel and its
    adjoint, implicit backward; :mod:`iqa_verify.kernels.la_solve_k_lsqr`) under the family's signature. Not a
    built-in: it does not converge on every ci case (see iqa_verify.properties.la_inverse.solve_k)."""
    return la_solve_k(q, v, o, g, initial_state, scale=scale, chunk_size=chunk_size, settings=settings,
                      method=Type2Method.LSQR)


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
