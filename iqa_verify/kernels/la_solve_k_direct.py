"""The direct Type2 solver (``Type2Method.DIRECT``, the default of :func:`iqa_verify.kernels.la_solve_k.la_solve_k`).

Minimum-norm least squares of ``vec(O) - c = A vec(K)`` per (batch, head), in float64: the dense map A
(:func:`_dense_map`), its local null spaces removed by nested orthonormal bases (:class:`_DirectSolver`),
the compressed system factored once by LU / QR / QR of the transpose, rank-deficient heads sent to the
dense pseudo-inverse, then iterative refinement with the same factors (:func:`direct_solve_k`). The
algorithm and why it is not matrix-free: the :mod:`iqa_verify.kernels.la_solve_k` module docstring.
"""

from __future__ import annotations

import contextlib
import enum

import torch

from iqa_verify.kernels.la_solve_k_lsqr import LsqrOutcome, LsqrStats, divide_or_zero
from iqa_verify.kernels.la_solve_v import segment_log_decay

__all__ = ["RANK_CUT_ULPS", "direct_solve_k"]

RANK_CUT_ULPS = 64
"""Solver setting (direct method): a factor whose smallest |pivot| is <= ``RANK_CUT_ULPS * eps * max(m, n)`` times
its largest counts as rank deficient, and that (batch, head) is solved by the dense pseudo-inverse."""


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


def direct_solve_k(
    Q: torch.Tensor, V: torch.Tensor, G: torch.Tensor, b: torch.Tensor, scale: float, atol: float, max_steps: int
) -> tuple[torch.Tensor, LsqrStats]:
    """Direct min-norm solve plus iterative refinement with the same factors; Q, V, G, b heads-first float64.

    Q: [B, H, T, D]; V, b: [B, H, T, E]; G: [B, H, T]; b = O - (the initial state's share).
    (batch, head) pairs whose compressed factor is rank deficient are found first without gradients and
    solved apart by the dense pseudo-inverse: the factorisations of a degenerate head (QR of zero
    vectors, say) have NaN derivatives, and routing them through the same graph, even masked, would
    poison every gradient (0 * NaN). Stops refining a (batch, head) when
    ``‖A^T r‖ <= atol ‖A‖_F (‖A‖_F ‖x‖ + ‖r‖)``, after at most ``max_steps`` refinement steps.
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
