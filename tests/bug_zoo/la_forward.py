"""Planted bugs in ``la_forward`` kernels: each must be caught by ``iqa-verify check`` in the ci profile.

Every bug is a plausible mistake (most have shipped in real linear-attention kernels), planted in one of
two small but otherwise correct kernels: a loop over time (:func:`_recurrent`) and a chunked matrix form
(:func:`_chunked`). Each public function here is a kernel with the contract's signature, so a person
can run one by hand::

    iqa-verify check tests/bug_zoo/la_forward.py:scale_ignored --family la-forward
"""

from __future__ import annotations

import math

import torch

from iqa_verify.contracts import state_dtype_for
from tests.bug_zoo.planted import PlantedBug
from tests.correct_kernels.la_forward import identity_dg_kernel

__all__ = ["BUGS"]


def _recurrent(q, k, v, g, initial_state, scale, bug: str = ""):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T; o_t = scale S_t^T q_t, with ``bug`` planted."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = q.dtype if bug == "state-in-input-dtype" else state_dtype_for(q.dtype)
    if bug == "heads-mixed":  # reshape where a transpose was meant: mixes heads and time when H > 1
        qh, kh, vh, gh = (x.reshape(B, H, T, *x.shape[3:]) for x in (q, k, v, g))
    else:
        qh, kh, vh, gh = (x.transpose(1, 2) for x in (q, k, v, g))
    qh, kh, vh, gh = (x.to(acc) for x in (qh, kh, vh, gh))
    if bug == "key-dims-32":  # a tiled key loop whose bound is the tile, not D: dims >= 32 never enter the state
        kh = kh * (torch.arange(D, device=q.device) < 32).to(acc)
    if bug == "decay-not-differentiated":
        gh = gh.detach()
    if initial_state is None:
        S = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    else:
        S = initial_state.to(acc)
        if bug == "sequences-mixed":  # every sequence starts from the first sequence's state
            S = S[:1].expand_as(S)
        if bug == "initial-state-not-differentiated":
            S = S.detach()
    outs = []
    for t in range(T):
        decay = torch.exp(gh[:, :, t])[..., None, None]
        kv = kh[:, :, t, :, None] * vh[:, :, t, None, :]
        if bug == "decay-after-update":
            S = decay * (S + kv)
        elif bug == "initial-state-not-decayed" and t == 0:
            S = S + kv
        else:
            S = decay * S + kv
        o_t = (S * qh[:, :, t, :, None]).sum(-2)
        outs.append(o_t if bug == "scale-ignored" else scale * o_t)
    o = torch.stack(outs, dim=1)  # [B, T, H, E]
    final = S
    if bug == "final-state-transposed":
        final = S.transpose(-1, -2).reshape(B, H, D, E)
    return o.to(q.dtype), final.to(state_dtype_for(q.dtype))


