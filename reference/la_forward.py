"""Float64 references and the same-precision baseline for linear attention with decay (family ``la-forward``).

Every function here follows the kernel contract of SPEC §1 exactly::

    f(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)
      q, k : [B, T, H, D]     v : [B, T, H, E]     g : [B, T, H] (log-decay, g <= 0)
      initial_state : [B, H, D, E] or None (zeros)

    S_0 = initial_state
    S_t = exp(g_t) S_{t-1} + k_t v_t^T                  (per batch and head; S_t is [D, E])
    o_t = scale * S_t^T q_t                              final_state = S_T

Two independent float64 references compute this:

* :func:`la_forward_recurrent_ref` runs the recurrence step by step.
* :func:`la_forward_matrix_ref` evaluates the closed (matrix) form, per batch and head::

      O   = scale * ( [(Q K^T) ⊙ M] V + diag(alpha) Q S_0 )
      b_i = g_1 + ... + g_i,   alpha_i = exp(b_i)
      M_ij = exp(b_i - b_j) = exp(g_{j+1} + ... + g_i)  for i >= j, 0 above the diagonal
      S_T = exp(b_T) S_0 + sum_j exp(b_T - b_j) k_j v_j^T

  It is the default reference (:data:`la_forward_ref`), used with autograd for gradient references.

The matrix form never forms ``alpha_i / alpha_j`` (0/0 once the cumulative decay underflows) and never
exponentiates a positive exponent (``exp(b_i - b_j)`` above the diagonal overflows to inf, and
``inf * 0`` is NaN in both the value and the gradient). The exponent of ``M_ij`` is built already
masked, as the segment sum ``sum_{j < s <= i} g_s`` (a cumulative sum down the rows of the strictly
lower-triangular matrix ``A_sj = g_s [s > j]``), never as the difference of two cumulative sums. Besides
avoiding the masking hazard this keeps the decay gradient free of cancellation: autograd gives
``dL/dg_s = sum_{i >= s > j} G_ij`` (``G_ij = dL/dM_ij * M_ij``) directly, whereas differentiating
``b_i - b_j`` produces two large sums that cancel, which in float64 leaves an error of about ``1e-6``
relative to ``max |dg|`` under strong decay (g in [-60, -20], T = 65), against ``4e-16`` here. The
final state uses the suffix sums ``c_j = sum_{s > j} g_s`` for the same reason. All values and
gradients in q, k, v, g and S_0 stay finite for any finite input with g <= 0, even with cumulative
log-decay of -1e4.

**Packed batches** (SPEC §6, ``cu_seqlens``: int64 [N + 1], B = 1): every function applies itself to each
sequence ``[cu[i], cu[i+1])`` on its own, from ``initial_state[i]`` ([N, H, D, E]), and stacks the N final
states; outputs at padding positions (``>= cu[N]``) are 0 and nothing depends on the inputs there (so their
gradients are exactly 0). See :func:`_per_sequence`.

:func:`la_forward_baseline` is the same-precision baseline of SPEC §5: the matrix form computed in
the accumulation dtype of the kernel (float32 for bf16/fp16 inputs), against which the tolerance
rule measures how wrong a straightforward computation in that precision is.
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for

__all__ = [
    "la_forward_baseline",
    "la_forward_matrix_ref",
    "la_forward_recurrent_ref",
    "la_forward_ref",
]


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, T, ...] in ``dtype`` (a view or a copy; the input is never written)."""
    return x.to(dtype).transpose(1, 2)


def _segment_log_decay(g: torch.Tensor) -> torch.Tensor:
    """Masked segment sums of the log-decay: [B, H, T] -> [B, H, T, T].

    ``out[..., i, j] = sum_{j < s <= i} g_s`` for ``i >= j`` (0 on the diagonal) and 0 above it,
    computed as a cumulative sum over rows of ``A_sj = g_s [s > j]``, so no entry is ever positive
    and no two large cumulative sums are subtracted.
    """
    T = g.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)
    a = torch.where(strictly_lower, g.unsqueeze(-1), torch.zeros((), dtype=g.dtype, device=g.device))
    return a.cumsum(dim=-2)


