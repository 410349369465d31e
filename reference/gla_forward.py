"""Float64 references and the same-precision baseline for gated linear attention (family ``gla-forward``).

Every function here follows the kernel contract of SPEC §6 (per-key-dimension gates) exactly::

    f(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)
      q, k : [B, T, H, D]     v : [B, T, H, E]     g : [B, T, H, D] (log gate per key dimension, g <= 0)
      initial_state : [B, H, D, E] or None (zeros)

    S_0 = initial_state
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T            (per batch and head; S_t is [D, E])
    o_t = scale * S_t^T q_t                              final_state = S_T

Row d of the state decays by its own gate ``exp(g_{t,d})``; with g constant over D this is ``la-forward``.

Two independent float64 references compute this:

* :func:`gla_forward_recurrent_ref` runs the recurrence step by step. It is the default reference
  (:data:`gla_forward_ref`): O(T) memory, every value and autograd gradient is a product of factors
  ``exp(g) <= 1`` and finite inputs, so it is finite in every regime (gates of -60 per step included)
  and its gate gradient ``dL/dg_{t,d} = exp(g_{t,d}) <dL/dS_t[d, :], S_{t-1}[d, :]>`` has no cancellation.
* :func:`gla_forward_matrix_ref` evaluates the closed form per batch and head::

      Gamma_ijd = sum_{j < s <= i} g_sd          (i >= j; a masked segment sum, never positive)
      o_i  = scale * ( sum_{j <= i} (sum_d q_id k_jd exp(Gamma_ijd)) v_j  +  S_0^T (q_i ⊙ exp(b_i)) )
      S_T  = diag(exp(b_T)) S_0 + sum_j (k_j ⊙ exp(c_j)) v_j^T
      b_i  = sum_{s <= i} g_s,   c_j = sum_{s > j} g_s

  with O(T^2 D) memory: for tests at moderate T, as an independent check of the recurrence.

**Packed batches** (SPEC §6, ``cu_seqlens``: int64 [N + 1], B = 1): every function applies itself to each
sequence ``[cu[i], cu[i+1])`` on its own, from ``initial_state[i]`` ([N, H, D, E]), and stacks the N final
states; outputs at padding positions (``>= cu[N]``) are 0 and their gradients exactly 0
(:func:`iqa_verify.reference.packed.per_sequence`).

:func:`gla_forward_baseline` is the same-precision baseline of SPEC §5: the recurrence computed in the
accumulation dtype (float32 for bf16/fp16 inputs), what a straightforward kernel in that precision gets.
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_gla_forward_inputs, state_dtype_for
from iqa_verify.reference.packed import per_sequence

__all__ = ["gla_forward_baseline", "gla_forward_matrix_ref", "gla_forward_recurrent_ref", "gla_forward_ref"]


def _recurrence(q, k, v, g, initial_state, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence in ``dtype``; returns o [B, T, H, E] and S_T [B, H, D, E], both in ``dtype``."""
    B, T, H, D, E = check_gla_forward_inputs(q, k, v, g, initial_state)
    Q, K, V = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D|E]
    lam = torch.exp(g.to(dtype)).transpose(1, 2)[..., None]  # [B, H, T, D, 1]
    KV = K[..., :, None] * V[..., None, :]  # [B, H, T, D, E]: k_t v_t^T for every t
    S = torch.zeros(B, H, D, E, dtype=dtype, device=q.device) if initial_state is None else initial_state.to(dtype)
    states = []
    for lam_t, kv_t in zip(lam.unbind(2), KV.unbind(2)):  # per-step views: the loop is the recurrence alone
        S = lam_t * S + kv_t
        states.append(S)
    o = torch.einsum("bhtd,bhtde->bthe", Q, torch.stack(states, dim=2))  # S_t^T q_t: [B, T, H, E]
    return scale * o, S


