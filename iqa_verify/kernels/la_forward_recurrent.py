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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with per-step scalar decay, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H] log-decay, g <= 0 (lambda_t = exp(g_t); g == 0 means no decay).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16
        inputs, the input dtype otherwise.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S_0 = initial_state
        S_t = exp(g_t) * S_{t-1} + k_t v_t^T          t = 1 .. T
        o_t = scale * S_t^T q_t
        final_state = S_T

    The state and all arithmetic are in ``state_dtype_for(q.dtype)`` (float32 accumulation for
    bf16/fp16). Differentiable in q, k, v, g and initial_state through plain autograd; inputs may
    be non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state)
    acc = state_dtype_for(q.dtype)
    q_, k_, v_ = q.to(acc), k.to(acc), v.to(acc)
    decay = torch.exp(g.to(acc))  # [B, T, H]
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