def _suffix_log_decay(g: torch.Tensor) -> torch.Tensor:
    """``c_j = sum_{s > j} g_s`` (0 for the last step): [B, H, T] -> [B, H, T]."""
    suffix = g.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= j} g_s
    return torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)


def _matrix_form(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix form in ``dtype``; returns o [B, T, H, E] and S_T [B, H, D, E], both in ``dtype``."""
    Q, K, V = (_heads_first(x, dtype) for x in (q, k, v))  # [B, H, T, D|E]
    G = g.to(dtype).transpose(1, 2)  # [B, H, T]
    T = G.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=G.device).tril()
    decay = torch.where(lower, torch.exp(_segment_log_decay(G)), torch.zeros((), dtype=dtype, device=G.device))
    o = ((Q @ K.transpose(-1, -2)) * decay) @ V  # [B, H, T, E]
    to_end = torch.exp(_suffix_log_decay(G))  # exp(b_T - b_j), [B, H, T]
    state = (K * to_end.unsqueeze(-1)).transpose(-1, -2) @ V  # [B, H, D, E]
    if initial_state is not None:
        S0 = initial_state.to(dtype)
        b = G.cumsum(-1)
        o = o + torch.exp(b).unsqueeze(-1) * (Q @ S0)
        state = state + torch.exp(b[..., -1:]).unsqueeze(-1) * S0
    return (scale * o).transpose(1, 2), state


def _cumsum_matrix_form(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward log-space matrix form (SPEC §1) in ``dtype``: ``b = cumsum(g)``,
    ``M_ij = exp(b_i - b_j)`` with the exponent set to -inf above the diagonal *before* the exp.

    Finite for any decay, but its decay gradient inherits the cancellation of ``b_i - b_j`` (see the
    module docstring): exactly the error a careful same-precision implementation has, which is what the
    baseline must measure."""
    Q, K, V = (_heads_first(x, dtype) for x in (q, k, v))  # [B, H, T, D|E]
    b = g.to(dtype).transpose(1, 2).cumsum(-1)  # [B, H, T]
    T = b.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=b.device).tril()
    exponent = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~lower, float("-inf"))
    o = ((Q @ K.transpose(-1, -2)) * torch.exp(exponent)) @ V  # [B, H, T, E]
    to_end = torch.exp(b[..., -1:] - b)  # exp(b_T - b_j), [B, H, T]
    state = (K * to_end.unsqueeze(-1)).transpose(-1, -2) @ V  # [B, H, D, E]
    if initial_state is not None:
        S0 = initial_state.to(dtype)
        o = o + torch.exp(b).unsqueeze(-1) * (Q @ S0)
        state = state + torch.exp(b[..., -1:]).unsqueeze(-1) * S0
    return (scale * o).transpose(1, 2), state


def _per_sequence(fn, q, k, v, g, initial_state, scale, cu_seqlens):
    """Apply ``fn(q, k, v, g, initial_state, scale=...) -> (o, S)`` to every sequence of a packed batch:
    o [1, T, H, E] with 0 at padding, S [N, H, D, E] (one final state per sequence)."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    outs, states = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        o, S = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], s0, scale=scale)
        outs.append(o)
        states.append(S)
    T = q.shape[1]
    if cu[-1] < T:
        outs.append(torch.zeros((1, T - cu[-1], *outs[0].shape[2:]), dtype=outs[0].dtype, device=q.device))
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def la_forward_recurrent_ref(
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
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H] log-decay (g <= 0); any one floating dtype.
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Math (per batch and head, per sequence of a packed batch)::

        S_0 = initial_state
        S_t = exp(g_t) S_{t-1} + k_t v_t^T
        o_t = scale * S_t^T q_t

    Returns:
        ``(o, S_T)``: o [B, T, H, E] and S_T [B, H, D, E], both float64. Differentiable in every input.
    """
    if cu_seqlens is not None:
        check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
        return _per_sequence(la_forward_recurrent_ref, q, k, v, g, initial_state, scale, cu_seqlens)
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state)
    f64 = torch.float64
    Q, K, V = (_heads_first(x, f64) for x in (q, k, v))  # [B, H, T, D|E]
    lam = torch.exp(g.to(f64)).transpose(1, 2)  # [B, H, T]
    if initial_state is None:
        S = torch.zeros(B, H, D, E, dtype=f64, device=q.device)
    else:
        S = initial_state.to(f64)
    outputs = []
    for t in range(T):
        S = lam[..., t, None, None] * S + K[..., t, :, None] * V[..., t, None, :]
        outputs.append((Q[..., t, :].unsqueeze(-2) @ S).squeeze(-2))  # S_t^T q_t, [B, H, E]
    o = scale * torch.stack(outputs, dim=1)  # [B, T, H, E]
    return o, S


