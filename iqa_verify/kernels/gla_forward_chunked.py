"""Gated linear attention (family ``gla-forward``): the chunked kernel with a hand-written backward.

Same contract and result as :func:`iqa_verify.kernels.gla_forward_recurrent.gla_forward_recurrent`,
computed with batched matrix products over chunks of ``chunk_size`` steps; only the hand-over of the
state from one chunk to the next is a loop (forward and backward). The intra-chunk scores come in one
of two forms (:class:`GateForm`, chosen per call by :func:`gate_form`), see
:mod:`iqa_verify.kernels.gla_forward_intra`.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from iqa_verify.contracts import check_gla_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.chunks import batched_matmul, from_chunk_layout, to_chunk_layout
from iqa_verify.kernels.gla_forward_intra import (
    factored_scores,
    factored_scores_backward,
    masked_scores,
    masked_scores_backward,
)
from iqa_verify.kernels.la_forward_chunked import factored_span_limit

__all__ = ["DEFAULT_CHUNK_SIZE", "MASKED_CHUNK_SIZE", "GateForm", "chunk_plan", "gate_form", "gla_forward_chunked"]

DEFAULT_CHUNK_SIZE = 64
MASKED_CHUNK_SIZE = 16
"""Largest chunk of the MASKED form: its work and memory per step grow with the chunk (C * D per step)."""


class GateForm(enum.Enum):
    """How a call builds the intra-chunk scores (chosen per call by :func:`gate_form`)."""

    FACTORED = "exp(b_id - b_jd) folded into the rows of Q and K: one matmul per chunk"
    MASKED = "the [C, C, D] masked decay built from segment sums in log space (any gate, however strong)"


def gate_form(g: torch.Tensor, chunk_size: int) -> GateForm:
    """FACTORED when every chunk's total log gate ``-sum_chunk g_d`` (every dimension d) is within
    :func:`~iqa_verify.kernels.la_forward_chunked.factored_span_limit`, else MASKED. g: [B, T, H, D]."""
    T = g.shape[1]
    acc = state_dtype_for(g.dtype)
    n_chunks = math.ceil(T / chunk_size)
    pad = n_chunks * chunk_size - T
    totals = F.pad(g.to(acc), (0, 0, 0, 0, 0, pad)).unflatten(1, (n_chunks, chunk_size)).sum(2)
    return GateForm.FACTORED if bool(-totals.min() <= factored_span_limit(acc)) else GateForm.MASKED


def chunk_plan(g: torch.Tensor, chunk: int) -> tuple[GateForm, int]:
    """The form and chunk size of a call: FACTORED at the largest of chunk, chunk / 2, ... (not below
    ``MASKED_CHUNK_SIZE``) whose spans are all within the limit (strong gates: shorter chunks keep the fast
    form), else MASKED at ``min(chunk, MASKED_CHUNK_SIZE)``. g: [B, T, H, D]."""
    size = chunk
    while True:
        if gate_form(g, size) is GateForm.FACTORED:
            return GateForm.FACTORED, size
        if size // 2 < MASKED_CHUNK_SIZE:
            return GateForm.MASKED, min(chunk, MASKED_CHUNK_SIZE)
        size //= 2


def _prefix_suffix(gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk ([..., C, D]), b_i = sum_{t <= i} g_t and c_j = sum_{t > j} g_t: both direct sums of gates (one
    sign, never a difference of cumulative sums), as one batched matmul with 0/1 triangular matrices."""
    C = gc.shape[-2]
    ones = torch.ones(C, C, dtype=gc.dtype, device=gc.device)
    both = torch.cat([ones.tril(), ones.triu(1)])  # [2C, C]: rows of b, then rows of c
    sums = torch.matmul(both, gc)  # [..., 2C, D]
    return sums[..., :C, :], sums[..., C:, :]