def _packed(fn, q, k, v, g, initial_state, scale: float, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` once per sequence of a packed batch, after checking the packed arguments."""
    check_gla_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    return per_sequence(fn, {"q": q, "k": k, "v": v, "g": g}, initial_state, cu_seqlens, scale=scale)


def gla_forward_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference by the recurrence, one step at a time, on the inputs' device.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H, D] log gates (g <= 0); any one floating dtype.
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Math (per batch and head)::

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t

    Returns:
        ``(o, S_T)``: o [B, T, H, E] and S_T [B, H, D, E], both float64. Differentiable in every input.
    """
    if cu_seqlens is not None:
        return _packed(gla_forward_recurrent_ref, q, k, v, g, initial_state, scale, cu_seqlens)
    return _recurrence(q, k, v, g, initial_state, scale, torch.float64)


def gla_forward_matrix_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference by the closed (matrix) form with per-dimension masked segment sums.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H, D] log gates (g <= 0); any one floating dtype.
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Math (per batch and head)::

        Gamma_ijd = sum_{j < s <= i} g_sd  (i >= j),   A_ij = sum_d q_id k_jd exp(Gamma_ijd)  (0 for i < j)
        O   = scale * ( A V + (Q ⊙ exp(b)) S_0 ),   b_i = sum_{s <= i} g_s
        S_T = diag(exp(b_T)) S_0 + (K ⊙ exp(c))^T V,   c_j = sum_{s > j} g_s

    Every exponent is a sum of gates (never positive, never a difference of cumulative sums).
    Memory is O(B H T^2 D).

    Returns:
        ``(o, S_T)``: o [B, T, H, E] and S_T [B, H, D, E], both float64. Differentiable in every input.
    """
    if cu_seqlens is not None:
        return _packed(gla_forward_matrix_ref, q, k, v, g, initial_state, scale, cu_seqlens)
    check_gla_forward_inputs(q, k, v, g, initial_state)
    f64 = torch.float64
    Q, K, V = (x.to(f64).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D|E]
    G = g.to(f64).transpose(1, 2)  # [B, H, T, D]
    T = G.shape[2]
    strictly_lower = torch.ones(T, T, dtype=f64, device=G.device).tril(-1)
    gamma = (strictly_lower[:, :, None] * G[..., :, None, :]).cumsum(dim=-3)  # [B, H, T(i), T(j), D]
    lower = torch.ones(T, T, dtype=torch.bool, device=G.device).tril()
    weight = torch.where(lower[:, :, None], torch.exp(gamma), torch.zeros((), dtype=f64, device=G.device))
    scores = (Q[..., :, None, :] * K[..., None, :, :] * weight).sum(-1)  # [B, H, T, T]
    o = scores @ V
    suffix = G.flip(2).cumsum(2).flip(2)  # sum_{s >= j} g_s
    c = torch.cat([suffix[:, :, 1:], torch.zeros_like(suffix[:, :, :1])], dim=2)  # sum_{s > j} g_s
    state = (K * torch.exp(c)).transpose(-1, -2) @ V  # [B, H, D, E]
    if initial_state is not None:
        S0 = initial_state.to(f64)
        b = G.cumsum(2)
        o = o + (Q * torch.exp(b)) @ S0
        state = state + torch.exp(b[:, :, -1, :, None]) * S0
    return (scale * o).transpose(1, 2), state


gla_forward_ref = gla_forward_recurrent_ref
"""The default float64 reference of the family: :func:`gla_forward_recurrent_ref`."""


def gla_forward_baseline(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-precision baseline (SPEC §5): the recurrence in the kernel's accumulation dtype.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H, D]; initial_state: [B, H, D, E] or None;
        all in one dtype ``x``.
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Inputs are cast to ``acc = state_dtype_for(x)`` (float32 for bf16/fp16), the recurrence runs in
    ``acc``, o is cast back to ``x``. Gradients flow back through the casts (they arrive in ``x``).

    Returns:
        ``(o, S_T)``: o [B, T, H, E] in ``x``; S_T [B, H, D, E] in ``acc``.
    """
    if cu_seqlens is not None:
        return _packed(gla_forward_baseline, q, k, v, g, initial_state, scale, cu_seqlens)
    o, state = _recurrence(q, k, v, g, initial_state, scale, state_dtype_for(q.dtype))
    return o.to(q.dtype), state
