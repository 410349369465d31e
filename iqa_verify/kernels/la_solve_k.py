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
(:attr:`Type2Method.DIRECT`), always in float64 (a float32 solve would lose every digit):

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

import contextlib
import enum
from dataclasses import dataclass

import torch

from iqa_verify.contracts import check_la_solve_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
from iqa_verify.kernels.la_solve_k_lsqr import LsqrOutcome, LsqrStats, divide_or_zero, lsqr_solve_k
from iqa_verify.kernels.la_solve_v import DEFAULT_CHUNK_SIZE, check_chunk_size, segment_log_decay

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


RANK_CUT_ULPS = 64
"""Solver setting (direct method): a factor whose smallest |pivot| is <= ``RANK_CUT_ULPS * eps * max(m, n)`` times
its largest counts as rank deficient, and that (batch, head) is solved by the dense pseudo-inverse."""

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


# ---------------------------------------------------------------- direct solve (the default method)


def _dense_map(Q: torch.Tensor, V: torch.Tensor, G: torch.Tensor, scale: float) -> torch.Tensor:
    """A [B, H, T, E, T, D] with ``A[t, e, j, d] = scale * M_tj * v_j[e] * q_t[d]`` (inputs heads-first)."""
    M = scale * torch.exp(segment_log_decay(G))  # [B, H, T, T], exact zeros above the diagonal
    MV = M[:, :, :, None, :, None] * V.transpose(-1, -2)[:, :, None, :, :, None]  # [B, H, T, E, T, 1]
    return MV * Q[:, :, :, None, None, :]  # written once, in its final layout


