"""Planted bugs in ``delta_forward`` kernels: each must be caught by ``iqa-verify check`` in the ci profile.

Bugs are planted in a loop over time (:func:`_recurrent`) and in a chunked WY / UT form (:func:`_chunked`);
each public function is a kernel with the contract's signature::

    iqa-verify check tests/bug_zoo/delta_forward.py:beta_applied_once --family delta-forward
"""

from __future__ import annotations

import math

import torch

from iqa_verify.contracts import state_dtype_for
from tests.bug_zoo.planted import PlantedBug
from tests.correct_kernels.delta_forward import identity_dg_kernel

__all__ = ["BUGS"]


def _recurrent(q, k, v, beta, g, initial_state, scale, bug: str = ""):
    """S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t (v_t - S'^T k_t)^T; o_t = scale S_t^T q_t, with ``bug``."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = q.dtype if bug == "state-in-input-dtype" else state_dtype_for(q.dtype)
    qh, kh, vh, bh = (x.transpose(1, 2).to(acc) for x in (q, k, v, beta))
    if bug == "beta-not-differentiated":
        bh = bh.detach()
    if bug == "keys-normalised-inside":
        kh = kh / kh.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    gh = None if g is None else g.transpose(1, 2).to(acc)
    if gh is not None and bug == "decay-not-differentiated":
        gh = gh.detach()
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    if bug == "initial-state-not-differentiated":
        S = S.detach()
    outs = []
    for t in range(T):
        k_t, b_t = kh[:, :, t], bh[:, :, t, None]
        before = S
        if gh is not None and bug != "decay-after-update":
            S = torch.exp(gh[:, :, t])[..., None, None] * S
        read = before if bug == "prediction-from-undecayed-state" else S
        predicted = (k_t[:, :, None, :] @ read).squeeze(-2)  # [B, H, E]
        if bug == "beta-applied-once":  # beta on the erase only: S' - beta k k^T S' + k v^T
            S = S + k_t[..., None] * (vh[:, :, t] - b_t * predicted)[:, :, None, :]
        else:
            S = S + (b_t * k_t)[..., None] * (vh[:, :, t] - predicted)[:, :, None, :]
        if gh is not None and bug == "decay-after-update":
            S = torch.exp(gh[:, :, t])[..., None, None] * S
        out_state = before if bug == "output-before-update" else S
        outs.append((out_state * qh[:, :, t, :, None]).sum(-2))
    o = scale * torch.stack(outs, dim=1)
    return o.to(q.dtype), S.to(state_dtype_for(q.dtype))


def _chunked(q, k, v, beta, g, initial_state, scale, bug: str = "", chunk: int = 16):
    """WY / UT chunked form with ``bug`` planted. Per chunk, b = cumsum(g) over the chunk, D_tj = exp(b_t - b_j)::

        (I + A) U = diag(beta) (V - diag(exp(b)) K S_in),   A_tj = beta_t D_tj k_t . k_j  (j < t)
        O = scale * (diag(exp(b)) Q S_in + tril(Q K^T ⊙ D) U),   S_out = exp(b_C) S_in + (K ⊙ exp(b_C - b))^T U
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh, bh = (x.transpose(1, 2).to(acc) for x in (q, k, v, beta))
    gh = torch.zeros_like(bh) if g is None else g.transpose(1, 2).to(acc)
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    o = torch.empty(B, H, T, E, dtype=acc, device=q.device)
    for n in range(math.ceil(T / chunk)):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc, Bc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], bh[:, :, sl]
        gc = gh[:, :, sl]
        if bug == "ragged-chunk-padded-with-last-decay" and gc.shape[-1] < chunk:  # F.pad(mode="replicate") on g
            extra = chunk - gc.shape[-1]
            gc = torch.cat([gc, gc[..., -1:].expand(B, H, extra)], dim=-1)
            Qc, Kc, Vc, Bc = (torch.cat([x, x.new_zeros(B, H, extra, *x.shape[3:])], dim=2) for x in (Qc, Kc, Vc, Bc))
        b = gc.cumsum(-1)
        C = b.shape[-1]
        lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        A = (Bc[..., None] * (Kc @ Kc.transpose(-1, -2)) * decay).tril(-1)
        eye = torch.eye(C, dtype=acc, device=q.device)
        carried = torch.exp(b)[..., None] * (Kc @ S)
        if bug == "wy-correction-dropped-at-chunk-boundary" and n > 0:
            carried = torch.zeros_like(carried)  # the new chunk's pseudo-values ignore what the state already holds
        rhs = Bc[..., None] * (Vc - carried)
        U = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        oc = torch.exp(b)[..., None] * (Qc @ S) + ((Qc @ Kc.transpose(-1, -2)) * decay) @ U
        o[:, :, sl] = oc[:, :, : sl.stop - sl.start]
        to_end = torch.exp(b[..., -1:] - b)
        S = torch.exp(b[..., -1])[..., None, None] * S + (Kc * to_end[..., None]).transpose(-1, -2) @ U
    return (scale * o).transpose(1, 2).to(q.dtype), S


