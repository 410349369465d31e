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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with a log gate per key dimension, computed one time step at a time.

    Args:
        q, k: [B, T, H, D] queries and keys.
        v: [B, T, H, E] values.
        g: [B, T, H, D] log gates, g <= 0 (row d of the state decays by exp(g_{t,d}) at step t).
        initial_state: [B, H, D, E] or None (zeros); [N, H, D, E] with ``cu_seqlens``.
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] or None: a packed batch (B = 1) of N sequences ``[cu[i], cu[i+1])``
            (SPEC §6); positions from ``cu[N]`` on are padding (outputs 0, no gradient).

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E] ([N, H, D, E] packed), float32 for
        bf16/fp16 inputs, the input dtype otherwise.

    The recurrence, for every batch b and head h (``S`` is [D, E])::

        S_0 = initial_state
        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          t = 1 .. T
        o_t = scale * S_t^T q_t
        final_state = S_T

    Packed, the same loop runs over each sequence in turn: at ``cu[i]`` the state restarts from
    ``initial_state[i]`` (or zeros), and the state after position ``cu[i+1] - 1`` is sequence i's final state.

    Arithmetic in ``state_dtype_for(q.dtype)``; differentiable through plain autograd; inputs may be
    non-contiguous views and are never modified.

    Memory: every step's state is kept ([B, T, H, D, E] in the accumulation dtype, as autograd keeps it for the
    backward anyway) and the outputs come from them in one contraction; the loop itself is one or two fused
    ops per step (what makes this kernel cheap to call at the suite's small shapes and long sequences).
    """
    B, T, H, D, E = check_gla_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    acc = state_dtype_for(q.dtype)
    q_ = q.to(acc)
    outer = k.to(acc)[..., :, None] * v.to(acc)[..., None, :]  # [B, T, H, D, E]: k_t v_t^T for every t at once
    gate = torch.exp(g.to(acc))[..., None]  # [B, T, H, D, 1]: row d of the state decays by exp(g_{t,d})
    if cu_seqlens is None:
        state = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
        o, state = _steps(q_, outer, gate, state, 0, T)
        return (o * scale).to(q.dtype), state
    cu = [int(c) for c in cu_seqlens.tolist()]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        state = q_.new_zeros(1, H, D, E) if initial_state is None else initial_state[i : i + 1].to(acc)
        o, state = _steps(q_, outer, gate, state, a, b)
        outs.append(o)
        finals.append(state)
    if cu[-1] < T:
        outs.append(q_.new_zeros(1, T - cu[-1], H, E))  # padding: outputs 0, nothing flows back to its inputs
    return (torch.cat(outs, dim=1) * scale).to(q.dtype), torch.cat(finals, dim=0)


def _steps(q_, outer, gate, state, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``start .. stop - 1`` from ``state`` [B, H, D, E] (accumulation dtype); returns the unscaled
    outputs [B, stop - start, H, E] and the state after the last step.

    One fused multiply-add per step on per-step views (``unbind``), the outputs from all states at once: the
    loop is the recurrence and nothing else, so autograd records two nodes per step instead of a dozen."""
    states = []
    for gate_t, kv_t in zip(gate[:, start:stop].unbind(1), outer[:, start:stop].unbind(1)):
        state = torch.addcmul(kv_t, gate_t, state)
        states.append(state)
    o = torch.einsum("bthd,bthde->bthe", q_[:, start:stop], torch.stack(states, dim=1))  # o_t = S_t^T q_t
    return o, state