class _GLAChunks(torch.autograd.Function):
    """Per chunk (batch dims [B, H, N] left out), with b, c as in :func:`_prefix_suffix` and a = exp(b_C)::

        Qe = Q ⊙ exp(b)      Ke = K ⊙ exp(c)      A = scores (lower triangular, see gla_forward_intra)
        O  = scale * (A V + Qe S_in)             S_out = diag(a) S_in + Ke^T V

    Backward, with dO scaled by ``scale`` and dU = dL/dS_out (= dS_in of the next chunk)::

        dA = tril(dO V^T)    dV = A^T dO + Ke dU    dQe = dO S_in^T    dKe = V dU^T
        dS_in = Qe^T dO + diag(a) dU
        dq = dQe ⊙ exp(b) + dq_A      dk = dKe ⊙ exp(c) + dk_A
        dg_t = sum_{i >= t} dQe_i ⊙ Qe_i + sum_{j < t} dKe_j ⊙ Ke_j + a ⊙ rowsum(dU ⊙ S_in) + dg_A

    (dq_A, dk_A, dg_A: the scores' own backward). Every term of dg is a sum of products of the
    quantities the forward formed, no cumulative sums are subtracted.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q, k, v, g, initial_state, scale: float, chunk: int, form: GateForm):  # type: ignore[override]
        B, T, H, D = q.shape
        E = v.shape[-1]
        acc = state_dtype_for(q.dtype)
        N = math.ceil(T / chunk)
        qc, kc, gc = (to_chunk_layout(x, N, chunk, acc) for x in (q, k, g))  # [B, H, N, C, D]
        # a gate of -inf (a full reset) becomes the most negative sum-safe number: exp() is 0 either way, and
        # the triangular matmul of _prefix_suffix would turn 0 * -inf into NaN (out of place: gc may view g)
        gc = gc.clamp(min=torch.finfo(acc).min / (2 * chunk))
        vc = to_chunk_layout(v, N, chunk, acc)  # [B, H, N, C, E]
        b, c = _prefix_suffix(gc)
        exp_b, exp_c = b.exp(), c.exp()
        qe, ke = qc * exp_b, kc * exp_c
        a = b[..., -1, :].exp().unsqueeze(-1)  # [B, H, N, D, 1]
        update = batched_matmul(ke.transpose(-1, -2), vc)  # Ke^T V: [B, H, N, D, E]
        entering = torch.empty_like(update)  # S_in per chunk
        if initial_state is None:
            entering[:, :, 0].zero_()
        else:
            entering[:, :, 0].copy_(initial_state)
        for n in range(1, N):
            torch.addcmul(update[:, :, n - 1], a[:, :, n - 1], entering[:, :, n - 1], out=entering[:, :, n])
        final = torch.addcmul(update[:, :, -1], a[:, :, -1], entering[:, :, -1])
        if form is GateForm.FACTORED:
            scores, qs = factored_scores(qc, ke, exp_c)
        else:
            scores, qs = masked_scores(qc, kc, gc), None
        o = batched_matmul(scores, vc, alpha=scale)
        batched_matmul(qe, entering, alpha=scale, add=o, inplace=True)
        ctx.save_for_backward(qc, kc, gc, vc, qe, ke, exp_b, exp_c, a, scores, entering, qs)
        ctx.sizes = (T, scale, q.dtype, initial_state is not None, form)
        return from_chunk_layout(o, T, q.dtype), final

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o: torch.Tensor, d_final: torch.Tensor):  # type: ignore[override]
        qc, kc, gc, vc, qe, ke, exp_b, exp_c, a, scores, entering, qs = ctx.saved_tensors
        T, scale, in_dtype, has_initial, form = ctx.sizes
        acc = qc.dtype
        B, H, N, C, D = qc.shape
        d_out = to_chunk_layout(d_o, N, C, acc) * scale  # [B, H, N, C, E]
        d_state = entering.new_empty(B, H, N + 1, *entering.shape[-2:])  # dL/dS_in per chunk, then the final one
        d_state[:, :, -1].copy_(d_final)
        from_out = batched_matmul(qe.transpose(-1, -2), d_out)  # Qe^T dO
        for n in range(N - 1, -1, -1):
            torch.addcmul(from_out[:, :, n], a[:, :, n], d_state[:, :, n + 1], out=d_state[:, :, n])
        d_leaving = d_state[:, :, 1:]  # dU per chunk
        d_scores = batched_matmul(d_out, vc.transpose(-1, -2)).tril_()  # [B, H, N, C, C]
        d_v = batched_matmul(ke, d_leaving)
        batched_matmul(scores.transpose(-1, -2), d_out, add=d_v, inplace=True)
        d_qe = batched_matmul(d_out, entering.transpose(-1, -2))  # [B, H, N, C, D]
        d_ke = batched_matmul(vc, d_leaving.transpose(-1, -2))  # [B, H, N, C, D]
        from_qe = (d_qe * qe).flip(-2).cumsum(-2).flip(-2)  # sum_{i >= t}
        from_ke = F.pad((d_ke * ke).cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # sum_{j < t}
        from_total = (a * (d_leaving * entering).sum(-1, keepdim=True)).transpose(-1, -2)  # [B, H, N, 1, D]
        if form is GateForm.FACTORED:
            d_q_scores, d_ks, d_g_scores = factored_scores_backward(d_scores, qs, ke, exp_c)
            d_k = (d_ke + d_ks) * exp_c
        else:
            d_q_scores, d_k_scores, d_g_scores = masked_scores_backward(d_scores, qc, kc, gc)
            d_k = torch.addcmul(d_k_scores, d_ke, exp_c)
        d_q = torch.addcmul(d_q_scores, d_qe, exp_b)
        d_g = from_qe + from_ke + from_total + d_g_scores
        d_initial = d_state[:, :, 0].to(in_dtype) if has_initial else None
        unchunk = lambda x: from_chunk_layout(x, T, in_dtype)  # noqa: E731
        return unchunk(d_q), unchunk(d_k), unchunk(d_v), unchunk(d_g), d_initial, None, None, None


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise IqaVerifyError(f"chunk_size={chunk_size!r}: chunk size must be an integer")
    check_at_least("chunk_size", chunk_size, 1, "chunk size")


def gla_forward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention computed chunk by chunk with batched matmuls, hand-written backward.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H, D] log gates, g <= 0 (row d of the state decays by exp(g_{t,d}) at step t).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        chunk_size: steps per chunk C, an integer >= 1 (used as min(chunk_size, T), halved down to
            ``MASKED_CHUNK_SIZE`` while gates are too strong for the FACTORED form, see :func:`chunk_plan`).
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1, initial_state [N, H, D, E]) of N sequences
            ``[cu[i], cu[i+1])`` (SPEC §6). Each sequence is computed by its own chunked call (chunks start at
            the sequence's start, its form and chunk size are chosen from its own gates, the hand-written
            backward runs per sequence); padding outputs are 0 and get no gradient.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16
        inputs, the input dtype otherwise.

    Computes ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``. Per batch, head
    and chunk, with local steps i, j = 1 .. C, ``b_i = sum_{t <= i} g_t``, ``c_j = sum_{t > j} g_t``
    ([C, D] each) and S_in the state entering the chunk::

        o_i   = scale * ( sum_{j <= i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j  +  S_in^T (q_i ⊙ exp(b_i)) )
        S_out = diag(exp(b_C)) S_in + sum_j (k_j ⊙ exp(c_j)) v_j^T

    Every exponential the forward takes has a non-positive argument except the FACTORED scores'
    ``exp(-c)`` (at most ``exp(factored_span_limit)``, see :func:`gate_form`). A ragged last chunk is padded
    with q = k = v = 0 and g = 0 (a padded step leaves the state unchanged). Arithmetic in
    ``state_dtype_for(q.dtype)``; differentiable once in q, k, v, g, initial_state; inputs never modified.
    """
    check_gla_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    _check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return _packed(q, k, v, g, initial_state, scale, chunk_size, [int(c) for c in cu_seqlens.tolist()])
    form, chunk = chunk_plan(g, min(chunk_size, q.shape[1]))
    return _GLAChunks.apply(q, k, v, g, initial_state, scale, chunk, form)


def _packed(q, k, v, g, initial_state, scale: float, chunk_size: int, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked call per sequence of a packed batch; o [1, T, H, E] (0 at padding), final states [N, H, D, E]."""
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        o, state = gla_forward_chunked(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], s0, scale=scale, chunk_size=chunk_size)
        outs.append(o)
        finals.append(state)
    T = q.shape[1]
    if cu[-1] < T:
        outs.append(q.new_zeros(1, T - cu[-1], q.shape[2], v.shape[-1]))
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)
