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

This module holds the entry point and the per-call choice of form (:func:`decay_form`); the two
autograd Functions live in :mod:`iqa_verify.kernels.la_forward_chunked_factored` and
:mod:`iqa_verify.kernels.la_forward_chunked_masked`, their shared chunk-layout helpers in
:mod:`iqa_verify.kernels.chunks`.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.kernels.la_forward_chunked_factored import FactoredChunks
from iqa_verify.kernels.la_forward_chunked_masked import MaskedChunks

__all__ = ["DEFAULT_CHUNK_SIZE", "DecayForm", "decay_form", "factored_span_limit", "la_forward_chunked"]

DEFAULT_CHUNK_SIZE = 64


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise IqaVerifyError(f"chunk_size={chunk_size!r}: chunk size must be an integer")
    check_at_least("chunk_size", chunk_size, 1, "chunk size")


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


def la_forward_chunked(
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
    """Linear attention with per-step scalar decay, computed chunk by chunk with batched matmuls.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H] log-decay, g <= 0 (lambda_t = exp(g_t); g == 0 means no decay).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        chunk_size: steps per chunk C, an integer >= 1 (used as min(chunk_size, T)).
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1, initial_state [N, H, D, E]) of N sequences
            ``[cu[i], cu[i+1])`` (SPEC §6). Each sequence is computed by its own chunked call (chunks start at
            the sequence's start, a short sequence is one short chunk); padding outputs are 0 and get no gradient.

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
      one in-place ``tril_``; no C x C exp, cumsum or mask pass (``FactoredChunks``).
    * MASKED (any chunk beyond the limit, or -inf / NaN in g): ``Gamma`` is built per chunk and
      masked to -inf above the diagonal before the exp (``_causal_decay`` in
      ``la_forward_chunked_masked``), so very strong decay (g = -60 per step) underflows to exact
      zeros, never inf or NaN, in values and gradients (``MaskedChunks``).

    A ragged last chunk is padded with q = k = v = 0 and g = 0: a padded step multiplies the state
    by exp(0) = 1 and adds 0, so the final state is unchanged; padded outputs are dropped.

    Arithmetic, the state and the cumulative log-decay are in ``state_dtype_for(q.dtype)``
    (float32 accumulation for bf16/fp16). Differentiable once in q, k, v, g and initial_state
    (hand-written backward, formulas in ``FactoredChunks`` and ``MaskedChunks``); inputs may be
    non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    _check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return _packed(q, k, v, g, initial_state, scale, chunk_size, [int(c) for c in cu_seqlens.tolist()])
    chunk = min(chunk_size, T)
    kernel = FactoredChunks if decay_form(g, chunk) is DecayForm.FACTORED else MaskedChunks
    return kernel.apply(q, k, v, g, initial_state, scale, chunk)


def _packed(q, k, v, g, initial_state, scale: float, chunk_size: int, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked call per sequence of a packed batch; o [1, T, H, E] (0 at padding), final states [N, H, D, E]."""
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        o, state = la_forward_chunked(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], s0, scale=scale, chunk_size=chunk_size)
        outs.append(o)
        finals.append(state)
    T = q.shape[1]
    if cu[-1] < T:
        outs.append(q.new_zeros(1, T - cu[-1], q.shape[2], v.shape[-1]))
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)
