"""Linear attention with decay (family ``la-forward``): the chunked (parallel-within-chunk) kernel.

Same contract and result as :func:`iqa_verify.kernels.la_forward_recurrent.la_forward_recurrent`,
computed with batched matrix products over chunks of ``chunk_size`` steps; only the hand-over of
the state from one chunk to the next is a loop, in the forward and in the backward pass. The
backward pass is written out by hand (a ``torch.autograd.Function``) so that it is a dozen batched
matmuls and a few elementwise passes instead of an autograd graph with a node per chunk.

Two forms of the intra-chunk decay (see ``la_forward_chunked``): FACTORED, the fast path for
moderate decay, folds the decay into row scalings of Q and K; MASKED, the fallback for strong
decay, builds the masked decay matrix in log space. Passes over the big tensors are kept few:
chunking copies are fused with the scalings and dtype conversions, outputs are written by one
pass each, and matmul results are accumulated in place (``baddbmm_``).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = ["DEFAULT_CHUNK_SIZE", "DecayForm", "decay_form", "factored_span_limit", "la_forward_chunked"]

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


def _bmm(
    a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, add: torch.Tensor | None = None, inplace: bool = False
) -> torch.Tensor:
    """``alpha * a @ b (+ add)`` over the leading batch dims, as one ``baddbmm`` (no extra passes).

    With ``inplace=True`` the product is accumulated into ``add`` (contiguous) and ``add`` is returned.
    """
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    shape = (*a.shape[:-1], b.shape[-1])
    if add is None and alpha == 1.0:
        return torch.bmm(a3, b3).view(shape)
    if add is None:
        base = a3.new_empty(a3.shape[0], a3.shape[1], b3.shape[2])
        return torch.baddbmm(base, a3, b3, beta=0.0, alpha=alpha).view(shape)
    base = add.view(-1, *shape[-2:]) if inplace else add.reshape(-1, *shape[-2:])
    if inplace:
        base.baddbmm_(a3, b3, alpha=alpha)
        return add
    return torch.baddbmm(base, a3, b3, alpha=alpha).view(shape)


class _MaskedChunks(torch.autograd.Function):
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

class DecayForm(enum.Enum):
    """How a call builds the intra-chunk decay (chosen per call by :func:`decay_form`)."""

    FACTORED = "exp(b_i - b_j) = exp(b_i - b_C) * exp(b_C - b_j), folded into the rows of Q and K"
    MASKED = "the masked matrix M_ij = exp(Gamma_ij) built in log space (any decay, however strong)"


def factored_span_limit(dtype: torch.dtype) -> float:
    """Largest chunk decay span ``-b_C`` (in nats) for which the factored form is used: log(finfo.max) / 3.

    The factored form scales the rows of Q by ``exp(b_i - b_C)`` in [1, exp(span)] and those of K by
    ``exp(b_C - b_j)`` in [exp(-span), 1]; a third of the exponent range (29.6 for float32, 236 for
    float64) leaves both factors, and their products with the entries of q and k, far from
    overflow and from subnormal numbers.
    """
    return math.log(torch.finfo(dtype).max) / 3.0


def decay_form(g: torch.Tensor, chunk_size: int) -> DecayForm:
    """FACTORED when every chunk's total log-decay ``-sum_chunk g`` is within ``factored_span_limit``, else MASKED.

    g: [B, T, H]. One decision per call (one device sync): a single chunk of strong decay (or a
    NaN / -inf in g) sends the whole call to the masked form.
    """
    B, T, H = g.shape
    acc = state_dtype_for(g.dtype)
    n_chunks = math.ceil(T / chunk_size)
    pad = n_chunks * chunk_size - T
    totals = F.pad(g.to(acc), (0, 0, 0, pad)).unflatten(1, (n_chunks, chunk_size)).sum(2)  # [B, N, H]
    return DecayForm.FACTORED if bool(-totals.min() <= factored_span_limit(acc)) else DecayForm.MASKED


def _chunks_into(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype, factor=None) -> torch.Tensor:
    """[B, T, H, F] -> [B, H, N, C, F] in ``dtype`` (times ``factor``, [B, H, N, C] or a float), one pass.

    The permute, the dtype conversion and the scaling are a single elementwise pass writing a
    contiguous buffer; time is zero-padded to N * C steps (a copy of x only when T is ragged).
    """
    B, T, H, width = x.shape
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    view = x.unflatten(1, (n_chunks, chunk)).permute(0, 3, 1, 2, 4)
    out = torch.empty(view.shape, dtype=dtype, device=x.device)
    if factor is None:
        return out.copy_(view)
    return torch.mul(view, factor.unsqueeze(-1) if isinstance(factor, torch.Tensor) else factor, out=out)


def _unchunk_into(x: torch.Tensor, T: int, dtype: torch.dtype, factor: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, C, F] (times ``factor``, [B, H, N, C]) -> [B, T, H, F] in ``dtype``, one pass."""
    B, H, N, C, width = x.shape
    out = torch.empty(B, N * C, H, width, dtype=dtype, device=x.device)
    view = out.view(B, N, C, H, width).permute(0, 3, 1, 2, 4)
    if factor is None:
        view.copy_(x)
    else:
        torch.mul(x, factor.unsqueeze(-1), out=view)
    return out[:, :T]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., C, F] x [..., C, F] -> [..., C]: the dot product of matching rows, as one batched matmul."""
    C, width = a.shape[-2:]
    return torch.bmm(a.reshape(-1, 1, width), b.reshape(-1, width, 1)).view(a.shape[:-1])


class _FactoredChunks(torch.autograd.Function):
    """The chunk decomposition with the decay factored into the rows of Q and K (moderate decay only).

    Per chunk (batch dims [B, H, N] left out), with b_i the cumulative log-decay from the chunk
    start and a = exp(b_C)::

        Qs = diag(exp(b - b_C)) Q      Ks = diag(exp(b_C - b)) K      S' = a S_in
        P  = tril(Qs Ks^T) = (Q K^T) * M        O = scale * (P V + Qs S')       S_out = S' + Ks^T V

    so M is never built: the C x C work is one matmul and one in-place ``tril_``. Backward, with
    dO scaled by ``scale`` and dU = dL/dS_out::

        dP = tril(dO V^T)      dQs = dP Ks + dO S'^T      dKs = dP^T Qs + V dU^T      dV = P^T dO + Ks dU
        dS' = Qs^T dO + dU     dS_in = a dS'   (the previous chunk's dU)     d log a = <dS', S'> = <dS_in, S'> / a
        dq = exp(b - b_C) dQs        dk = exp(b_C - b) dKs
        d log-decay: Qs has exponent b_i - b_C = -sum_{t > i} g_t, Ks has b_C - b_j = sum_{t > j} g_t
        and a has b_C = sum_t g_t, so with dr_i = dQs_i . Qs_i and ds_j = dKs_j . Ks_j:
        dg_t = sum_{j < t} (ds_j - dr_j) + <dS', S'>
        (dr and ds are taken before the diagonal of dP is added to dQs and dKs: P_ii does not
        depend on g, and its terms would cancel in ds_i - dr_i only up to rounding)
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
        T = q.shape[1]
        acc = state_dtype_for(q.dtype)
        N, C = math.ceil(T / chunk), chunk
        b = _to_chunks(g.unsqueeze(-1), N, C, acc).squeeze(-1).cumsum(-1)  # [B, H, N, C]
        b_last = b[..., -1:]
        q_factor = (b - b_last).exp_()  # [B, H, N, C], in [1, exp(span)]
        k_factor = (b_last - b).exp_()  # [B, H, N, C], in [exp(-span), 1]
        chunk_decay = b_last.exp().unsqueeze(-1)  # a = exp(b_C): [B, H, N, 1, 1]
        qs = _chunks_into(q, N, C, acc, q_factor)  # [B, H, N, C, D]
        ks = _chunks_into(k, N, C, acc, k_factor)  # [B, H, N, C, D]
        v_c = _chunks_into(v, N, C, acc)  # [B, H, N, C, E]

        # S'_n = a_n S_n (the scaled state entering chunk n): S'_{n+1} = a_{n+1} S'_n + a_{n+1} U_n
        update = _bmm(ks.transpose(-1, -2), v_c)  # U = Ks^T V: [B, H, N, D, E]
        entering = torch.empty_like(update)  # S': [B, H, N, D, E]
        if initial_state is None:
            entering[:, :, 0].zero_()
        else:
            torch.mul(initial_state, chunk_decay[:, :, 0], out=entering[:, :, 0])
        final = entering[:, :, -1] + update[:, :, -1] if N == 1 else None
        update[:, :, :-1] *= chunk_decay[:, :, 1:]
        for n in range(1, N):
            torch.addcmul(update[:, :, n - 1], chunk_decay[:, :, n], entering[:, :, n - 1], out=entering[:, :, n])
        if final is None:
            final = entering[:, :, -1] + update[:, :, -1]

        p = _bmm(qs, ks.transpose(-1, -2)).tril_()  # (Q K^T) * M: [B, H, N, C, C]
        o = _bmm(p, v_c, alpha=scale)
        _bmm(qs, entering, alpha=scale, add=o, inplace=True)
        ctx.save_for_backward(qs, ks, v_c, p, entering, chunk_decay, q_factor, k_factor)
        ctx.sizes = (T, scale, q.dtype, initial_state is not None)
        return _unchunk_into(o, T, q.dtype), final

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o: torch.Tensor, d_final: torch.Tensor):  # type: ignore[override]
        qs, ks, v_c, p, entering, chunk_decay, q_factor, k_factor = ctx.saved_tensors
        T, scale, in_dtype, has_initial = ctx.sizes
        acc = qs.dtype
        N, C = qs.shape[2:4]
        d_out = _chunks_into(d_o, N, C, acc, None if scale == 1.0 else scale)  # scale * dO: [B, H, N, C, E]

        # the state pass, backwards: d_state[n] = dL/dS_n for n = 0 .. N (S_N = final state), so
        # dU_n = d_state[n + 1] and d_state[n] = a_n dS'_n = a_n (Qs^T dO)_n + a_n d_state[n + 1]
        B, H = qs.shape[:2]
        d_state = qs.new_empty(B, H, N + 1, *entering.shape[-2:])
        d_state[:, :, -1].copy_(d_final)
        d_from_out = _bmm(qs.transpose(-1, -2), d_out).mul_(chunk_decay)  # a Qs^T dO: [B, H, N, D, E]
        for n in range(N - 1, -1, -1):
            torch.addcmul(d_from_out[:, :, n], chunk_decay[:, :, n], d_state[:, :, n + 1], out=d_state[:, :, n])
        d_initial = d_state[:, :, 0].to(in_dtype) if has_initial else None
        d_leaving = d_state[:, :, 1:]

        # dP without its diagonal first: P_ii = q_i . k_i does not depend on g, and its O(1) terms
        # would enter dr_i and ds_i alike and cancel in ds - dr only up to rounding
        d_p = _bmm(d_out, v_c.transpose(-1, -2)).tril_(-1)  # [B, H, N, C, C], strictly lower
        d_p_diag = _rowdot(d_out, v_c).unsqueeze(-1)  # dP_ii: [B, H, N, C, 1]
        d_qs = _bmm(d_out, entering.transpose(-1, -2))
        _bmm(d_p, ks, add=d_qs, inplace=True)
        d_ks = _bmm(v_c, d_leaving.transpose(-1, -2))
        _bmm(d_p.transpose(-1, -2), qs, add=d_ks, inplace=True)
        d_exponent = _rowdot(d_ks, ks) - _rowdot(d_qs, qs)  # ds - dr: [B, H, N, C]
        d_qs.addcmul_(d_p_diag, ks)
        d_ks.addcmul_(d_p_diag, qs)
        d_v = _bmm(ks, d_leaving)
        _bmm(p.transpose(-1, -2), d_out, add=d_v, inplace=True)

        # <dS', S'> = <dS_in, S'> / a, a >= exp(-factored_span_limit): [B, H, N, 1]
        d_log_decay = (d_state[:, :, :-1] * entering).sum((-1, -2)).unsqueeze(-1) / chunk_decay[..., 0]
        dg = F.pad(d_exponent[..., :-1].cumsum(-1), (1, 0)) + d_log_decay
        return (
            _unchunk_into(d_qs, T, in_dtype, q_factor),
            _unchunk_into(d_ks, T, in_dtype, k_factor),
            _unchunk_into(d_v, T, in_dtype),
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

    and S_out is the next chunk's S_in; the last one is the final state. All chunks' products are
    single batched matmuls over [B, H, N]; only the state hand-over (one fused multiply-add per
    chunk) is a loop. The decay matrix M is applied in one of two forms, chosen per call by
    :func:`decay_form`:

    * FACTORED (every chunk's total decay ``-b_C`` within ``factored_span_limit``, e.g. 29.6
      nats in float32): ``exp(Gamma_ij) = exp(b_i - b_C) exp(b_C - b_j)`` is folded into the rows
      of Q and K while they are copied into the chunk layout, so ``(Q K^T) * M`` is one matmul and
      one in-place ``tril_``; no C x C exp, cumsum or mask pass (``_FactoredChunks``).
    * MASKED (any chunk beyond the limit, or -inf / NaN in g): ``Gamma`` is built per chunk and
      masked to -inf above the diagonal before the exp (see ``_causal_decay``), so very strong
      decay (g = -60 per step) underflows to exact zeros, never inf or NaN, in values and
      gradients (``_MaskedChunks``).

    A ragged last chunk is padded with q = k = v = 0 and g = 0: a padded step multiplies the state
    by exp(0) = 1 and adds 0, so the final state is unchanged; padded outputs are dropped.

    Arithmetic, the state and the cumulative log-decay are in ``state_dtype_for(q.dtype)``
    (float32 accumulation for bf16/fp16). Differentiable once in q, k, v, g and initial_state
    (hand-written backward, formulas in ``_FactoredChunks`` and ``_MaskedChunks``); inputs may be
    non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state)
    _check_chunk_size(chunk_size)
    chunk = min(chunk_size, T)
    kernel = _FactoredChunks if decay_form(g, chunk) is DecayForm.FACTORED else _MaskedChunks
    return kernel.apply(q, k, v, g, initial_state, scale, chunk)
