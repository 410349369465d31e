"""Planted bugs in packed variable-length (``cu_seqlens``) ``la_solve_v`` kernels (SPEC §6).

Each kernel takes the ``cu_seqlens`` keyword, is right on ordinary batches (the zoo's forward substitution
:func:`tests.bug_zoo.la_inverse._substitute`, so every property that does not pack passes), and has one mistake
in how it splits the pack (:func:`_packed`); the same mistakes as the packed forward's zoo::

    iqa-verify check tests/bug_zoo/la_inverse_varlen.py:v_state_carried_across_sequences --family la-solve-v
"""

from __future__ import annotations

import torch

from iqa_verify.reference.la_inverse import la_states_ref
from tests.bug_zoo.la_inverse import _substitute
from tests.bug_zoo.planted import PlantedBug

__all__ = ["BUGS"]


def _packed(q, k, o, g, initial_state, scale, cu_seqlens, bug: str):
    """One substitution per sequence, ``bug`` planted in the hand-over between sequences."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    T = q.shape[1]
    ends = cu[1:]
    if bug == "padding-continues":  # padding outputs are not judged, so why not solve them with the last sequence
        ends = [*cu[1:-1], T]
    parts, carry = [], None
    for i, (a, b) in enumerate(zip(cu, ends)):
        s0 = None if initial_state is None else initial_state[i:i + 1]
        if bug == "first-initial-state" and initial_state is not None:
            s0 = initial_state[:1]
        if bug == "state-carried" and carry is not None:
            s0 = carry.to(q.dtype) if s0 is None else s0 + carry.to(q.dtype)
        v = _substitute(q[:, a:b], k[:, a:b], o[:, a:b], g[:, a:b], s0, scale)
        if bug == "state-carried":  # the final state of this sequence, handed to the next one
            carry = la_states_ref(k[:, a:b], v, g[:, a:b], s0)[:, :, -1]
        parts.append(v)
    if ends[-1] < T:
        parts.append(torch.zeros((1, T - ends[-1], *o.shape[2:]), dtype=o.dtype, device=o.device))
    return torch.cat(parts, dim=1)


def _kernel(bug: str):
    def kernel(q, k, o, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
        if cu_seqlens is None:
            return _substitute(q, k, o, g, initial_state, scale)
        return _packed(q, k, o, g, initial_state, scale, cu_seqlens, bug)

    return kernel


v_state_carried_across_sequences = _kernel("state-carried")
v_state_carried_across_sequences.__doc__ = ("Adds the previous sequence's final state to each sequence's initial state"
                                            " instead of restarting.")
v_every_sequence_from_first_state = _kernel("first-initial-state")
v_every_sequence_from_first_state.__doc__ = "Starts every sequence from initial_state[0] instead of initial_state[i]."
v_padding_continues_last_sequence = _kernel("padding-continues")
v_padding_continues_last_sequence.__doc__ = ("Solves the padding as a continuation of the last sequence: its outputs"
                                             " are not judged, but the padding inputs then get gradients.")


def _p(name: str) -> str:
    return f"la-solve-v/{name}"


BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(__file__, "la-solve-v", "v_state_carried_across_sequences", "float32",
               (_p("varlen-backward-error"), _p("varlen-minimum-norm"), _p("varlen-one-by-one")),
               "state carried across a sequence boundary"),
    PlantedBug(__file__, "la-solve-v", "v_every_sequence_from_first_state", "float32",
               (_p("varlen-backward-error"), _p("varlen-one-by-one")), "every sequence starts from initial_state[0]"),
    PlantedBug(__file__, "la-solve-v", "v_padding_continues_last_sequence", "float32",
               (_p("varlen-gradients"), _p("varlen-one-by-one")), "padding continues the last sequence (gradients flow from padding)",
               "padding"),
)
