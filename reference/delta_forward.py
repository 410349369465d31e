"""Float64 reference and the same-precision baseline for the delta rule (family ``delta-forward``).

Every function here follows the kernel contract of SPEC §6 (delta rule, gated when g is given)::

    f(q, k, v, beta, g=None, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)
      q, k : [B, T, H, D]    v : [B, T, H, E]    beta : [B, T, H] in [0, 1]
      g    : [B, T, H] log-decay (g <= 0) or None (no decay)
      initial_state : [B, H, D, E] or None (zeros)

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T     (per batch and head; S_t is [D, E])
    o_t = scale * S_t^T q_t                                             final_state = S_T

computed as ``S' = exp(g_t) S_{t-1}``, ``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T`` (the same, since the decay
is a scalar): the state "reads" its prediction ``S'^T k_t`` for the key and moves it a fraction beta_t towards v_t.

:func:`delta_forward_recurrent_ref` (the default :data:`delta_forward_ref`) runs this step by step in
float64: every value and autograd gradient is a product of bounded factors (unit or smaller keys keep the
transition's eigenvalues in [0, 1]), so it is finite in every regime the cases draw. Its independent checks
are the sympy closed forms of :mod:`iqa_verify.reference.delta_forward_sympy` and, for beta = 1 / g = None / one step,
hand-derived special cases (``tests/test_reference_delta_forward.py``).

**Packed batches** (SPEC §6, ``cu_seqlens``: int64 [N + 1], B = 1): every function applies itself to each
sequence ``[cu[i], cu[i+1])`` on its own, from ``initial_state[i]`` ([N, H, D, E]), and stacks the N final
states; outputs at padding positions (``>= cu[N]``) are 0 and their gradients exactly 0
(:func:`iqa_verify.reference.packed.per_sequence`).

:func:`delta_forward_baseline` is the same-precision baseline of SPEC §5: the recurrence in the kernel's
accumulation dtype (float32 for bf16/fp16 inputs).
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_delta_forward_inputs, state_dtype_for
from iqa_verify.reference.packed import per_sequence

__all__ = ["delta_forward_baseline", "delta_forward_recurrent_ref", "delta_forward_ref"]


def _recurrence(q, k, v, beta, g, initial_state, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence in ``dtype``; returns o [B, T, H, E] and S_T [B, H, D, E], both in ``dtype``."""
    B, T, H, D, E = check_delta_forward_inputs(q, k, v, beta, g, initial_state)
    Q, K, V = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D|E]
    Beta = beta.to(dtype).transpose(1, 2)  # [B, H, T]
    decay = [None] * T if g is None else torch.exp(g.to(dtype)).transpose(1, 2)[..., None, None].unbind(2)
    BK = (Beta[..., None] * K)[..., None]  # [B, H, T, D, 1]: beta_t k_t
    S = torch.zeros(B, H, D, E, dtype=dtype, device=q.device) if initial_state is None else initial_state.to(dtype)
    states = []
    # per-step views (unbind): the loop is the recurrence alone; k_t [B, H, 1, D], v_t [B, H, 1, E]
    for k_t, v_t, bk_t, d_t in zip(K[..., None, :].unbind(2), V[..., None, :].unbind(2), BK.unbind(2), decay):
        if d_t is not None:
            S = d_t * S
        predicted = k_t @ S  # (S'^T k_t)^T: [B, H, 1, E]
        S = S + bk_t * (v_t - predicted)
        states.append(S)
    o = torch.einsum("bhtd,bhtde->bthe", Q, torch.stack(states, dim=2))  # S_t^T q_t: [B, T, H, E]
    return scale * o, S


def _packed(fn, q, k, v, beta, g, initial_state, scale: float, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` once per sequence of a packed batch, after checking the packed arguments."""
    check_delta_forward_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    return per_sequence(fn, {"q": q, "k": k, "v": v, "beta": beta, "g": g}, initial_state, cu_seqlens, scale=scale)


def delta_forward_recurrent_ref(
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
    """Float64 reference by the recurrence, one step at a time, on the inputs' device.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; beta: [B, T, H]; g: [B, T, H] log-decay or None;
        any one floating dtype.
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Math (per batch and head)::

        S' = exp(g_t) S_{t-1}   (S' = S_{t-1} when g is None)
        S_t = S' + beta_t k_t (v_t - S'^T k_t)^T = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = scale * S_t^T q_t

    Returns:
        ``(o, S_T)``: o [B, T, H, E] and S_T [B, H, D, E], both float64. Differentiable in every input.
    """
    if cu_seqlens is not None:
        return _packed(delta_forward_recurrent_ref, q, k, v, beta, g, initial_state, scale, cu_seqlens)
    return _recurrence(q, k, v, beta, g, initial_state, scale, torch.float64)


delta_forward_ref = delta_forward_recurrent_ref
"""The default float64 reference of the family: :func:`delta_forward_recurrent_ref`."""


def delta_forward_baseline(
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
    """Same-precision baseline (SPEC §5): the recurrence in the kernel's accumulation dtype.

    Args as :func:`delta_forward_recurrent_ref`, all in one dtype ``x``. The inputs are cast to
    ``acc = state_dtype_for(x)`` (float32 for bf16/fp16), the recurrence runs in ``acc``, o is cast back.

    Returns:
        ``(o, S_T)``: o [B, T, H, E] in ``x``; S_T [B, H, D, E] in ``acc``.
    """
    if cu_seqlens is not None:
        return _packed(delta_forward_baseline, q, k, v, beta, g, initial_state, scale, cu_seqlens)
    o, state = _recurrence(q, k, v, beta, g, initial_state, scale, state_dtype_for(q.dtype))
    return o.to(q.dtype), state
