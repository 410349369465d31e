"""Planted bugs in packed variable-length (``cu_seqlens``) ``gla_forward`` kernels (SPEC §6).

Each kernel takes the ``cu_seqlens`` keyword, is right on ordinary batches (it is the zoo's recurrent kernel
there, so every property that does not pack passes), and has one mistake in its packed path (:func:`_packed`)::

    iqa-verify check tests/bug_zoo/gla_forward_varlen.py:packed_state_carried_across_sequences --family gla-forward
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import state_dtype_for
from tests.bug_zoo.gla_forward import _recurrent
from tests.bug_zoo.planted import PlantedBug

__all__ = ["BUGS"]


def _packed(q, k, v, g, initial_state, scale, cu_seqlens, bug: str):
    """The packed recurrence (B = 1) in one pass over time, ``bug`` planted."""
    _, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qa, ka, va, ga = (x[0].to(acc) for x in (q, k, v, g))  # [T, H, *]
    cu = [int(c) for c in cu_seqlens.tolist()]
    ends = {b - 1: i for i, b in enumerate(cu[1:])}
    S = torch.zeros(H, D, E, dtype=acc, device=q.device)
    outs, finals = [], [None] * (len(cu) - 1)
    last = T if bug == "padding-continues" else cu[-1]  # padding outputs are not judged, so why not compute them
    for t in range(last):
        if t in cu[:-1]:
            i = 0 if bug == "initial-state-of-sequence-0" else cu.index(t)
            fresh = initial_state[i].to(acc) if initial_state is not None else torch.zeros_like(S)
            S = S + fresh if bug == "state-carried" else fresh
        src = t % 1024 if bug == "offsets-wrap" else t  # pack offsets kept in a 10-bit field
        S = torch.exp(ga[src])[:, :, None] * S + ka[src][:, :, None] * va[src][:, None, :]
        outs.append(scale * (qa[src][:, None, :] @ S).squeeze(-2))
        if t in ends:
            finals[ends[t]] = S
    outs.extend(torch.zeros(T - last, H, E, dtype=acc, device=q.device).unbind(0))
    return torch.stack(outs, 0)[None].to(q.dtype), torch.stack(finals, 0)


def _kernel(bug: str, doc: str):
    def kernel(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
        if cu_seqlens is None:
            return _recurrent(q, k, v, g, initial_state, scale)
        return _packed(q, k, v, g, initial_state, scale, cu_seqlens, bug)

    kernel.__doc__ = doc
    return kernel


packed_state_carried_across_sequences = _kernel(
    "state-carried", "Adds each sequence's initial state to the previous sequence's final state instead of restarting.")
packed_initial_state_of_sequence_0 = _kernel(
    "initial-state-of-sequence-0", "Starts every packed sequence from initial_state[0] (an offset left at 0).")
packed_padding_continues_last_sequence = _kernel(
    "padding-continues", "Computes padding outputs as a continuation of the last sequence: not judged, but the padding"
                         " inputs then get gradients (cf. fla #837, #955, #892).")

packed_offsets_wrap_after_1024 = _kernel(
    "offsets-wrap", "Positions in the pack wrap after 1024 steps: right for every pack of <= 1024 (cf. fla #1080).")


def _p(name: str) -> str:
    return f"gla-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(__file__, "gla-forward", "packed_state_carried_across_sequences", "float32",
               (_p("varlen-values"), _p("varlen-one-by-one")), "state not reset between packed sequences"),
    PlantedBug(__file__, "gla-forward", "packed_initial_state_of_sequence_0", "float32",
               (_p("varlen-gradients"),), "initial state of sequence i taken from sequence 0", "grad/dinitial_state"),
    PlantedBug(__file__, "gla-forward", "packed_padding_continues_last_sequence", "float32",
               (_p("varlen-gradients"),), "padding positions receive gradients", "padding"),
    PlantedBug(__file__, "gla-forward", "packed_offsets_wrap_after_1024", "float32",
               (_p("varlen-one-by-one"),), "pack offsets wrap past 1024 steps"),
)
