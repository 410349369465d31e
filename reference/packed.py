"""Packed variable-length batches (SPEC §6, ``cu_seqlens``) for the float64 references and baselines of the
recurrent forward families: one ordinary call per sequence.

For inputs with a time axis ``x : [1, T, H, *]``, ``cu_seqlens : int64 [N + 1]`` and ``initial_state : [N, H, D, E]``
or None, sequence i is the ordinary (unpacked) computation on positions ``[cu[i], cu[i+1])`` from
``initial_state[i]``; the outputs at padding positions (``>= cu[N]``) are 0 and depend on nothing, so every
gradient there is exactly 0. Written for the references only (nothing here is shared with a kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["per_sequence"]


def per_sequence(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    timed: Mapping[str, torch.Tensor | None],
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(**timed[:, a:b], initial_state=initial_state[i], **kwargs)`` for every sequence ``[a, b)`` of the pack.

    Args:
        fn: an unpacked reference, ``fn(..., initial_state=..., **kwargs) -> (o [1, L, H, E], S [1, H, D, E])``.
        timed: the inputs with a time axis by keyword, each [1, T, H, *] or None (passed as None).
        initial_state: [N, H, D, E] or None (zeros for every sequence).
        cu_seqlens: int64 [N + 1] (already validated by the caller's ``check_*_inputs``).
        kwargs: passed to every call (``scale``).

    Returns:
        ``(o, S)``: o [1, T, H, E] with 0 at padding, S [N, H, D, E] (sequence i's final state in row i).
    """
    cu = [int(c) for c in cu_seqlens.tolist()]
    outs, states = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        part = {n: (t[:, a:b] if t is not None else None) for n, t in timed.items()}
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        o, S = fn(**part, initial_state=s0, **kwargs)
        outs.append(o)
        states.append(S)
    first = next(t for t in timed.values() if t is not None)
    T = first.shape[1]
    if cu[-1] < T:
        outs.append(torch.zeros((1, T - cu[-1], *outs[0].shape[2:]), dtype=outs[0].dtype, device=first.device))
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)
