"""Planted bugs in ``gla_forward`` kernels: each must be caught by ``iqa-verify check`` in the ci profile.

Every bug is a plausible mistake in a per-key-dimension gated kernel, planted in one of two small but
otherwise correct kernels: a loop over time (:func:`_recurrent`) and a chunked form (:func:`_chunked`).
Each public function is a kernel with the contract's signature, runnable by hand::

    iqa-verify check tests/bug_zoo/gla_forward.py:gate_after_update --family gla-forward
"""

from __future__ import annotations

import math

import torch

from iqa_verify.contracts import state_dtype_for
from tests.bug_zoo.planted import PlantedBug
from tests.correct_kernels.gla_forward import identity_dg_kernel

__all__ = ["BUGS"]


def _recurrent(q, k, v, g, initial_state, scale, bug: str = ""):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T; o_t = scale S_t^T q_t, with ``bug`` planted."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = q.dtype if bug == "state-in-input-dtype" else state_dtype_for(q.dtype)
    qh, kh, vh, gh = (x.transpose(1, 2).to(acc) for x in (q, k, v, g))  # [B, H, T, *]
    if bug == "gate-grad-of-first-dimension-dropped":
        gh = torch.cat([gh[..., :1].detach(), gh[..., 1:]], dim=-1)
    if bug == "gate-averaged-over-dimensions":
        gh = gh.mean(-1, keepdim=True).expand_as(gh)
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    ghost = None
    if bug == "initial-state-gradient-ungated" and initial_state is not None:
        # the values carry S_0 through the gates, but its gradient flows through a zero-valued ungated copy
        ghost = S - S.detach()
        S = S.detach()
    outs = []
    for t in range(T):
        gate = torch.exp(gh[:, :, t])  # [B, H, D]
        kv = kh[:, :, t, :, None] * vh[:, :, t, None, :]
        if bug == "gate-after-update":
            S = gate[..., None] * (S + kv)
        elif bug == "gate-per-value-dimension":  # gates the columns (values) with the first E gates
            col = torch.ones(B, H, E, dtype=acc, device=q.device)
            n = min(D, E)
            col = torch.cat([gate[..., :n], col[..., n:]], dim=-1)
            S = S * col[..., None, :] + kv
        elif bug == "initial-state-not-gated" and t == 0:
            S = S + kv
        else:
            S = gate[..., None] * S + kv
        outs.append(((S if ghost is None else S + ghost) * qh[:, :, t, :, None]).sum(-2))
    o = scale * torch.stack(outs, dim=1)  # [B, T, H, E]
    S = S if ghost is None else S + ghost
    return o.to(q.dtype), S.to(state_dtype_for(q.dtype))


