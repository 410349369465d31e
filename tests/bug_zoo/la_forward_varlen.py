"""Planted bugs in packed variable-length (``cu_seqlens``) ``la_forward`` kernels (SPEC §6).

Each kernel takes the ``cu_seqlens`` keyword, is right on ordinary batches (so every property that does not
pack passes), and has one mistake in its packed path (:func:`_packed`), each one seen in
flash-linear-attention's tracker::

    iqa-verify check tests/bug_zoo/la_forward_varlen.py:state_carried_across_sequences --family la-forward
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import state_dtype_for
from tests.bug_zoo.la_forward import _recurrent
from tests.bug_zoo.planted import PlantedBug

__all__ = ["BUGS"]


def _packed(q, k, v, g, initial_state, scale, cu_seqlens, bug: str):
    """The packed recurrence (B = 1) in one pass over time, ``bug`` planted."""
    _, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    qa, ka, va, ga = (x[0].to(acc) for x in (q, k, v, g))  # [T, H, *]
    cu = [int(c) for c in cu_seqlens.tolist()]
    starts, ends = set(cu[:-1]), {b - 1: i for i, b in enumerate(cu[1:])}
    S = torch.zeros(H, D, E, dtype=acc, device=q.device)
    outs, finals = [], [None] * (len(cu) - 1)
    last = T if bug == "padding-continues" else cu[-1]  # padding outputs are not judged, so why not compute them
    for t in range(last):
        src = t % 1024 if bug == "offsets-wrap" else t  # pack offsets kept in a 10-bit field
        if t in starts:
            i = cu.index(t)
            fresh = initial_state[i].to(acc) if initial_state is not None else torch.zeros_like(S)
            S = S + fresh if bug == "state-carried" else fresh
        S = torch.exp(ga[src])[:, None, None] * S + ka[src][:, :, None] * va[src][:, None, :]
        outs.append(scale * (qa[src][:, None, :] @ S).squeeze(-2))
        if t in ends:
            finals[ends[t]] = S
    outs.extend(torch.zeros(T - last, H, E, dtype=acc, device=q.device).unbind(0))
    return torch.stack(outs, 0)[None].to(q.dtype), torch.stack(finals, 0)


class _RealPart(torch.autograd.Function):
    """x[:, :end], whose backward allocates the input's gradient with new_empty and writes only the
    real positions: the padding's gradient is whatever that memory held (fla's varlen backward kernels)."""

    @staticmethod
    def forward(ctx, x, end):
        ctx.shape, ctx.end = x.shape, end
        return x[:, :end].clone()

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(ctx.shape)
        out[:, :ctx.end] = grad
        return out, None


def _kernel(bug: str):
    def kernel(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
        if cu_seqlens is None:
            return _recurrent(q, k, v, g, initial_state, scale)
        if bug == "padding-unwritten":
            T, end = q.shape[1], int(cu_seqlens[-1])
            o, S = _packed(*(_RealPart.apply(x, end) for x in (q, k, v, g)), initial_state, scale, cu_seqlens, "")
            return torch.cat([o, o.new_zeros(1, T - end, *o.shape[2:])], 1), S
        return _packed(q, k, v, g, initial_state, scale, cu_seqlens, bug)

    return kernel


state_carried_across_sequences = _kernel("state-carried")
state_carried_across_sequences.__doc__ = "Adds each sequence's initial state to the previous sequence's final state instead of restarting."
padding_continues_last_sequence = _kernel("padding-continues")
padding_continues_last_sequence.__doc__ = ("Computes padding outputs as a continuation of the last sequence: not judged, but"
                                           " the padding inputs then get gradients (cf. fla #837, #955, #892).")
padding_gradients_never_written = _kernel("padding-unwritten")
padding_gradients_never_written.__doc__ = ("Right on every real position; the padding's gradients are allocated but never"
                                           " written (fla's chunk and fused recurrent varlen backward, 0.6.0).")
pack_offsets_wrap_after_1024 = _kernel("offsets-wrap")
pack_offsets_wrap_after_1024.__doc__ = "Positions in the pack wrap after 1024 steps: right for every pack of <= 1024 (cf. fla #1080)."


def _p(name: str) -> str:
    return f"la-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    PlantedBug(__file__, "la-forward", "state_carried_across_sequences", "float32",
               (_p("varlen-values"), _p("varlen-one-by-one")), "state not reset between packed sequences"),
    PlantedBug(__file__, "la-forward", "padding_continues_last_sequence", "float32",
               (_p("varlen-gradients"), _p("varlen-one-by-one")), "padding positions receive gradients", "padding"),
    PlantedBug(__file__, "la-forward", "padding_gradients_never_written", "float32",
               (_p("varlen-gradients"), _p("varlen-one-by-one")), "padding gradients never written",
               "never written"),
    PlantedBug(__file__, "la-forward", "pack_offsets_wrap_after_1024", "float32",
               (_p("varlen-one-by-one"),), "pack offsets wrap past 1024 steps"),
)