_FACTORED_SPAN = 20.0  # nats: the factored form's exp(b_t - b_C) stays far from float32 overflow (88) below it


def _chunk_forms(q, k, v, beta, g, initial_state, scale, bug: str = "", chunk: int = 64):
    """WY / UT chunked kernel with the two decay forms of real kernels, ``bug`` planted: per chunk, with b the
    within-chunk cumulative log-decay, the decay matrix D_tj = exp(b_t - b_j) (t >= j) is FACTORED as
    ``exp(b_t - b_C) exp(b_C - b_j)`` when the chunk's total ``-b_C`` is at most ``_FACTORED_SPAN`` (else
    exp(b_t - b_C) overflows), MASKED (the exponent set to -inf above the diagonal before the exp) otherwise."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qh, kh, vh, bh = (x.transpose(1, 2).to(acc) for x in (q, k, v, beta))
    gh = torch.zeros_like(bh) if g is None else g.transpose(1, 2).to(acc)
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    o = torch.zeros(B, H, T, E, dtype=acc, device=q.device)
    n_chunks = math.ceil(T / chunk)
    if bug == "form-from-first-sequence":  # one decision for the batch, from sequence 0's chunks
        first = torch.nn.functional.pad(gh[0], (0, n_chunks * chunk - T)).unflatten(-1, (n_chunks, chunk)).sum(-1)
        all_factored = bool((-first <= _FACTORED_SPAN).all())
    for n in range(n_chunks):
        start = n * chunk
        C = min(chunk, T - start)
        sl = slice(start, start + C)
        Qc, Kc, Vc, Bc, gc = qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], bh[:, :, sl], gh[:, :, sl]
        b = gc.cumsum(-1)  # [B, H, C]
        if bug == "form-from-first-gate":  # the span estimated from the chunk's first gate
            factored = bool((-gc[..., 0] * C <= _FACTORED_SPAN).all())
        elif bug == "form-from-first-sequence":
            factored = all_factored
        else:
            factored = bool((-b[..., -1] <= _FACTORED_SPAN).all())
        b_end = b[..., -1:]
        if factored:
            decay = (torch.exp(b - b_end)[..., :, None] * torch.exp(b_end - b)[..., None, :]).tril()
        else:
            lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        A = (Bc[..., None] * (Kc @ Kc.transpose(-1, -2)) * decay).tril(-1)
        eye = torch.eye(C, dtype=acc, device=q.device)
        rhs = Bc[..., None] * (Vc - torch.exp(b)[..., None] * (Kc @ S))
        U = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        o[:, :, sl] = torch.exp(b)[..., None] * (Qc @ S) + ((Qc @ Kc.transpose(-1, -2)) * decay) @ U
        S = torch.exp(b_end)[..., None] * S + (Kc * torch.exp(b_end - b)[..., None]).transpose(-1, -2) @ U
    return (scale * o).transpose(1, 2).to(q.dtype), S


# ------------------------------------------------------------------ the zoo: one kernel per bug


def _recurrent_bug(bug: str):
    def kernel(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
        return _recurrent(q, k, v, beta, g, initial_state, scale, bug)

    return kernel


beta_applied_once = _recurrent_bug("beta-applied-once")
decay_after_update = _recurrent_bug("decay-after-update")
prediction_from_undecayed_state = _recurrent_bug("prediction-from-undecayed-state")
output_before_update = _recurrent_bug("output-before-update")
keys_normalised_inside = _recurrent_bug("keys-normalised-inside")
state_in_input_dtype = _recurrent_bug("state-in-input-dtype")
beta_not_differentiated = _recurrent_bug("beta-not-differentiated")
decay_not_differentiated = _recurrent_bug("decay-not-differentiated")
initial_state_not_differentiated = _recurrent_bug("initial-state-not-differentiated")


def wy_correction_dropped_at_chunk_boundary(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    return _chunked(q, k, v, beta, g, initial_state, scale, "wy-correction-dropped-at-chunk-boundary")


def beta_clamped_in_place(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """'Sanitises' beta into (0, 1) in place (`.to(float32)` is a no-op for float32 inputs)."""
    b = beta.to(state_dtype_for(beta.dtype))
    with torch.no_grad():
        b.clamp_(1e-3, 1 - 1e-3)
    return _chunked(q, k, v, b, g, initial_state, scale)


_STREAM_CACHE: dict[tuple, torch.Tensor] = {}


def state_cached_across_calls(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """A 'streaming' kernel that resumes from the previous call's final state when none is given."""
    key = (tuple(q.shape), tuple(v.shape), q.dtype, q.device)
    if initial_state is None and key in _STREAM_CACHE:
        initial_state = _STREAM_CACHE[key].to(q.dtype)
    o, S = _chunked(q, k, v, beta, g, initial_state, scale)
    _STREAM_CACHE[key] = S.detach()
    return o, S