def _chunked(q, k, v, g, initial_state, scale, bug: str = "", chunk: int = 16):
    """Chunked matrix form with ``bug`` planted: per chunk, intra-chunk (Q K^T ⊙ M) V plus the carried
    state, M_ij = exp(b_i - b_j) from a within-chunk cumulative sum b."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh = (x.transpose(1, 2).to(acc) for x in (q, k, v))  # [B, H, T, *]
    gh = g.transpose(1, 2)
    gh = gh.to(acc) if bug != "cumsum-in-input-dtype" else gh
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    n_chunks = T // chunk if bug == "last-partial-chunk-dropped" else math.ceil(T / chunk)
    o = torch.empty(B, H, T, E, dtype=acc, device=q.device)
    if bug == "last-partial-chunk-dropped":
        o.zero_()
    for n in range(n_chunks):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl]
        C = Qc.shape[2]
        if bug == "ragged-chunk-read-past-end" and C < chunk:
            # pad the ragged last chunk with scratch memory instead of zeros
            pad = torch.empty(B, H, chunk - C, D, dtype=acc, device=q.device)
            Kc = torch.cat([Kc, pad], dim=2)
            Vc = torch.cat([Vc, torch.empty(B, H, chunk - C, E, dtype=acc, device=q.device)], dim=2)
            gc = torch.cat([gh[:, :, sl], torch.zeros(B, H, chunk - C, dtype=gh.dtype, device=q.device)], dim=2)
            Qc = torch.cat([Qc, torch.zeros(B, H, chunk - C, D, dtype=acc, device=q.device)], dim=2)
        else:
            gc = gh[:, :, sl]
        b = gc.cumsum(-1).to(acc)  # [B, H, C']
        L = b.shape[-1]
        lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        if bug == "decay-ratio-of-cumprod":
            alpha = torch.exp(b)
            M = torch.where(lower, alpha[..., :, None] / alpha[..., None, :], torch.zeros((), dtype=acc))
        else:
            M = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        oc = ((Qc @ Kc.transpose(-1, -2)) * M) @ Vc + torch.exp(b)[..., None] * (Qc @ S)
        o[:, :, sl] = oc[:, :, :C]
        to_end = torch.exp(b[..., -1:] - b)
        S = torch.exp(b[..., -1])[..., None, None] * S + (Kc * to_end[..., None]).transpose(-1, -2) @ Vc
    return (scale * o).transpose(1, 2).to(q.dtype), S


_FACTORED_SPAN = 20.0  # nats: the factored form's exp(b_i - b_C) stays far from float32 overflow (88) below it


def _chunk_forms(q, k, v, g, initial_state, scale, bug: str = "", chunk: int = 64):
    """Chunked kernel with the two decay forms of real kernels, ``bug`` planted: per chunk, FACTORED
    ``(Q exp(b - b_C)) (K exp(b_C - b))^T`` masked to the lower triangle when the chunk's total log-decay
    ``-b_C`` is at most ``_FACTORED_SPAN`` (else exp(b_i - b_C) overflows), MASKED ``(Q K^T) * exp(b_i - b_j)``
    otherwise; b is the within-chunk cumulative log-decay."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh, gh = (x.transpose(1, 2).to(acc) for x in (q, k, v, g))  # [B, H, T, *]
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    o = torch.zeros(B, H, T, E, dtype=acc, device=q.device)
    n_chunks = math.ceil(T / chunk)
    if bug == "form-from-first-sequence":  # one decision for the batch, from sequence 0's chunks
        first = torch.nn.functional.pad(gh[0], (0, n_chunks * chunk - T)).unflatten(-1, (n_chunks, chunk)).sum(-1)
        all_factored = bool((-first <= _FACTORED_SPAN).all())
    for n in range(n_chunks):
        start = n * chunk
        C = min(chunk, T - start)
        src = start % 1024 if bug == "offsets-wrap" else start  # chunk offsets kept in a 10-bit field
        sl = slice(src, src + C)
        Qc, Kc, Vc, gc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], gh[:, :, sl]
        b = gc.cumsum(-1)
        if bug == "form-from-first-gate":  # the span estimated from the chunk's first gate
            factored = bool((-gc[..., 0] * C <= _FACTORED_SPAN).all())
        elif bug == "form-from-first-sequence":
            factored = all_factored
        else:
            factored = bool((-b[..., -1] <= _FACTORED_SPAN).all())
        if factored:
            b_end = b[..., -1:]
            scores = ((Qc * torch.exp(b - b_end)[..., None]) @ (Kc * torch.exp(b_end - b)[..., None]).transpose(-1, -2)).tril()
        else:
            lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            scores = (Qc @ Kc.transpose(-1, -2)) * torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        o[:, :, start:start + C] = scores @ Vc + torch.exp(b)[..., None] * (Qc @ S)
        S = torch.exp(b[..., -1])[..., None, None] * S + (Kc * torch.exp(b[..., -1:] - b)[..., None]).transpose(-1, -2) @ Vc
    return (scale * o).transpose(1, 2).to(q.dtype), S


# ------------------------------------------------------------------ the zoo: one kernel per bug


def scale_ignored(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "scale-ignored")


def decay_after_update(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "decay-after-update")