def la_forward_matrix_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference by the matrix form, on the inputs' device; stable under any decay.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H] log-decay (g <= 0); any one floating dtype.
        initial_state: [B, H, D, E] or None (zeros).
        scale: multiplies every output.
        cu_seqlens: int64 [N + 1] for a packed batch (B = 1, initial_state [N, H, D, E]), or None.

    Math (per batch and head and, in a packed batch, per sequence; Q, K: [T, D], V: [T, E], S_0: [D, E])::

        b_i  = g_1 + ... + g_i,   alpha_i = exp(b_i)
        M_ij = exp(sum_{j < s <= i} g_s) = exp(b_i - b_j)  for i >= j,  0 for i < j
        O    = scale * ( [(Q K^T) ⊙ M] V + diag(alpha) Q S_0 )
        S_T  = exp(b_T) S_0 + sum_j exp(b_T - b_j) k_j v_j^T

    The exponents are formed masked (never positive) and as direct segment sums, so values and
    autograd gradients in q, k, v, g, S_0 are finite and free of cancellation in every regime
    (see the module docstring). Memory is O(B H T^2).

    Returns:
        ``(o, S_T)``: o [B, T, H, E] and S_T [B, H, D, E], both float64. Differentiable in every input.
    """
    if cu_seqlens is not None:
        check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
        return _per_sequence(la_forward_matrix_ref, q, k, v, g, initial_state, scale, cu_seqlens)
    check_la_forward_inputs(q, k, v, g, initial_state)
    return _matrix_form(q, k, v, g, initial_state, scale, torch.float64)


la_forward_ref = la_forward_matrix_ref
"""The default float64 reference of the family: :func:`la_forward_matrix_ref`."""


def la_forward_baseline(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-precision baseline (SPEC §5): the straightforward matrix form in the kernel's accumulation dtype.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None;
        all in one dtype ``x``.
        scale: multiplies every output.

    The inputs are cast to ``acc = state_dtype_for(x)`` (float32 for bf16/fp16, ``x`` otherwise), the
    matrix form is evaluated in ``acc`` the way SPEC §1 calls stable and a kernel author would write it
    (``b = cumsum(g)`` in ``acc``, ``exp(b_i - b_j)`` masked before the exp), and o is cast back to ``x``.
    Gradients flow back through the casts, so they arrive in ``x`` like a kernel's. Unlike the float64
    reference it does not use segment sums: the baseline measures what an honest computation in this
    precision gets wrong (including the ``b_i - b_j`` cancellation in the decay gradient under strong
    decay), not the best achievable.

    Returns:
        ``(o, S_T)``: o [B, T, H, E] in ``x``; S_T [B, H, D, E] in ``acc``.
    """
    if cu_seqlens is not None:
        check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
        return _per_sequence(la_forward_baseline, q, k, v, g, initial_state, scale, cu_seqlens)
    check_la_forward_inputs(q, k, v, g, initial_state)
    o, state = _cumsum_matrix_form(q, k, v, g, initial_state, scale, state_dtype_for(q.dtype))
    return o.to(q.dtype), state
