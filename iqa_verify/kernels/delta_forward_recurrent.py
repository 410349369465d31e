"""The delta rule (family ``delta-forward``): the step-by-step recurrent kernel.

One step per time index, the state kept in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_delta_forward_inputs, state_dtype_for

__all__ = ["delta_forward_recurrent"]


def delta_forward_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys (models normalise keys to ‖k_t‖ = 1).
        v: [B, T, H, E] values.
        beta: [B, T, H] write strengths in [0, 1].
        g: [B, T, H] log-decay (g <= 0) or None (no decay).
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16 inputs.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S' = exp(g_t) S_{t-1}                         (S' = S_{t-1} when g is None)
        S_t = S' + beta_t k_t (v_t - S'^T k_t)^T        = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = scale * S_t^T q_t,   final_state = S_T

    Arithmetic in ``state_dtype_for(q.dtype)``; differentiable through plain autograd; inputs never modified.
    """
    B, T, H, D, E = check_delta_forward_inputs(q, k, v, beta, g, initial_state)
    acc = state_dtype_for(q.dtype)
    q_, k_, v_, beta_ = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    decay = None if g is None else torch.exp(g.to(acc))  # [B, T, H]
    state = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        if decay is not None:
            state = decay[:, t, :, None, None] * state
        k_t = k_[:, t]  # [B, H, D]
        error = v_[:, t] - (k_t[:, :, None, :] @ state).squeeze(-2)  # v_t - S'^T k_t: [B, H, E]
        state = state + (beta_[:, t, :, None] * k_t)[..., None] * error[:, :, None, :]
        outputs.append((q_[:, t, :, None, :] @ state).squeeze(-2))
    o = torch.stack(outputs, dim=1) * scale
    return o.to(q.dtype), state
