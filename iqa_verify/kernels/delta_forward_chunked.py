"""The delta rule (family ``delta-forward``): the chunked WY / UT kernel with a hand-written backward.

Same contract and result as :func:`iqa_verify.kernels.delta_forward_recurrent.delta_forward_recurrent`.
Within a chunk the product of the transitions ``exp(g_t) (I - beta_t k_t k_t^T)`` is never formed: the
UT transform turns the chunk's C sequential updates into one unit-lower-triangular solve (batched over
all chunks), and only the hand-over of the state from chunk to chunk is a loop (forward and backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import check_delta_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.chunks import batched_matmul, from_chunk_layout, to_chunk_layout

__all__ = ["DEFAULT_CHUNK_SIZE", "delta_forward_chunked"]

DEFAULT_CHUNK_SIZE = 64


def _log_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _segment_decay(g: torch.Tensor) -> torch.Tensor:
    """[..., C] log-decay -> [..., C, C]: Gamma_tj = exp(sum_{j < s <= t} g_s) for t >= j, exactly 0 above.

    The exponent is a cumulative sum down the rows of a strictly-lower copy of g (terms of one sign, never a
    difference of cumulative sums), clamped to the underflow floor above the diagonal before the exp, so
    the result never holds inf or NaN and underflows to exact zeros."""
    C = g.shape[-1]
    floor = _log_floor(g.dtype)
    ones = torch.ones(C, C, dtype=g.dtype, device=g.device)
    gamma = (g.unsqueeze(-1) * ones.tril(-1)).cumsum(dim=-2)
    gamma = torch.maximum(torch.minimum(gamma, ones.triu(1) * floor), torch.full_like(ones, floor))
    return F.threshold(gamma.exp(), 1.5 * math.exp(floor), 0.0)


def _segment_grad(G: torch.Tensor) -> torch.Tensor:
    """dL/dg_s = sum_{t >= s > j} G_tj for G = dL/dGamma ⊙ Gamma ([..., C, C], strictly lower) -> [..., C]."""
    below = F.pad(G.cumsum(-1)[..., :-1], (1, 0))  # [t, s]: sum_{j < s} G_tj
    return below.flip(-2).cumsum(-2).flip(-2).diagonal(dim1=-2, dim2=-1)  # sum_{t >= s} at t = s


class _DeltaChunks(torch.autograd.Function):
    """Per chunk (batch dims [B, H, N] left out), local steps t, j = 1 .. C, b_t = sum_{s <= t} g_s,
    c_j = sum_{s > j} g_s, a = exp(b_C), Gamma as in :func:`_segment_decay`, S the state entering the chunk::

        L  = I + tril(diag(beta) (K K^T ⊙ Gamma), -1)            (unit lower triangular)
        W  = L^{-1} diag(beta ⊙ exp(b)) K       U0 = L^{-1} diag(beta) V        (the UT transform)
        u  = U0 - W S                                             (the chunk's pseudo-values, [C, E])
        O  = scale * (diag(exp(b)) Q S + P u),   P = tril(Q K^T ⊙ Gamma)
        S' = a S + (diag(exp(c)) K)^T u                           (the state leaving the chunk)

    (u_t = beta_t (v_t - (state just before step t, decayed)^T k_t): the delta rule's correction, written
    for all t of a chunk at once.) Backward, dO scaled by ``scale``, dS' from the next chunk, in reverse
    chunk order::

        du = P^T dO + diag(exp(c)) K dS'        dS = a dS' + (diag(exp(b)) Q)^T dO - W^T du

    then batched over all chunks: dP = tril(dO u^T), dW = -du S^T, dU0 = du; through the solve
    [dY_W, dY_U] = L^{-T} [dW, dU0] and dL = -(dY_W W^T + dY_U U0^T) (strictly lower part); and the
    products above by the chain rule. Gamma's log-gradient G (strictly lower) gives
    dg_s = sum_{t >= s > j} G_tj; exp(b) and exp(c) give reverse and forward prefix sums; a gives
    <dS', S> a on every step of the chunk.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q, k, v, beta, g, initial_state, scale: float, chunk: int):  # type: ignore[override]
        B, T, H, D = q.shape
        E = v.shape[-1]
        acc = state_dtype_for(q.dtype)
        N = math.ceil(T / chunk)
        qc, kc = to_chunk_layout(q, N, chunk, acc), to_chunk_layout(k, N, chunk, acc)  # [B, H, N, C, D]
        vc = to_chunk_layout(v, N, chunk, acc)  # [B, H, N, C, E]
        bc = to_chunk_layout(beta.unsqueeze(-1), N, chunk, acc).squeeze(-1)  # [B, H, N, C]
        if g is None:
            gc = torch.zeros_like(bc)
        else:
            gc = to_chunk_layout(g.unsqueeze(-1), N, chunk, acc).squeeze(-1)
            # a log-decay of -inf (a full reset) becomes the most negative sum-safe number (exp() is 0 either
            # way; -inf would give 0 * -inf = NaN in _segment_decay's masked product); out of place, gc may view g
            gc = gc.clamp(min=torch.finfo(acc).min / (2 * chunk))
        exp_b = gc.cumsum(-1).exp()
        exp_c = F.pad(gc.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1)).exp()
        a = exp_b[..., -1:].unsqueeze(-1)  # [B, H, N, 1, 1]
        gamma = _segment_decay(gc)  # [B, H, N, C, C]
        kk = batched_matmul(kc, kc.transpose(-1, -2))
        lower = torch.tril(bc.unsqueeze(-1) * kk * gamma, -1)
        lower.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # L = I + A
        rhs = torch.cat([(bc * exp_b).unsqueeze(-1) * kc, bc.unsqueeze(-1) * vc], dim=-1)
        wu = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        w, u0 = wu[..., :D], wu[..., D:]
        kd = kc * exp_c.unsqueeze(-1)  # diag(exp(c)) K
        entering = vc.new_empty(B, H, N, D, E)
        u = torch.empty_like(u0)
        state = vc.new_zeros(B, H, D, E) if initial_state is None else initial_state.to(acc)
        for n in range(N):
            entering[:, :, n] = state
            u_n = torch.baddbmm(u0[:, :, n].reshape(-1, chunk, E), w[:, :, n].reshape(-1, chunk, D),
                                state.reshape(-1, D, E), beta=1.0, alpha=-1.0).view(B, H, chunk, E)
            u[:, :, n] = u_n
            state = torch.addcmul(kd[:, :, n].transpose(-1, -2) @ u_n, a[:, :, n], state)
        p = (batched_matmul(qc, kc.transpose(-1, -2)) * gamma).tril_()
        qe = qc * exp_b.unsqueeze(-1)
        o = batched_matmul(p, u, alpha=scale)
        batched_matmul(qe, entering, alpha=scale, add=o, inplace=True)
        ctx.save_for_backward(qc, kc, vc, bc, exp_b, exp_c, gamma, lower, w, u0, u, kd, p, qe, entering)
        ctx.sizes = (T, scale, q.dtype, g is not None, initial_state is not None)
        return from_chunk_layout(o, T, q.dtype), state

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o: torch.Tensor, d_final: torch.Tensor):  # type: ignore[override]
        qc, kc, vc, bc, exp_b, exp_c, gamma, lower, w, u0, u, kd, p, qe, entering = ctx.saved_tensors
        T, scale, in_dtype, has_g, has_initial = ctx.sizes
        acc = qc.dtype
        B, H, N, C, D = qc.shape
        E = vc.shape[-1]
        d_out = to_chunk_layout(d_o, N, C, acc) * scale
        a = exp_b[..., -1:].unsqueeze(-1)
        du_from_out = batched_matmul(p.transpose(-1, -2), d_out)  # P^T dO
        ds_from_out = batched_matmul(qe.transpose(-1, -2), d_out)  # Qe^T dO
        d_u = torch.empty_like(u)
        d_leaving = torch.empty_like(entering)  # dS' per chunk
        d_state = d_final.to(acc)
        for n in range(N - 1, -1, -1):
            d_leaving[:, :, n] = d_state
            du_n = du_from_out[:, :, n] + kd[:, :, n] @ d_state
            d_u[:, :, n] = du_n
            d_state = a[:, :, n] * d_state + ds_from_out[:, :, n] - w[:, :, n].transpose(-1, -2) @ du_n
        d_initial = d_state.to(in_dtype) if has_initial else None

        d_p = batched_matmul(d_out, u.transpose(-1, -2)).tril_()
        d_qe = batched_matmul(d_out, entering.transpose(-1, -2))  # [C, D]
        d_kd = batched_matmul(u, d_leaving.transpose(-1, -2))  # [C, D]
        d_w = -batched_matmul(d_u, entering.transpose(-1, -2))  # [C, D]
        d_y = torch.linalg.solve_triangular(lower.transpose(-1, -2), torch.cat([d_w, d_u], dim=-1), upper=True,
                                            unitriangular=True)
        d_yw, d_yu = d_y[..., :D], d_y[..., D:]
        d_a_mat = -(batched_matmul(d_yw, w.transpose(-1, -2)) + batched_matmul(d_yu, u0.transpose(-1, -2))).tril_(-1)

        # A = tril(diag(beta) (K K^T ⊙ Gamma), -1); M = K K^T ⊙ Gamma
        m = batched_matmul(kc, kc.transpose(-1, -2)) * gamma
        d_m = bc.unsqueeze(-1) * d_a_mat
        d_beta = (d_a_mat * m).sum(-1) + (d_yw * kc).sum(-1) * exp_b + (d_yu * vc).sum(-1)
        d_mg = d_m * gamma
        d_pg = d_p * gamma
        d_k = batched_matmul(d_mg, kc) + batched_matmul(d_mg.transpose(-1, -2), kc)
        d_k += batched_matmul(d_pg.transpose(-1, -2), qc)
        d_k += (bc * exp_b).unsqueeze(-1) * d_yw + exp_c.unsqueeze(-1) * d_kd
        d_q = batched_matmul(d_pg, kc) + exp_b.unsqueeze(-1) * d_qe
        d_v = bc.unsqueeze(-1) * d_yu

        d_g = None
        if has_g:
            G = (d_m * m + d_p * p).tril(-1)  # d/d log Gamma, strictly lower (Gamma_tt = 1 is constant)
            d_log_b = (d_qe * qe).sum(-1) + (d_yw * kc).sum(-1) * bc * exp_b  # through exp(b_t)
            d_log_c = (d_kd * kd).sum(-1)  # through exp(c_j), c_j = sum_{s > j} g_s
            d_log_a = (a * (d_leaving * entering).sum((-1, -2), keepdim=True)).squeeze(-1)  # [B, H, N, 1]
            d_g = (_segment_grad(G) + d_log_b.flip(-1).cumsum(-1).flip(-1)
                   + F.pad(d_log_c.cumsum(-1)[..., :-1], (1, 0)) + d_log_a)
            d_g = from_chunk_layout(d_g.unsqueeze(-1), T, in_dtype).squeeze(-1)
        unchunk = lambda x: from_chunk_layout(x, T, in_dtype)  # noqa: E731
        d_beta = from_chunk_layout(d_beta.unsqueeze(-1), T, in_dtype).squeeze(-1)
        return unchunk(d_q), unchunk(d_k), unchunk(d_v), d_beta, d_g, d_initial, None, None


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise IqaVerifyError(f"chunk_size={chunk_size!r}: chunk size must be an integer")
    check_at_least("chunk_size", chunk_size, 1, "chunk size")