def _chunked(q, k, v, g, initial_state, scale, bug: str = "", chunk: int = 16):
    """Chunked form with ``bug`` planted: per chunk b = cumsum(g) over the chunk ([C, D]);
    A_ij = sum_d q_id k_jd exp(b_id - b_jd) (i >= j, masked to -inf above before the exp); O = scale (A V +
    (Q ⊙ exp(b)) S_in); S_out = diag(exp(b_C)) S_in + (K ⊙ exp(b_C - b))^T V."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh = (x.transpose(1, 2).to(acc) for x in (q, k, v))
    gh = g.transpose(1, 2)
    gh = gh if bug == "gate-cumsum-in-input-dtype" else gh.to(acc)
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    o = torch.empty(B, H, T, E, dtype=acc, device=q.device)
    for n in range(math.ceil(T / chunk)):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl]
        C = Qc.shape[2]
        if bug == "ragged-chunk-padded-with-last-gate" and C < chunk:  # F.pad(mode="replicate") on g only
            gc = torch.cat([gh[:, :, sl], gh[:, :, sl][:, :, -1:].expand(B, H, chunk - C, D)], dim=2)
            Qc, Kc, Vc = (torch.cat([x, x.new_zeros(B, H, chunk - C, x.shape[-1])], dim=2) for x in (Qc, Kc, Vc))
        elif bug == "ragged-chunk-read-past-end" and C < chunk:
            extra = chunk - C
            Qc = torch.cat([Qc, torch.zeros(B, H, extra, D, dtype=acc, device=q.device)], dim=2)
            Kc = torch.cat([Kc, torch.empty(B, H, extra, D, dtype=acc, device=q.device)], dim=2)
            Vc = torch.cat([Vc, torch.empty(B, H, extra, E, dtype=acc, device=q.device)], dim=2)
            gc = torch.cat([gh[:, :, sl], torch.zeros(B, H, extra, D, dtype=gh.dtype, device=q.device)], dim=2)
        else:
            gc = gh[:, :, sl]
        b = gc.cumsum(2).to(acc)  # [B, H, C', D]
        L = b.shape[2]
        lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[:, :, None]
        if bug == "gate-ratio-of-cumprod":
            W = torch.where(lower, torch.exp(b)[:, :, :, None] / torch.exp(b)[:, :, None], torch.zeros((), dtype=acc))
        else:
            W = torch.exp((b[:, :, :, None] - b[:, :, None]).masked_fill(~lower, float("-inf")))
        A = torch.einsum("bhid,bhjd,bhijd->bhij", Qc, Kc, W)
        oc = A @ Vc + (Qc * torch.exp(b)) @ S
        o[:, :, sl] = oc[:, :, :C]
        to_end = torch.exp(b[:, :, -1:] - b)
        carry = S if bug == "chunk-gate-dropped-at-boundary" else torch.exp(b[:, :, -1])[..., None] * S
        S = carry + (Kc * to_end).transpose(-1, -2) @ Vc
    return (scale * o).transpose(1, 2).to(q.dtype), S


_FACTORED_SPAN = 20.0  # nats: the factored form's exp(b_i - b_C) stays far from float32 overflow (88) below it


def _chunk_forms(q, k, v, g, initial_state, scale, bug: str = "", chunk: int = 64):
    """Chunked kernel with the two gate forms of real kernels, ``bug`` planted: per chunk, with b the
    within-chunk cumulative log gate ([C, D]), FACTORED ``(Q exp(b - b_C)) (K exp(b_C - b))^T`` masked to the lower
    triangle when every dimension's total ``-b_C`` is at most ``_FACTORED_SPAN`` (else exp(b_i - b_C) overflows),
    MASKED ``sum_d q_id k_jd exp(b_id - b_jd)`` otherwise."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh, gh = (x.transpose(1, 2).to(acc) for x in (q, k, v, g))  # [B, H, T, *]
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    o = torch.zeros(B, H, T, E, dtype=acc, device=q.device)
    n_chunks = math.ceil(T / chunk)
    if bug == "form-from-first-sequence":  # one decision for the batch, from sequence 0's chunks
        first = torch.nn.functional.pad(gh[0], (0, 0, 0, n_chunks * chunk - T)).unflatten(-2, (n_chunks, chunk)).sum(-2)
        all_factored = bool((-first <= _FACTORED_SPAN).all())
    for n in range(n_chunks):
        start = n * chunk
        C = min(chunk, T - start)
        sl = slice(start, start + C)
        Qc, Kc, Vc, gc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], gh[:, :, sl]
        b = gc.cumsum(-2)  # [B, H, C, D]
        if bug == "form-from-first-gate":  # the span estimated from the chunk's first gate
            factored = bool((-gc[..., 0, :] * C <= _FACTORED_SPAN).all())
        elif bug == "form-from-first-sequence":
            factored = all_factored
        else:
            factored = bool((-b[..., -1, :] <= _FACTORED_SPAN).all())
        if factored:
            b_end = b[..., -1:, :]
            scores = ((Qc * torch.exp(b - b_end)) @ (Kc * torch.exp(b_end - b)).transpose(-1, -2)).tril()
        else:
            lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[:, :, None]
            W = torch.exp((b[..., :, None, :] - b[..., None, :, :]).masked_fill(~lower, float("-inf")))
            scores = torch.einsum("bhid,bhjd,bhijd->bhij", Qc, Kc, W)
        o[:, :, sl] = scores @ Vc + (Qc * torch.exp(b)) @ S
        S = torch.exp(b[..., -1, :])[..., None] * S + (Kc * torch.exp(b[..., -1:, :] - b)).transpose(-1, -2) @ Vc
    return (scale * o).transpose(1, 2).to(q.dtype), S


# ------------------------------------------------------------------ the zoo: one kernel per bug


def gate_after_update(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "gate-after-update")


def gate_per_value_dimension(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "gate-per-value-dimension")


def gate_averaged_over_dimensions(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "gate-averaged-over-dimensions")


def initial_state_not_gated(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "initial-state-not-gated")


def state_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "state-in-input-dtype")


def initial_state_gradient_ungated(q, k, v, g, initial_state=None, *, scale=1.0):
    """Right values; dS_0 summed without the gates (as if the backward forgot diag(exp(b_t)))."""
    return _recurrent(q, k, v, g, initial_state, scale, "initial-state-gradient-ungated")


def gate_grad_of_first_dimension_dropped(q, k, v, g, initial_state=None, *, scale=1.0):
    return _recurrent(q, k, v, g, initial_state, scale, "gate-grad-of-first-dimension-dropped")


def chunk_gate_dropped_at_boundary(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "chunk-gate-dropped-at-boundary")


def gate_ratio_of_cumprod(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "gate-ratio-of-cumprod")


def gate_cumsum_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "gate-cumsum-in-input-dtype")