def _nested_bases(X: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Bases of nested spans: X [B, H, m, n] (rows x_1..x_m) -> [B, H, len(counts), n, n].

    Entry i is an orthonormal basis of span(x_1..x_{c_i}) (c_i = counts[i] < n), padded with zero
    columns to n, or the identity where c_i >= n. One QR of X^T: its leading columns span the leading rows.
    """
    B, H, m, n = X.shape
    U = torch.linalg.qr(X.transpose(-1, -2), mode="reduced")[0]  # [B, H, n, m]
    eye = torch.eye(n, dtype=X.dtype, device=X.device).expand(B, H, n, n)
    pad = [torch.cat([U[..., :c], torch.zeros_like(eye[..., c:])], dim=-1) if c < n else eye for c in counts]
    return torch.stack(pad, dim=2)


class _Factor(enum.Enum):
    """How the compressed system was factored."""

    LU = "square: LU with partial pivoting"
    QR = "tall: QR, y = R^-1 Q^T c"
    QR_T = "wide: QR of the transpose, minimum-norm y = Q R^-T c"


class _DirectSolver:
    """Minimum-norm least squares of ``A x ~ b`` per (batch, head), with the local null spaces removed.

    Row block t of A lies in span(v_1..v_t) and k_j is seen only through q_t·k_j, t >= j, so
    ``s_t = min(E, t)`` output and ``r_j = min(D, T - j + 1)`` unknown directions carry everything
    (1-based). With orthonormal bases W_t, U_j of those spans, ``x = U y`` with y the least-squares
    solution of ``(W^T A U) y = W^T b`` is the minimum-norm solution whenever ``W^T A U`` has full
    rank (null(A) is then exactly range(U)'s complement). It is factored once by LU (square), QR
    (tall) or QR of its transpose (wide). A (batch, head) whose factor looks rank deficient (smallest
    |pivot| <= ``RANK_CUT_ULPS * eps * max(m, n)`` times the largest) uses the dense pseudo-inverse.
    """

    def __init__(self, Q: torch.Tensor, V: torch.Tensor, A6: torch.Tensor):
        B, H, T, E, _, D = A6.shape
        rows = [min(E, t + 1) for t in range(T)]
        cols = [min(D, T - j) for j in range(T)]
        W = _nested_bases(V[:, :, : min(E, T)], rows)  # [B, H, T, E, E]
        U = _nested_bases(Q.flip(2)[:, :, : min(D, T)], cols[::-1]).flip(2)  # [B, H, T, D, D]
        dev = A6.device
        self.row_keep = (torch.arange(E, device=dev) < torch.tensor(rows, device=dev)[:, None]).reshape(-1)
        self.col_keep = (torch.arange(D, device=dev) < torch.tensor(cols, device=dev)[:, None]).reshape(-1)
        self.W, self.U, self.dims = W, U, (B, H, T, E, D)
        # only the first te row blocks and the column blocks from j0 on have bases other than I: transform
        # and select those edges, copy the bulk of A twice (once per cat)
        te, j0 = min(E - 1, T), max(T - D + 1, 0)
        top = torch.einsum("bhtea,bhtejd->bhtajd", W[:, :, :te], A6[:, :, :te]).reshape(B, H, te * E, T, D)
        R = torch.cat([top[:, :, self.row_keep[: te * E]], A6[:, :, te:].reshape(B, H, (T - te) * E, T, D)], dim=2)
        m = R.shape[2]
        right = torch.einsum("bhmjd,bhjdc->bhmjc", R[:, :, :, j0:], U[:, :, j0:]).reshape(B, H, m, (T - j0) * D)
        C = torch.cat([R[:, :, :, :j0].reshape(B, H, m, j0 * D), right[..., self.col_keep[j0 * D :]]], dim=-1)
        m, n = C.shape[-2:]
        cut = RANK_CUT_ULPS * torch.finfo(C.dtype).eps * max(m, n)
        self.kind = _Factor.LU if m == n else _Factor.QR if m > n else _Factor.QR_T
        grad = torch.is_grad_enabled() and C.requires_grad
        # one (batch, head) at a time: batched LU of large matrices fails in some MKL builds
        self.factors = [_factor(self.kind, c if self.kind is not _Factor.QR_T else c.T, grad) for c in C.reshape(B * H, m, n)]
        piv = torch.stack([f[-1] for f in self.factors]).reshape(B, H, -1)
        self.bad = ~(piv.amin(-1) > cut * piv.amax(-1))  # [B, H]; also catches NaN
        self.pinv = None
        if bool(self.bad.any()):
            self.pinv = torch.linalg.pinv(A6.reshape(B, H, T * E, T * D)[self.bad])

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """b [B, H, T E] -> x [B, H, T D]."""
        B, H, T, E, D = self.dims
        c = torch.einsum("bhtea,bhte->bhta", self.W, b.reshape(B, H, T, E)).reshape(B, H, T * E)[..., self.row_keep]
        with _one_cpu_thread(c.device):
            y = torch.stack([_apply(self.kind, f, ci) for f, ci in zip(self.factors, c.reshape(B * H, -1))])
        full = _scatter_cols(y.reshape(B, H, -1), self.col_keep, B, H, T * D)
        x = torch.einsum("bhjdc,bhjc->bhjd", self.U, full.reshape(B, H, T, D)).reshape(B, H, T * D)
        if self.pinv is not None:
            x = x.clone()
            x[self.bad] = (self.pinv @ b[self.bad].unsqueeze(-1)).squeeze(-1)
        return x


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the O(n^2) triangular solves on one CPU thread (restored afterwards).

    Multi-threaded BLAS triangular solves with a single right-hand side are pathologically slow on a
    busy machine (0.74 s instead of 0.6 ms for n = 1928 on 2 shared cores, measured): they are
    memory-bound and gain nothing from threads. No effect on other devices.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _factor(kind: _Factor, C: torch.Tensor, grad: bool) -> tuple:
    """Factor one [m, n] matrix (the transpose for QR_T); the last entry is |diag| of the triangular factor."""
    if kind is _Factor.LU:
        lu, piv, _ = torch.linalg.lu_factor_ex(C)  # a zero pivot is caught by the rank check
        return (lu, piv, None, lu.diagonal().abs())
    n = C.shape[-1]
    if grad:  # differentiable, forms Q explicitly
        q, r = torch.linalg.qr(C, mode="reduced")
        return (q, None, r, r.diagonal().abs())
    a, tau = torch.geqrf(C)  # Householder vectors, Q never formed
    r = a[:n].triu()
    return (a, tau, r, r.diagonal().abs())


def _apply(kind: _Factor, f: tuple, c: torch.Tensor) -> torch.Tensor:
    """The compressed solution y for right-hand side c [m] with factors from :func:`_factor`."""
    c = c.unsqueeze(-1)
    if kind is _Factor.LU:
        lu, piv, _, _ = f
        return torch.linalg.lu_solve(lu, piv, c).squeeze(-1)
    a, tau, r, _ = f
    n = r.shape[-1]
    if kind is _Factor.QR:
        qc = a.T @ c if tau is None else torch.ormqr(a, tau, c, left=True, transpose=True)[:n]
        return torch.linalg.solve_triangular(r, qc, upper=True).squeeze(-1)
    z = torch.linalg.solve_triangular(r.T, c, upper=False)
    if tau is None:
        return (a @ z).squeeze(-1)
    full = torch.cat([z, torch.zeros(a.shape[0] - n, 1, dtype=z.dtype, device=z.device)])
    return torch.ormqr(a, tau, full, left=True, transpose=False).squeeze(-1)


def _scatter_cols(y: torch.Tensor, keep: torch.Tensor, B: int, H: int, n: int) -> torch.Tensor:
    """[B, H, n_kept] -> [B, H, n] with zeros where ``keep`` is False (differentiable)."""
    index = keep.nonzero().squeeze(-1).expand(B, H, -1)
    return torch.zeros(B, H, n, dtype=y.dtype, device=y.device).scatter(-1, index, y)


def _direct(Q, V, G, b, scale, atol, max_steps):
    """Direct min-norm solve plus iterative refinement with the same factors; Q, V, G, b heads-first float64.

    (batch, head) pairs whose compressed factor is rank deficient are found first without gradients and
    solved apart by the dense pseudo-inverse: the factorisations of a degenerate head (QR of zero
    vectors, say) have NaN derivatives, and routing them through the same graph, even masked, would
    poison every gradient (0 * NaN). Stops refining a (batch, head) when
    ``‖A^T r‖ <= atol ‖A‖_F (‖A‖_F ‖x‖ + ‖r‖)``.
    Returns x [B, H, T, D] and LsqrStats (iterations = solves with the factors).
    """
    B, H, T, E = b.shape
    D = Q.shape[-1]
    flat = lambda t: t.reshape(1, B * H, *t.shape[2:])  # noqa: E731  (batch and heads as one head axis)
    Qf, Vf, Gf, bf = flat(Q), flat(V), flat(G), flat(b)
    A6 = _dense_map(Qf, Vf, Gf, scale)
    A = A6.reshape(B * H, T * E, T * D)
    with torch.no_grad():
        probe = _DirectSolver(Qf.detach(), Vf.detach(), A6.detach())
    if torch.is_grad_enabled() and A6.requires_grad:
        bad = probe.bad.reshape(-1)
    else:  # no graph to poison: the probe's factors serve every head (its solve uses pinv for bad ones)
        bad = torch.zeros(B * H, dtype=torch.bool, device=b.device)
    good_idx, bad_idx = (~bad).nonzero().squeeze(-1), bad.nonzero().squeeze(-1)
    bb = bf.reshape(B * H, T * E)
    anorm = torch.linalg.vector_norm(A.detach(), dim=(-2, -1))  # ‖A‖_F per (batch, head)
    x = torch.zeros(B * H, T * D, dtype=b.dtype, device=b.device)
    steps = torch.ones(B * H, dtype=torch.int64, device=b.device)
    if bad_idx.numel():
        x_bad = (torch.linalg.pinv(A[bad_idx]) @ bb[bad_idx].unsqueeze(-1)).squeeze(-1)
        x = x.index_copy(0, bad_idx, x_bad)
    if good_idx.numel():
        pick = lambda t: t[:, good_idx]  # noqa: E731
        every = good_idx.numel() == B * H
        Ag, bg = (A, bb) if every else (A[good_idx], bb[good_idx])
        if torch.is_grad_enabled() and A6.requires_grad:
            solver = _DirectSolver(*((Qf, Vf, A6) if every else (pick(Qf), pick(Vf), pick(A6))))
        else:
            solver = probe
        anorm_g = anorm if every else anorm[good_idx]
        xg = solver.solve(bg.unsqueeze(0)).squeeze(0)
        for it in range(max_steps + 1):
            r = bg - (Ag @ xg.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                arn = (Ag.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
                done = arn <= atol * anorm_g * (anorm_g * xg.norm(dim=-1) + r.norm(dim=-1))
            if bool(done.all()) or it == max_steps:
                break
            xg = torch.where(done[..., None], xg, xg + solver.solve(r.unsqueeze(0)).squeeze(0))
            steps = steps.index_add(0, good_idx, (~done).long())
        x = xg if every else x.index_copy(0, good_idx, xg)
    if not (good_idx.numel() == B * H):  # else r, arn and done of the loop are those of x
        with torch.no_grad():
            r = bb - (A @ x.unsqueeze(-1)).squeeze(-1)
            arn = (A.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
            done = arn <= atol * anorm * (anorm * x.norm(dim=-1) + r.norm(dim=-1))
    rn = r.detach().norm(dim=-1)
    bnorm = bb.detach().norm(dim=-1)
    per_head = lambda t: t.reshape(B, H)  # noqa: E731
    stats = LsqrStats(per_head(steps), per_head(divide_or_zero(rn, bnorm)), per_head(divide_or_zero(arn, anorm * rn)),
                      LsqrOutcome.CONVERGED if bool(done.all()) else LsqrOutcome.MAX_ITER)
    return x.reshape(B, H, T, D), stats


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
        k, stats = _direct(heads(Q), heads(V), G.transpose(1, 2), heads(b), scale, atol, steps)
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
    adjoint, implicit backward; :mod:`iqa_verify.kernels.la_solve_k_lsqr`), a built-in kernel of its own."""
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
