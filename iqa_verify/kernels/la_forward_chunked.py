"""Linear attention with decay (family ``la-forward``): the chunked (parallel-within-chunk) kernel.

Same contract and result as :func:`iqa_verify.kernels.la_forward_recurrent.la_forward_recurrent`,
computed with batched matrix products over chunks of ``chunk_size`` steps; only the hand-over of
the state from one chunk to the next is a loop, in the forward and in the backward pass. The
backward pass is written out by hand (a ``torch.autograd.Function``) so that it is a dozen batched
matmuls and a few elementwise passes instead of an autograd graph with a node per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = ["DEFAULT_CHUNK_SIZE", "la_forward_chunked"]

DEFAULT_CHUNK_SIZE = 64


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise IqaVerifyError(f"chunk_size={chunk_size!r}: chunk size must be an integer")
    check_at_least("chunk_size", chunk_size, 1, "chunk size")


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, F] -> [B, H, N, C, F] in ``dtype``, zero-padding time to N * C steps."""
    B, T, H, width = x.shape
    x = x.to(dtype)
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, n_chunks, chunk, H, width).permute(0, 3, 1, 2, 4).contiguous()


def _from_chunks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, F] -> [B, T, H, F] in ``dtype``, dropping the padded steps."""
    B, H, N, C, width = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, width)[:, :T].to(dtype)


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


def _bmm(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, add: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * a @ b (+ add)`` over the leading batch dims, as one ``baddbmm`` (no extra passes)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    shape = (*a.shape[:-1], b.shape[-1])
    if add is None:
        base, beta = a3.new_empty(a3.shape[0], a3.shape[1], b3.shape[2]), 0.0
    else:
        base, beta = add.reshape(-1, *shape[-2:]), 1.0
    return torch.baddbmm(base, a3, b3, beta=beta, alpha=alpha).view(shape)


class _ChunkedLinearAttention(torch.autograd.Function):
    """Forward and hand-written backward of the chunk decomposition (see ``la_forward_chunked``).

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
        q_c = _to_chunks(q, N, C, acc)  # [B, H, N, C, D]
        k_c = _to_chunks(k, N, C, acc)  # [B, H, N, C, D]
        g_c = _to_chunks(g.unsqueeze(-1), N, C, acc).squeeze(-1)  # [B, H, N, C]

        decay = _causal_decay(g_c)  # M: [B, H, N, C, C]
        q_decay = _exp_nonpositive(g_c.cumsum(dim=-1))  # exp(b_i): [B, H, N, C]
        k_decay = decay[..., -1, :]  # exp(l_j) = exp(Gamma_Cj): [B, H, N, C]
        chunk_decay = q_decay[..., -1, None, None]  # exp(b_C): [B, H, N, 1, 1]

        W = q.new_empty((B, H, N, C + D, E), dtype=acc)  # [V ; S_in]
        v_c = W[..., :C, :]
        v_c.copy_(_to_chunks(v, N, C, acc))
        kd = k_c * k_decay.unsqueeze(-1)
        contrib = _bmm(kd.transpose(-1, -2), v_c)  # (K * exp(l))^T V: [B, H, N, D, E]

        entering = W[..., C:, :]  # S_in: the state entering each chunk, [B, H, N, D, E]
        if initial_state is None:
            entering[:, :, 0].zero_()
        else:
            entering[:, :, 0].copy_(initial_state)
        for n in range(N - 1):
            torch.addcmul(contrib[:, :, n], chunk_decay[:, :, n], entering[:, :, n], out=entering[:, :, n + 1])
        final = torch.addcmul(contrib[:, :, -1], chunk_decay[:, :, -1], entering[:, :, -1])

        X = q.new_empty((B, H, N, C, C + D), dtype=acc)  # [P | Qd]
        torch.mul(_bmm(q_c, k_c.transpose(-1, -2)), decay, out=X[..., :C])
        torch.mul(q_c, q_decay.unsqueeze(-1), out=X[..., C:])
        o = _bmm(X, W, alpha=scale)

        ctx.save_for_backward(X, W, decay, q_c, k_c, kd, q_decay, k_decay)
        ctx.sizes = (T, C, D, scale, q.dtype, initial_state is not None)
        return _from_chunks(o, T, q.dtype), final

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o: torch.Tensor, d_final: torch.Tensor):  # type: ignore[override]
        X, W, decay, q_c, k_c, kd, q_decay, k_decay = ctx.saved_tensors
        T, C, D, scale, in_dtype, has_initial = ctx.sizes
        acc = X.dtype
        N = X.shape[2]
        chunk_decay = q_decay[..., -1, None, None]  # [B, H, N, 1, 1]
        d_out = _to_chunks(d_o, N, C, acc)  # [B, H, N, C, E] (may alias d_o: no in-place)

        dX = _bmm(d_out, W.transpose(-1, -2), alpha=scale)  # [dP | dQd]: [B, H, N, C, C + D]
        dW = _bmm(X.transpose(-1, -2), d_out, alpha=scale)  # [dV | dS_in]: [B, H, N, C + D, E]
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
        d_kd = _bmm(W[..., :C, :], d_state.transpose(-1, -2))  # V dU^T: [B, H, N, C, D]
        dq = _bmm(d_a, k_c, add=d_qd * q_decay.unsqueeze(-1))
        dk = _bmm(d_a.transpose(-1, -2), q_c, add=d_kd * k_decay.unsqueeze(-1))
        dv = _bmm(kd, d_state, add=dW[..., :C, :])

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
            _from_chunks(dq, T, in_dtype),
            _from_chunks(dk, T, in_dtype),
            _from_chunks(dv, T, in_dtype),
            _from_chunks(dg.unsqueeze(-1), T, in_dtype).squeeze(-1),
            d_initial,
            None,
            None,
        )


