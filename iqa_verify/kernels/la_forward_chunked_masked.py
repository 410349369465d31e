"""The masked path of :func:`iqa_verify.kernels.la_forward_chunked.la_forward_chunked` (``DecayForm.MASKED``).

Any decay, however strong: the intra-chunk decay matrix ``M_ij = exp(Gamma_ij)`` (i >= j, 0 above) is
built per chunk in log space and masked before the exp (:func:`_causal_decay`), so it underflows to
exact zeros, never inf or NaN; :class:`MaskedChunks` is the ``torch.autograd.Function`` with the
hand-written backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import state_dtype_for
from iqa_verify.kernels.chunks import batched_matmul, from_chunk_layout, to_chunk_layout

__all__ = ["MaskedChunks"]


def _log_floor(dtype: torch.dtype) -> float:
    """Log-decays below this have exp < 3 * finfo.tiny: they are set to exactly 0 (see ``_exp_nonpositive``)."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0 (-inf allowed), results below ~e * (smallest normal number) set to exactly 0.

    Same values as ``torch.exp`` up to an absolute change below ``3 * finfo.tiny``, but fast: on
    CPU, exp of -inf or of arguments with subnormal results takes a slow path (10-100x slower),
    which strong decay (g = -50 per step) would hit on most entries.
    """
    floor = _log_floor(x.dtype)
    return F.threshold_(torch.exp(x.clamp_min(floor)), 1.5 * math.exp(floor), 0.0)


def _causal_decay(g: torch.Tensor) -> torch.Tensor:
    """[..., C] per-step log-decay -> [..., C, C] decay matrix M: M_ij = exp(Gamma_ij) for i >= j, 0 above.

    ``Gamma_ij = sum_{j < t <= i} g_t`` is built as a cumulative sum down the columns of a
    strictly-lower-triangular copy of ``g`` rather than as ``b_i - b_j`` of a cumulative sum
    ``b``: every entry is a sum of terms of one sign, so it keeps full relative precision even
    when ``b`` is large (strong early decay followed by weak decay), and the diagonal is exactly 0.
    The mask is applied in log space, *before* the exp: one clamp pins the upper triangle to the
    underflow floor and clamps the lower one to [floor, 0]; after the exp everything at the floor
    is set to exactly 0. So M is exactly 0 above the diagonal however strong the decay, and no
    inf (nor inf * 0) can arise. Float bounds and in-place passes, not boolean ``masked_fill``:
    several times faster on CPU.
    """
    C = g.shape[-1]
    floor = _log_floor(g.dtype)
    ones = torch.ones(C, C, dtype=g.dtype, device=g.device)
    low = torch.full_like(ones, floor)
    high = (ones.triu(diagonal=1) * floor).contiguous()  # 0 on and below the diagonal, floor above
    gamma = (g.unsqueeze(-1) * ones.tril(diagonal=-1)).cumsum(dim=-2)  # (g_i if i > j else 0), summed over i
    gamma.clamp_(min=low, max=high)
    return F.threshold_(gamma.exp_(), 1.5 * math.exp(floor), 0.0)


class MaskedChunks(torch.autograd.Function):
    """The chunk decomposition with an explicit masked decay matrix M (any decay; see ``la_forward_chunked``).

    Per chunk (batch dims [B, H, N] left out): X = [P | Qd] is [C, C + D] and W = [V ; S_in] is
    [C + D, E], so that O = scale * X W is one matmul. Backward, with dO scaled by ``scale``::

        [dP | dQd] = dO W^T          [dV | dS_in] = X^T dO (+ Kd dU for dV)
        dQ = (dP * M) K + dQd * exp(b)          dK = (dP * M)^T Q + (V dU^T) * exp(l)
        dU_n = dL/dS_n:  dU_{N} = d final_state,  dU_{n-1} = exp(b_C^n) dU_n + dS_in^n,  dS_0 = dU_0
        d log-decay: dGamma = dP * P (off the diagonal); Gamma_ij = b_i - b_j gives
        db_i = dQd_i . Qd_i + sum_j dGamma_ij - sum_j dGamma_ji (+ <dU_n, S_in> exp(b_C) for i = C);
        dl_j = dKd_j . Kd_j;  dg_t = sum_{i >= t} db_i + sum_{j < t} dl_j  (within the chunk)

    with l_j = Gamma_Cj and Kd = K * exp(l). Double backward is not supported (an explicit error).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        initial_state: torch.Tensor | None,
        scale: float,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, D = q.shape
        E = v.shape[-1]
        acc = state_dtype_for(q.dtype)
        N, C = math.ceil(T / chunk), chunk
        q_c = to_chunk_layout(q, N, C, acc)  # [B, H, N, C, D]
        k_c = to_chunk_layout(k, N, C, acc)  # [B, H, N, C, D]
        g_c = to_chunk_layout(g.unsqueeze(-1), N, C, acc).squeeze(-1)  # [B, H, N, C]

        decay = _causal_decay(g_c)  # M: [B, H, N, C, C]
        q_decay = _exp_nonpositive(g_c.cumsum(dim=-1))  # exp(b_i): [B, H, N, C]
        k_decay = decay[..., -1, :]  # exp(l_j) = exp(Gamma_Cj): [B, H, N, C]
        chunk_decay = q_decay[..., -1, None, None]  # exp(b_C): [B, H, N, 1, 1]

        W = q.new_empty((B, H, N, C + D, E), dtype=acc)  # [V ; S_in]
        v_c = W[..., :C, :]
        v_c.copy_(to_chunk_layout(v, N, C, acc))
        kd = k_c * k_decay.unsqueeze(-1)
        contrib = batched_matmul(kd.transpose(-1, -2), v_c)  # (K * exp(l))^T V: [B, H, N, D, E]

        entering = W[..., C:, :]  # S_in: the state entering each chunk, [B, H, N, D, E]
        if initial_state is None:
            entering[:, :, 0].zero_()
        else:
            entering[:, :, 0].copy_(initial_state)
        for n in range(N - 1):
            torch.addcmul(contrib[:, :, n], chunk_decay[:, :, n], entering[:, :, n], out=entering[:, :, n + 1])
        final = torch.addcmul(contrib[:, :, -1], chunk_decay[:, :, -1], entering[:, :, -1])

        X = q.new_empty((B, H, N, C, C + D), dtype=acc)  # [P | Qd]
        torch.mul(batched_matmul(q_c, k_c.transpose(-1, -2)), decay, out=X[..., :C])
        torch.mul(q_c, q_decay.unsqueeze(-1), out=X[..., C:])
        o = batched_matmul(X, W, alpha=scale)

        ctx.save_for_backward(X, W, decay, q_c, k_c, kd, q_decay, k_decay)
        ctx.sizes = (T, C, D, scale, q.dtype, initial_state is not None)
        return from_chunk_layout(o, T, q.dtype), final

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o: torch.Tensor, d_final: torch.Tensor):  # type: ignore[override]
        X, W, decay, q_c, k_c, kd, q_decay, k_decay = ctx.saved_tensors
        T, C, D, scale, in_dtype, has_initial = ctx.sizes
        acc = X.dtype
        N = X.shape[2]
        chunk_decay = q_decay[..., -1, None, None]  # [B, H, N, 1, 1]
        d_out = to_chunk_layout(d_o, N, C, acc)  # [B, H, N, C, E] (may alias d_o: no in-place)

        dX = batched_matmul(d_out, W.transpose(-1, -2), alpha=scale)  # [dP | dQd]: [B, H, N, C, C + D]
        dW = batched_matmul(X.transpose(-1, -2), d_out, alpha=scale)  # [dV | dS_in]: [B, H, N, C + D, E]
        d_p, d_qd = dX[..., :C], dX[..., C:]
        d_entering = dW[..., C:, :]

        # the state pass, backwards: d_state[n] = dL/dS_n (the state leaving chunk n)
        d_state = torch.empty_like(d_entering)
        d_state[:, :, -1].copy_(d_final)
        for n in range(N - 1, 0, -1):
            torch.addcmul(d_entering[:, :, n], chunk_decay[:, :, n], d_state[:, :, n], out=d_state[:, :, n - 1])
        d_initial = None
        if has_initial:
            d_initial = torch.addcmul(d_entering[:, :, 0], chunk_decay[:, :, 0], d_state[:, :, 0]).to(in_dtype)

        d_a = d_p * decay  # dL/d(Q K^T)
        d_kd = batched_matmul(W[..., :C, :], d_state.transpose(-1, -2))  # V dU^T: [B, H, N, C, D]
        dq = batched_matmul(d_a, k_c, add=d_qd * q_decay.unsqueeze(-1))
        dk = batched_matmul(d_a.transpose(-1, -2), q_c, add=d_kd * k_decay.unsqueeze(-1))
        dv = batched_matmul(kd, d_state, add=dW[..., :C, :])

        # log-decay. b_i (exp(b) on the queries, exp(b_C) on the state) and Gamma_ij = b_i - b_j give
        # db, then dg_t = sum_{i >= t} db_i; l_j = sum_{t > j} g_t gives dg_t += sum_{j < t} dl_j
        # directly (an exact exclusive sum: through db its O(1) last term would cancel only up to
        # rounding). Gamma_ii = 0 does not depend on g: its O(1) terms are dropped for the same reason.
        d_gamma = d_p * X[..., :C]
        d_gamma.diagonal(dim1=-2, dim2=-1).zero_()
        db = (d_qd * X[..., C:]).sum(-1) + d_gamma.sum(-1) - d_gamma.sum(-2)  # [B, H, N, C]
        db[..., -1] += (d_state * W[..., C:, :]).sum((-1, -2)) * chunk_decay[..., 0, 0]
        d_l = (d_kd * kd).sum(-1)  # [B, H, N, C]
        dg = db.flip(-1).cumsum(-1).flip(-1) + F.pad(d_l[..., :-1].cumsum(-1), (1, 0))

        return (
            from_chunk_layout(dq, T, in_dtype),
            from_chunk_layout(dk, T, in_dtype),
            from_chunk_layout(dv, T, in_dtype),
            from_chunk_layout(dg.unsqueeze(-1), T, in_dtype).squeeze(-1),
            d_initial,
            None,
            None,
        )