def ragged_chunk_read_past_end(q, k, v, g, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, g, initial_state, scale, "ragged-chunk-read-past-end")


def gate_exponentiated_in_place(q, k, v, g, initial_state=None, *, scale=1.0):
    """Turns the log gate into the gate in place (`.to(float32)` is a no-op for float32 inputs)."""
    gate = g.to(state_dtype_for(g.dtype))
    with torch.no_grad():
        gate.exp_().log_()  # "round trip" that rewrites the caller's g (log(exp(x)) != x in rounding)
        gate.mul_(1.0 + 2.0 ** -10)
    return _chunked(q, k, v, gate, initial_state, scale)


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


def ragged_chunk_padded_with_last_gate(q, k, v, g, initial_state=None, *, scale=1.0):
    """Pads a ragged last chunk by repeating its last gate (zeros for q, k, v): outputs are right, but the final
    state decays once more per padded step, so a state handed to the next call is wrong."""
    return _chunked(q, k, v, g, initial_state, scale, "ragged-chunk-padded-with-last-gate")


def gate_form_from_first_gate(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chooses the factored gate form from the chunk's first gate: strong gates later in a chunk that starts mild
    overflow exp(b_i - b_C) and turn the chunk's earlier outputs to NaN (cf. fla PR #1244)."""
    return _chunk_forms(q, k, v, g, initial_state, scale, "form-from-first-gate")


def gate_form_from_first_sequence(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chooses the gate form for the whole batch from sequence 0: a strongly gated neighbour of a mild sequence 0
    is run in the factored form and overflows."""
    return _chunk_forms(q, k, v, g, initial_state, scale, "form-from-first-sequence")


def dg_identity_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    """flash-linear-attention's gate gradient (the per-dimension GLA identity dg_td = sum_{s>=t} q_sd dq_sd - k_sd dk_sd,
    reverse-summed) computed in the input dtype: dq, dk rounded to bf16 and the products and the reverse sum in bf16.
    Its error is eps_bf16 times the terms: only a natural-scale bound admits the float32 identity
    (tests/correct_kernels/gla_forward.py) and still catches this."""
    return identity_dg_kernel(q, k, v, g, initial_state, scale=scale, dg_dtype=q.dtype)


def _bug(kernel: str, dtype: str, caught_by: tuple[str, ...], kind: str, says: str = "") -> PlantedBug:
    return PlantedBug(__file__, "gla-forward", kernel, dtype, caught_by, kind, says)


def _p(name: str) -> str:
    return f"gla-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    _bug("gate_after_update", "float32", (_p("values"),), "gate applied on the wrong side of the update"),
    _bug("gate_per_value_dimension", "float32", (_p("values"),), "gate per value dimension instead of key"),
    _bug("gate_averaged_over_dimensions", "float32", (_p("values"),), "per-dimension gates collapsed to a scalar"),
    _bug("initial_state_not_gated", "float32", (_p("values"),), "initial state skips the first gate"),
    _bug("state_in_input_dtype", "bfloat16", (_p("values"),), "state accumulated in bf16"),
    # judged with dS_0's natural scale (the terms it sums): still far outside it
    _bug("initial_state_gradient_ungated", "float32", (_p("gradients"),), "dS_0 summed without the gates",
         "grad/dinitial_state"),
    _bug("gate_grad_of_first_dimension_dropped", "float32", (_p("gradients"),), "dg of one dimension dropped",
         "grad/dg"),
    _bug("chunk_gate_dropped_at_boundary", "float32", (_p("values"),), "state not gated at a chunk boundary"),
    _bug("gate_ratio_of_cumprod", "float32", (_p("finite"),), "0/0 from a ratio of gate products"),
    _bug("gate_cumsum_in_input_dtype", "bfloat16", (_p("values"),), "low-precision cumulative sum of the gates"),
    _bug("ragged_chunk_read_past_end", "float32", (_p("no-uninit-reads"),), "ragged chunk padded with scratch memory"),
    _bug("gate_exponentiated_in_place", "float32", (_p("inputs-unchanged"),), "modifies its input g in place"),
    _bug("state_cached_across_calls", "float32", (_p("deterministic"),), "hidden state carried across calls"),
    _bug("output_in_accumulation_dtype", "bfloat16", (_p("contract"),), "returns float32 o for bf16 inputs"),
    _bug("ragged_chunk_padded_with_last_gate", "float32", (_p("state-handoff"),),
         "final state over-gated by a replicated ragged-chunk padding", "running [0, p) then [p, t)"),
    _bug("gate_form_from_first_gate", "float32", (_p("causality"),), "later gates change earlier outputs",
         "the future leaks into the past"),
    _bug("gate_form_from_first_sequence", "float32", (_p("sequence-independence"),),
         "a batch-wide form decision from sequence 0", "depend on its neighbours"),
)
