"""Linear attention with decay (family ``la-forward``): the step-by-step recurrent kernel.

The straightforward kernel of the family: one step per time index, the state kept in float32
(float64 for float64 inputs). It is the "same-precision PyTorch computation" of SPEC §5 and the
baseline that :mod:`iqa_verify.kernels.la_forward_chunked` is timed against.
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for

__all__ = ["la_forward_recurrent"]


def la_forward_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with per-step scalar decay, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H] log-decay, g <= 0 (lambda_t = exp(g_t); g == 0 means no decay).
        initial_state: [B, H, D, E] or None (zeros); [N, H, D, E] with ``cu_seqlens``.
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1) of N sequences ``[cu[i], cu[i+1])``
            (SPEC §6); positions from ``cu[N]`` on are padding (outputs 0, no gradient).

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E] ([N, H, D, E] packed), float32 for
        bf16/fp16 inputs, the input dtype otherwise.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S_0 = initial_state
        S_t = exp(g_t) * S_{t-1} + k_t v_t^T          t = 1 .. T
        o_t = scale * S_t^T q_t
        final_state = S_T

    Packed, the same loop runs over each sequence in turn: at ``cu[i]`` the state restarts from
    ``initial_state[i]`` (or zeros), and the state after position ``cu[i+1] - 1`` is sequence i's final state.

    The state and all arithmetic are in ``state_dtype_for(q.dtype)`` (float32 accumulation for
    bf16/fp16). Differentiable in q, k, v, g and initial_state through plain autograd; inputs may
    be non-contiguous views and are never modified.

    Memory: every step's state is kept ([B, T, H, D, E] in the accumulation dtype, as autograd keeps it for the
    backward anyway) and the outputs come from them in one contraction; the loop itself is one or two fused
    ops per step (what makes this kernel cheap to call at the suite's small shapes and long sequences).
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    acc = state_dtype_for(q.dtype)
    q_ = q.to(acc)
    outer = k.to(acc)[..., :, None] * v.to(acc)[..., None, :]  # [B, T, H, D, E]: k_t v_t^T for every t at once
    decay = torch.exp(g.to(acc))[..., None, None]  # [B, T, H, 1, 1]
    if cu_seqlens is not None:
        return _packed(q_, outer, decay, initial_state, scale, [int(c) for c in cu_seqlens.tolist()], q.dtype)
    if initial_state is None:
        state = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    else:
        state = initial_state.to(acc)
    states = _steps(state, decay[:, :T], outer[:, :T])
    o = torch.einsum("bthd,bthde->bthe", q_, torch.stack(states, dim=1)) * scale  # o_t = S_t^T q_t: [B, T, H, E]
    return o.to(q.dtype), states[-1] if states else state


def _steps(state: torch.Tensor, decay: torch.Tensor, outer: torch.Tensor) -> list[torch.Tensor]:
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T along dim 1 of ``decay`` and ``outer`` from ``state``: every S_t.

    One fused multiply-add per step on per-step views (``unbind``): the loop is the recurrence and nothing else,
    so that autograd records two nodes per step instead of a dozen."""
    states = []
    for d_t, kv_t in zip(decay.unbind(1), outer.unbind(1)):
        state = torch.addcmul(kv_t, d_t, state)
        states.append(state)
    return states


def _packed(q_, outer, decay, initial_state, scale, cu: list[int], out_dtype):
    """The packed recurrence (B = 1): q_ in the accumulation dtype; returns (o [1, T, H, E], S [N, H, D, E])."""
    _, T, H, D = q_.shape
    E = outer.shape[-1]
    states, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if initial_state is None:
            state = q_.new_zeros(1, H, D, E)
        else:
            state = initial_state[i : i + 1].to(q_.dtype)
        seq = _steps(state, decay[:, a:b], outer[:, a:b])
        states.extend(seq)
        finals.append(seq[-1] if seq else state)
    end = cu[-1]
    o = q_.new_zeros(1, 0, H, E) if not states else torch.einsum("bthd,bthde->bthe", q_[:, :end], torch.stack(states, dim=1))
    if end < T:
        o = torch.cat([o, q_.new_zeros(1, T - end, H, E)], dim=1)  # padding: outputs 0, nothing flows back
    return (o * scale).to(out_dtype), torch.cat(finals, dim=0)
