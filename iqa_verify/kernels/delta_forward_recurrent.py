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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys (models normalise keys to ‖k_t‖ = 1).
        v: [B, T, H, E] values.
        beta: [B, T, H] write strengths in [0, 1].
        g: [B, T, H] log-decay (g <= 0) or None (no decay).
        initial_state: [B, H, D, E] or None (zeros); [N, H, D, E] with ``cu_seqlens``.
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1) of N sequences ``[cu[i], cu[i+1])``
            (SPEC §6); positions from ``cu[N]`` on are padding (outputs 0, no gradient).

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E] ([N, H, D, E] packed), float32 for
        bf16/fp16 inputs.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S' = exp(g_t) S_{t-1}                         (S' = S_{t-1} when g is None)
        S_t = S' + beta_t k_t (v_t - S'^T k_t)^T        = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = scale * S_t^T q_t,   final_state = S_T

    Packed, the same loop runs over each sequence in turn: at ``cu[i]`` the state restarts from
    ``initial_state[i]`` (or zeros), and the state after position ``cu[i+1] - 1`` is sequence i's final state.

    Arithmetic in ``state_dtype_for(q.dtype)``; differentiable through plain autograd; inputs never modified.

    Memory: every step's state is kept ([B, T, H, D, E] in the accumulation dtype, as autograd keeps it for the
    backward anyway) and the outputs come from them in one contraction; the loop itself is four ops per step
    (decay, prediction, error, fused update: what makes this kernel cheap to call at the suite's small shapes
    and long sequences).
    """
    B, T, H, D, E = check_delta_forward_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    acc = state_dtype_for(q.dtype)
    q_, k_, v_ = q.to(acc), k.to(acc), v.to(acc)
    bk = (beta.to(acc)[..., None] * k_)[..., None]  # [B, T, H, D, 1]: beta_t k_t for every t at once
    decay = None if g is None else torch.exp(g.to(acc))[..., None, None]  # [B, T, H, 1, 1]
    if cu_seqlens is None:
        state = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
        o, state = _steps(q_, k_, v_, bk, decay, state, 0, T)
        return (o * scale).to(q.dtype), state
    cu = [int(c) for c in cu_seqlens.tolist()]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        state = q_.new_zeros(1, H, D, E) if initial_state is None else initial_state[i : i + 1].to(acc)
        o, state = _steps(q_, k_, v_, bk, decay, state, a, b)
        outs.append(o)
        finals.append(state)
    if cu[-1] < T:
        outs.append(q_.new_zeros(1, T - cu[-1], H, E))  # padding: outputs 0, nothing flows back to its inputs
    return (torch.cat(outs, dim=1) * scale).to(q.dtype), torch.cat(finals, dim=0)


def _steps(q_, k_, v_, bk, decay, state, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``start .. stop - 1`` from ``state`` [B, H, D, E] (accumulation dtype); returns the unscaled
    outputs [B, stop - start, H, E] and the state after the last step.

    Per-step views come from one ``unbind`` each and the outputs from all states at once: the loop holds the
    recurrence and nothing else (autograd records a few nodes per step instead of a dozen)."""
    steps = slice(start, stop)
    k_rows = k_[:, steps, :, None, :].unbind(1)  # [B, H, 1, D] each
    v_rows = v_[:, steps, :, None, :].unbind(1)  # [B, H, 1, E] each
    decays = [None] * (stop - start) if decay is None else decay[:, steps].unbind(1)
    states = []
    for k_t, v_t, bk_t, d_t in zip(k_rows, v_rows, bk[:, steps].unbind(1), decays):
        if d_t is not None:
            state = d_t * state  # S' = exp(g_t) S_{t-1}
        error = v_t - k_t @ state  # (v_t - S'^T k_t)^T: [B, H, 1, E]
        state = torch.addcmul(state, bk_t, error)  # S' + beta_t k_t (v_t - S'^T k_t)^T
        states.append(state)
    o = torch.einsum("bthd,bthde->bthe", q_[:, steps], torch.stack(states, dim=1))  # o_t = S_t^T q_t
    return o, state
