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

    Packed, one loop over the positions of all sequences: at ``cu[i]`` the state restarts from
    ``initial_state[i]`` (or zeros), and the state after position ``cu[i+1] - 1`` is sequence i's final state.

    The state and all arithmetic are in ``state_dtype_for(q.dtype)`` (float32 accumulation for
    bf16/fp16). Differentiable in q, k, v, g and initial_state through plain autograd; inputs may
    be non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    acc = state_dtype_for(q.dtype)
    q_, k_, v_ = q.to(acc), k.to(acc), v.to(acc)
    decay = torch.exp(g.to(acc))  # [B, T, H]
    if cu_seqlens is not None:
        return _packed(q_, k_, v_, decay, initial_state, scale, [int(c) for c in cu_seqlens.tolist()], q.dtype)
    if initial_state is None:
        state = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    else:
        state = initial_state.to(acc)
    outputs = []
    for t in range(T):
        outer = k_[:, t, :, :, None] * v_[:, t, :, None, :]  # [B, H, D, E] = k_t v_t^T
        state = decay[:, t, :, None, None] * state + outer
        outputs.append((q_[:, t, :, None, :] @ state).squeeze(-2))  # [B, H, E] = S_t^T q_t
    o = torch.stack(outputs, dim=1) * scale  # [B, T, H, E]
    return o.to(q.dtype), state


def _packed(q_, k_, v_, decay, initial_state, scale, cu: list[int], out_dtype):
    """The packed recurrence (B = 1): inputs in the accumulation dtype; returns (o [1, T, H, E], S [N, H, D, E])."""
    _, T, H, D = q_.shape
    E = v_.shape[-1]
    outputs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if initial_state is None:
            state = q_.new_zeros(H, D, E)
        else:
            state = initial_state[i].to(q_.dtype)
        for t in range(a, b):
            state = decay[0, t, :, None, None] * state + k_[0, t, :, :, None] * v_[0, t, :, None, :]
            outputs.append((q_[0, t, :, None, :] @ state).squeeze(-2))  # [H, E]
        finals.append(state)
    if cu[-1] < T:
        outputs.extend(q_.new_zeros(T - cu[-1], H, E).unbind(0))
    o = torch.stack(outputs, dim=0)[None] * scale  # [1, T, H, E]
    return o.to(out_dtype), torch.stack(finals, dim=0)