def la_forward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with per-step scalar decay, computed chunk by chunk with batched matmuls.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H] log-decay, g <= 0 (lambda_t = exp(g_t); g == 0 means no decay).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        chunk_size: steps per chunk C, an integer >= 1 (used as min(chunk_size, T)).

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16
        inputs, the input dtype otherwise.

    Computes the recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``,
    ``final_state = S_T`` (see ``la_forward_recurrent``). The chunk decomposition, per batch and
    head: split time into N = ceil(T / C) chunks; in chunk n with local steps i, j = 1 .. C let
    ``S_in`` be the state entering it (``S_0`` for the first chunk) and::

        Gamma_ij = sum_{j < t <= i} g_t      (i >= j; the log of the decay from step j to step i)
        b_i      = sum_{t <= i} g_t          (the log of the decay from the chunk start to step i)

    Unrolling the recurrence inside the chunk gives the intra-chunk parallel form plus the
    contribution of the entering state::

        o_i = scale * ( sum_{j <= i} exp(Gamma_ij) (q_i . k_j) v_j  +  exp(b_i) S_in^T q_i )
        O   = scale * ( [(Q K^T) * M] V + diag(exp(b)) Q S_in ),   M_ij = exp(Gamma_ij) (i >= j), 0 above
        S_out = exp(b_C) S_in + sum_j exp(Gamma_Cj) k_j v_j^T = exp(b_C) S_in + (K * exp(Gamma_C.))^T V

    and S_out is the next chunk's S_in; the last one is the final state. All chunks' ``Q K^T``,
    ``K^T V`` and ``[P | Qd] [V ; S_in]`` products are single batched matmuls over [B, H, N];
    only ``S_out = exp(b_C) S_in + U`` (one fused multiply-add per chunk) is a loop. ``Gamma`` is
    masked to -inf above the diagonal before the exp (see ``_causal_decay``), so very strong
    decay (g = -50 per step) underflows to exact zeros, never inf or NaN, in values and gradients.
    A ragged last chunk is padded with q = k = v = 0 and g = 0: a padded step multiplies the state
    by exp(0) = 1 and adds 0, so the final state is unchanged; padded outputs are dropped.

    Arithmetic, the state and the cumulative log-decay are in ``state_dtype_for(q.dtype)``
    (float32 accumulation for bf16/fp16). Differentiable once in q, k, v, g and initial_state
    (hand-written backward, formulas in ``_ChunkedLinearAttention``); inputs may be
    non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state)
    _check_chunk_size(chunk_size)
    return _ChunkedLinearAttention.apply(q, k, v, g, initial_state, scale, min(chunk_size, T))
