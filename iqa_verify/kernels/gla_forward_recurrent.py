"""Gated linear attention (family ``gla-forward``): the step-by-step recurrent kernel.

One step per time index, the state kept in float32 (float64 for float64 inputs); the kernel that
:mod:`iqa_verify.kernels.gla_forward_chunked` is timed against.
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_gla_forward_inputs, state_dtype_for

__all__ = ["gla_forward_recurrent"]


def gla_forward_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with a log gate per key dimension, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H, D] log gates, g <= 0 (row d of the state decays by exp(g_{t,d}) at step t).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16
        inputs, the input dtype otherwise.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S_0 = initial_state
        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          t = 1 .. T
        o_t = scale * S_t^T q_t
        final_state = S_T

    Arithmetic in ``state_dtype_for(q.dtype)``; differentiable through plain autograd; inputs may be
    non-contiguous views and are never modified.
    """
    B, T, H, D, E = check_gla_forward_inputs(q, k, v, g, initial_state)
    acc = state_dtype_for(q.dtype)
    q_, k_, v_ = q.to(acc), k.to(acc), v.to(acc)
    gate = torch.exp(g.to(acc))  # [B, T, H, D]
    state = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        state = torch.addcmul(k_[:, t, :, :, None] * v_[:, t, :, None, :], gate[:, t, :, :, None], state)
        outputs.append((q_[:, t, :, None, :] @ state).squeeze(-2))  # [B, H, E] = S_t^T q_t
    o = torch.stack(outputs, dim=1) * scale  # [B, T, H, E]
    return o.to(q.dtype), state
