"""The factored fast path of :func:`iqa_verify.kernels.la_forward_chunked.la_forward_chunked` (``DecayForm.FACTORED``).

For moderate decay (every chunk's total within ``factored_span_limit``): ``exp(Gamma_ij) =
exp(b_i - b_C) exp(b_C - b_j)`` is folded into the rows of Q and K while they are copied into the
chunk layout, so the decay matrix is never built; :class:`FactoredChunks` is the
``torch.autograd.Function`` with the hand-written backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import state_dtype_for
from iqa_verify.kernels.chunks import batched_matmul, from_chunk_layout, to_chunk_layout

__all__ = ["FactoredChunks"]


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


class FactoredChunks(torch.autograd.Function):
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
        b = to_chunk_layout(g.unsqueeze(-1), N, C, acc).squeeze(-1).cumsum(-1)  # [B, H, N, C]
        b_last = b[..., -1:]
        q_factor = (b - b_last).exp_()  # [B, H, N, C], in [1, exp(span)]
        k_factor = (b_last - b).exp_()  # [B, H, N, C], in [exp(-span), 1]
        chunk_decay = b_last.exp().unsqueeze(-1)  # a = exp(b_C): [B, H, N, 1, 1]
        qs = _chunks_into(q, N, C, acc, q_factor)  # [B, H, N, C, D]
        ks = _chunks_into(k, N, C, acc, k_factor)  # [B, H, N, C, D]
        v_c = _chunks_into(v, N, C, acc)  # [B, H, N, C, E]

        # S'_n = a_n S_n (the scaled state entering chunk n): S'_{n+1} = a_{n+1} S'_n + a_{n+1} U_n
        update = batched_matmul(ks.transpose(-1, -2), v_c)  # U = Ks^T V: [B, H, N, D, E]
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

        p = batched_matmul(qs, ks.transpose(-1, -2)).tril_()  # (Q K^T) * M: [B, H, N, C, C]
        o = batched_matmul(p, v_c, alpha=scale)
        batched_matmul(qs, entering, alpha=scale, add=o, inplace=True)
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
        d_from_out = batched_matmul(qs.transpose(-1, -2), d_out).mul_(chunk_decay)  # a Qs^T dO: [B, H, N, D, E]
        for n in range(N - 1, -1, -1):
            torch.addcmul(d_from_out[:, :, n], chunk_decay[:, :, n], d_state[:, :, n + 1], out=d_state[:, :, n])
        d_initial = d_state[:, :, 0].to(in_dtype) if has_initial else None
        d_leaving = d_state[:, :, 1:]

        # dP without its diagonal first: P_ii = q_i . k_i does not depend on g, and its O(1) terms
        # would enter dr_i and ds_i alike and cancel in ds - dr only up to rounding
        d_p = batched_matmul(d_out, v_c.transpose(-1, -2)).tril_(-1)  # [B, H, N, C, C], strictly lower
        d_p_diag = _rowdot(d_out, v_c).unsqueeze(-1)  # dP_ii: [B, H, N, C, 1]
        d_qs = batched_matmul(d_out, entering.transpose(-1, -2))
        batched_matmul(d_p, ks, add=d_qs, inplace=True)
        d_ks = batched_matmul(v_c, d_leaving.transpose(-1, -2))
        batched_matmul(d_p.transpose(-1, -2), qs, add=d_ks, inplace=True)
        d_exponent = _rowdot(d_ks, ks) - _rowdot(d_qs, qs)  # ds - dr: [B, H, N, C]
        d_qs.addcmul_(d_p_diag, ks)
        d_ks.addcmul_(d_p_diag, qs)
        d_v = batched_matmul(ks, d_leaving)
        batched_matmul(p.transpose(-1, -2), d_out, add=d_v, inplace=True)

        # <dS', S'> = <dS_in, S'> / a, a >= exp(-factored_span_limit): [B, H, N, 1]
        d_log_decay = (d_state[:, :, :-1] * entering).sum((-1, -2)).unsqueeze(-1) / chunk_decay[..., 0]
        dg = F.pad(d_exponent[..., :-1].cumsum(-1), (1, 0)) + d_log_decay
        return (
            _unchunk_into(d_qs, T, in_dtype, q_factor),
            _unchunk_into(d_ks, T, in_dtype, k_factor),
            _unchunk_into(d_v, T, in_dtype),
            from_chunk_layout(dg.unsqueeze(-1), T, in_dtype).squeeze(-1),
            d_initial,
            None,
            None,
        )