def delta_forward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule computed chunk by chunk through the WY / UT representation.

    Args:
        q, k: [B, T, H, D] queries and keys (models normalise keys to ‖k_t‖ = 1).
        v: [B, T, H, E] values.
        beta: [B, T, H] write strengths in [0, 1].
        g: [B, T, H] log-decay (g <= 0) or None (no decay).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        chunk_size: steps per chunk C, an integer >= 1 (used as min(chunk_size, T)).
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1, initial_state [N, H, D, E]) of N sequences
            ``[cu[i], cu[i+1])`` (SPEC §6). Each sequence is computed by its own chunked call (chunks start at
            the sequence's start, the hand-written backward runs per sequence); padding outputs are 0 and get
            no gradient.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E] ([N, H, D, E] packed), float32 for
        bf16/fp16 inputs.

    Computes ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``.
    Per chunk (local steps t, j; b_t = sum_{s <= t} g_s; S the entering state), unrolling the recurrence gives
    ``S_t = exp(b_t) S + sum_{j <= t} exp(b_t - b_j) k_j u_j^T`` with pseudo-values u solving the unit lower
    triangular system ``(I + A) u = diag(beta) (V - diag(exp(b)) K S)``, ``A_tj = beta_t exp(b_t - b_j) k_t . k_j``
    (j < t): the UT transform (``_DeltaChunks`` has the matrices and the backward). Every exponential has a
    non-positive argument. A ragged last chunk is padded with zeros (beta = 0, g = 0: the state is unchanged).
    Arithmetic in ``state_dtype_for(q.dtype)``; differentiable once in q, k, v, beta, g, initial_state; inputs
    are never modified.
    """
    check_delta_forward_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    _check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return _packed(q, k, v, beta, g, initial_state, scale, chunk_size, [int(c) for c in cu_seqlens.tolist()])
    return _DeltaChunks.apply(q, k, v, beta, g, initial_state, scale, min(chunk_size, q.shape[1]))


def _packed(q, k, v, beta, g, initial_state, scale: float, chunk_size: int, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked call per sequence of a packed batch; o [1, T, H, E] (0 at padding), final states [N, H, D, E]."""
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        part = None if g is None else g[:, a:b]
        o, state = delta_forward_chunked(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], part, s0, scale=scale,
                                         chunk_size=chunk_size)
        outs.append(o)
        finals.append(state)
    T = q.shape[1]
    if cu[-1] < T:
        outs.append(q.new_zeros(1, T - cu[-1], q.shape[2], v.shape[-1]))
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)
