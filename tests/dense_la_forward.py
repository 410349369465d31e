"""A correct ``la-forward`` kernel written another way, to show the reference-free and packed-batch properties
raise no false alarms on kernels that round differently from the built-ins: the dense masked-matrix form in
the accumulation dtype (float32 for bf16/fp16), packed batches by a loop over sequences.

    iqa-verify check tests/dense_la_forward.py:la_forward_dense --family la-forward
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for

__all__ = ["la_forward_dense"]


def _dense(q, k, v, g, s0, scale: float):
    """[B, T, H, *] -> o [B, T, H, E], S_T [B, H, D, E] in the accumulation dtype, per batch and head:
    O = scale ((Q K^T) * M) V + scale exp(b) Q S_0, M_ij = exp(b_i - b_j) (i >= j), b = cumsum(g)."""
    acc = state_dtype_for(q.dtype)
    Q, K, V = (x.to(acc).permute(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, *]
    b = g.to(acc).permute(0, 2, 1).cumsum(-1)  # [B, H, T]
    T = b.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    gap = torch.where(lower, b[..., :, None] - b[..., None, :], torch.full((), float("-inf"), dtype=acc, device=q.device))
    o = torch.einsum("bhij,bhje->bhie", torch.einsum("bhid,bhjd->bhij", Q, K) * torch.exp(gap), V)
    state = torch.einsum("bhjd,bhje->bhde", K * torch.exp(b[..., -1:] - b)[..., None], V)
    if s0 is not None:
        S0 = s0.to(acc)
        o = o + torch.exp(b)[..., None] * torch.einsum("bhid,bhde->bhie", Q, S0)
        state = state + torch.exp(b[..., -1])[..., None, None] * S0
    return (scale * o).permute(0, 2, 1, 3).to(q.dtype), state


def la_forward_dense(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """SPEC §1 and §6: q, k [B, T, H, D]; v [B, T, H, E]; g [B, T, H]; initial_state [B, H, D, E] ([N, H, D, E]
    packed) or None -> (o [B, T, H, E] in the input dtype, final_state in the accumulation dtype)."""
    check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    if cu_seqlens is None:
        return _dense(q, k, v, g, initial_state, scale)
    cu = [int(c) for c in cu_seqlens.tolist()]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        o, s = _dense(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b],
                      initial_state[i:i + 1] if initial_state is not None else None, scale)
        outs.append(o)
        finals.append(s)
    outs.append(q.new_zeros(1, q.shape[1] - cu[-1], q.shape[2], v.shape[-1]))
    return torch.cat(outs, 1), torch.cat(finals, 0)