def initial_state_not_decayed(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "initial-state-not-decayed")


def final_state_transposed(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "final-state-transposed")


def state_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "state-in-input-dtype")


def heads_mixed(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "heads-mixed")


def sequences_mixed(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "sequences-mixed")


def decay_not_differentiated(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "decay-not-differentiated")


def initial_state_not_differentiated(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "initial-state-not-differentiated")


def last_partial_chunk_dropped(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "last-partial-chunk-dropped")


def decay_ratio_of_cumprod(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "decay-ratio-of-cumprod")


def cumsum_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "cumsum-in-input-dtype")


def ragged_chunk_read_past_end(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "ragged-chunk-read-past-end")


def scales_values_in_place(q, k, v, g, initial_state=None, *, scale=1.0):
    """Folds the scale into v in place: `.to(float32)` is a no-op for float32 inputs, so the caller's v changes."""
    v_acc = v.to(state_dtype_for(v.dtype))
    with torch.no_grad():
        v_acc.mul_(scale)
    return _chunked(q, k, v_acc, g, initial_state, 1.0)


_STREAM_CACHE: dict[tuple, torch.Tensor] = {}


def state_cached_across_calls(q, k, v, g, initial_state=None, *, scale=1.0):
    """A 'streaming' kernel that resumes from the previous call's final state when none is given."""
    key = (tuple(q.shape), tuple(v.shape), q.dtype, q.device)
    if initial_state is None and key in _STREAM_CACHE:
        initial_state = _STREAM_CACHE[key].to(q.dtype)
    o, S = _chunked(q, k, v, g, initial_state, scale)
    _STREAM_CACHE[key] = S.detach()
    return o, S


def output_in_accumulation_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    """Returns o in float32 for bf16/fp16 inputs (forgets the final cast)."""
    o, S = _chunked(q, k, v, g, initial_state, scale)
    return o.to(state_dtype_for(q.dtype)), S


def key_loop_first_32_dims(q, k, v, g, initial_state=None, *, scale=1.0):
    """The key loop covers the first 32 key dimensions only (one tile): right for every D <= 32."""
    return _recurrent(q, k, v, g, initial_state, scale, "key-dims-32")


class _ContiguousCotangentAssumed(torch.autograd.Function):
    """Recurrent forward; the backward reads the final-state cotangent ``dht`` as if it were contiguous
    (the raw storage with contiguous strides), like a Triton backward that is handed ``dht.data_ptr()``
    without a ``.contiguous()`` (fla #1138: a non-contiguous dht gave a wrong dh0)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale):
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale = scale
        with torch.no_grad():
            return _recurrent(q, k, v, g, initial_state, scale)

    @staticmethod
    def backward(ctx, do, dht):
        saved = ctx.saved_tensors
        leaves = [t.detach().requires_grad_() if t is not None else None for t in saved]
        shape = dht.shape
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        storage = torch.empty(0, dtype=dht.dtype, device=dht.device).set_(dht.untyped_storage())
        need = dht.storage_offset() + dht.numel()
        flat = torch.cat([storage, storage.new_zeros(max(0, need - storage.numel()))])
        dht_read = flat.as_strided(shape, strides, dht.storage_offset())
        with torch.enable_grad():
            o, S = _recurrent(*leaves, ctx.scale)
            wrt = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad((o, S), wrt, (do, dht_read), allow_unused=True))
        return (*[next(grads) if t is not None else None for t in leaves], None)


def cotangent_read_as_contiguous(q, k, v, g, initial_state=None, *, scale=1.0):
    """A hand-written backward that reads the final-state cotangent as if contiguous."""
    return _ContiguousCotangentAssumed.apply(q, k, v, g, initial_state, scale)


def offsets_wrap_after_1024(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chunk offsets wrap after 1024 steps (16 chunks of 64): right for every T <= 1024 (cf. fla #1080)."""
    return _chunk_forms(q, k, v, g, initial_state, scale, "offsets-wrap")