def output_in_accumulation_dtype(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """Returns o in float32 for bf16/fp16 inputs (forgets the final cast)."""
    o, S = _chunked(q, k, v, beta, g, initial_state, scale)
    return o.to(state_dtype_for(q.dtype)), S


def ragged_chunk_padded_with_last_decay(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """Pads a ragged last chunk by repeating its last log-decay (zeros for q, k, v, beta): outputs are right, but
    the final state decays once more per padded step, so a state handed to the next call is wrong."""
    return _chunked(q, k, v, beta, g, initial_state, scale, "ragged-chunk-padded-with-last-decay")


def decay_form_from_first_gate(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """Chooses the factored decay form from the chunk's first log-decay: strong decay later in a chunk that starts
    mild overflows exp(b_t - b_C) and turns the chunk's earlier outputs to NaN (cf. fla PR #1244)."""
    return _chunk_forms(q, k, v, beta, g, initial_state, scale, "form-from-first-gate")


def decay_form_from_first_sequence(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """Chooses the decay form for the whole batch from sequence 0: a strongly decaying neighbour of a mild
    sequence 0 is run in the factored form and overflows."""
    return _chunk_forms(q, k, v, beta, g, initial_state, scale, "form-from-first-sequence")


def dg_identity_in_input_dtype(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """The decay gradient by the identity dg_t = sum_{s>=t} (q_s.dq_s - v_s.dv_s) + <dS_T, S_T> computed in the input
    dtype: dq, dv rounded to bf16 and the products and the reverse sum in bf16. Its error is eps_bf16 times the
    terms: only a natural-scale bound admits the float32 identity (tests/correct_kernels/delta_forward.py) and
    still catches this."""
    return identity_dg_kernel(q, k, v, beta, g, initial_state, scale=scale, dg_dtype=q.dtype)


def _bug(kernel: str, dtype: str, caught_by: tuple[str, ...], kind: str, says: str = "") -> PlantedBug:
    return PlantedBug(__file__, "delta-forward", kernel, dtype, caught_by, kind, says)


def _p(name: str) -> str:
    return f"delta-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    _bug("beta_applied_once", "float32", (_p("values"),), "beta applied once (erase) instead of twice"),
    _bug("decay_after_update", "float32", (_p("values"),), "decay applied after the delta update"),
    _bug("prediction_from_undecayed_state", "float32", (_p("values"),), "prediction read before the decay"),
    _bug("output_before_update", "float32", (_p("values"),), "output read from the state before the update"),
    _bug("keys_normalised_inside", "float32", (_p("values"),), "kernel renormalises keys (wrong for unnormalised)"),
    _bug("state_in_input_dtype", "bfloat16", (_p("values"),), "state accumulated in bf16"),
    _bug("beta_not_differentiated", "float32", (_p("gradients"),), "no gradient to beta", "grad/dbeta"),
    _bug("decay_not_differentiated", "float32", (_p("gradients"),), "no gradient to the decay", "grad/dg"),
    # judged with dS_0's natural scale (the adjoint a step projects): still far outside it
    _bug("initial_state_not_differentiated", "float32", (_p("gradients"),), "no gradient to the initial state",
         "grad/dinitial_state"),
    _bug("wy_correction_dropped_at_chunk_boundary", "float32", (_p("values"),),
         "the WY correction by the carried state dropped at a chunk boundary"),
    _bug("beta_clamped_in_place", "float32", (_p("inputs-unchanged"),), "modifies its input beta in place"),
    _bug("state_cached_across_calls", "float32", (_p("deterministic"),), "hidden state carried across calls"),
    _bug("output_in_accumulation_dtype", "bfloat16", (_p("contract"),), "returns float32 o for bf16 inputs"),
    _bug("ragged_chunk_padded_with_last_decay", "float32", (_p("state-handoff"),),
         "final state over-decayed by a replicated ragged-chunk padding", "running [0, p) then [p, t)"),
    _bug("decay_form_from_first_gate", "float32", (_p("causality"),), "later decays change earlier outputs",
         "the future leaks into the past"),
    _bug("decay_form_from_first_sequence", "float32", (_p("sequence-independence"),),
         "a batch-wide form decision from sequence 0", "depend on its neighbours"),
)