def decay_form_from_first_gate(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chooses the factored decay form from the chunk's first gate: strong gates later in a chunk that
    starts mild overflow exp(b_i - b_C) and turn the chunk's earlier outputs to NaN (cf. fla PR #1244)."""
    return _chunk_forms(q, k, v, g, initial_state, scale, "form-from-first-gate")


def decay_form_from_first_sequence(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chooses the decay form for the whole batch from sequence 0: a strongly decaying neighbour of a mild
    sequence 0 is run in the factored form and overflows."""
    return _chunk_forms(q, k, v, g, initial_state, scale, "form-from-first-sequence")


def dg_identity_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    """flash-linear-attention's decay gradient (the GLA identity dg_t = sum_{s>=t} q·dq - k·dk, reverse-summed)
    computed in the input dtype: dq, dk rounded to bf16 and the products and the reverse sum in bf16, without
    float32 accumulation. Its error is eps_bf16 times the terms, 2^16 times what the identity in float32 makes:
    only a natural-scale bound admits the float32 identity (tests/correct_kernels) and still catches this."""
    return identity_dg_kernel(q, k, v, g, initial_state, scale=scale, dg_dtype=q.dtype)


def _bug(kernel: str, dtype: str, caught_by: tuple[str, ...], kind: str) -> PlantedBug:
    return PlantedBug(__file__, "la-forward", kernel, dtype, caught_by, kind)


def _p(name: str) -> str:
    return f"la-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    _bug("scale_ignored", "float32", (_p("values"), _p("gradients")), "scale != 1 untested"),
    _bug("decay_after_update", "float32", (_p("values"),), "decay applied to the new key-value too"),
    _bug("initial_state_not_decayed", "float32", (_p("values"),), "wrong initial state: first decay skipped"),
    _bug("final_state_transposed", "float32", (_p("values"),), "wrong final state: [E, D] read as [D, E]"),
    _bug("state_in_input_dtype", "bfloat16", (_p("values"),), "state accumulated in bf16"),
    _bug("heads_mixed", "float32", (_p("values"),), "mixing heads: reshape instead of transpose"),
    _bug("sequences_mixed", "float32", (_p("values"),), "mixing sequences: batch 0's initial state for all"),
    _bug("decay_not_differentiated", "float32", (_p("gradients"),), "wrong decay gradient (dg = 0)"),
    _bug("initial_state_not_differentiated", "float32", (_p("gradients"),), "no gradient to the initial state"),
    _bug("last_partial_chunk_dropped", "float32", (_p("values"),), "the last partial chunk"),
    _bug("decay_ratio_of_cumprod", "float32", (_p("finite"), _p("values")), "NaN from strong decay (0/0)"),
    _bug("cumsum_in_input_dtype", "bfloat16", (_p("values"),), "low-precision accumulation of the log-decay"),
    _bug("ragged_chunk_read_past_end", "float32", (_p("no-uninit-reads"),), "ragged chunk padded with scratch memory"),
    _bug("scales_values_in_place", "float32", (_p("inputs-unchanged"),), "modifies its input v in place"),
    _bug("state_cached_across_calls", "float32", (_p("deterministic"),), "hidden state carried across calls"),
    _bug("output_in_accumulation_dtype", "bfloat16", (_p("contract"),), "returns float32 o for bf16 inputs"),
    _bug("key_loop_first_32_dims", "float32", (_p("values"),), "key loop covers the first 32 head dims only"),
    _bug("cotangent_read_as_contiguous", "float32", (_p("gradients"),), "backward reads dht as contiguous"),
    _bug("offsets_wrap_after_1024", "float32", (_p("state-handoff"),), "chunk offsets wrap past 1024 steps"),
    _bug("decay_form_from_first_gate", "float32", (_p("causality"),), "later gates change earlier outputs"),
    _bug("decay_form_from_first_sequence", "float32", (_p("sequence-independence"),),
         "one batch-wide decision from sequence 0"),
    _bug("dg_identity_in_input_dtype", "bfloat16", (_p("gradients"),),
         "decay gradient by the GLA identity summed in bf16 (no float32 accumulation)"),
)
