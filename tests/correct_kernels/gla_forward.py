"""Independent correct ``gla_forward`` kernels (SPEC §6), for calibration.

:func:`gla_forward_f64_parallel` is the parallel (attention) form in float64, differentiated by autograd: with
``b_t = sum_{s <= t} g_s`` per key dimension,
``o_t = scale (sum_{s <= t} (q_t * exp(b_t - b_s)) . k_s  v_s  +  (q_t * exp(b_t)) . S_0)`` and
``S_T = sum_s (exp(b_T - b_s) * k_s) v_s^T + exp(b_T) * S_0`` — no recurrence at all, float64-exact up to
the final rounding.

:func:`gla_forward_identity_dg` does what flash-linear-attention's ``chunk_gla`` does for dg, in PyTorch: the
recurrence in the accumulation dtype forward; backward, dq, dk, dv, dS_0 by autograd with g held fixed, and the
gate gradient per key dimension from the identity of the GLA paper, summed in reverse::

    dg_td = sum_{s >= t} (q_sd dq_sd - k_sd dk_sd)  +  <dS_T[d, :], S_T[d, :]>

in the accumulation dtype (float32 for bf16/fp16; ``dg_dtype`` overrides it, for the planted bug that sums it in
the input dtype). Its rounding error is eps times ``sum |q| |dq| + |k| |dk|``, not times |dg|: in a dimension whose
gate underflows dg is ~1e-20 and this kernel returns ~1e-8, which is right at its precision.

:func:`gla_forward_tc_operands` is the chunked form as a GPU kernel with tensor cores computes it (as
flash-linear-attention's ``chunk_gla`` does): chunks of 64, per-dimension chunk-local cumulative gates in float32,
every product's operands in the input dtype with float32 accumulation, so the intra-chunk attention matrix, the
chunk-start state and the decayed keys are each rounded to bf16/fp16 once; the state is carried in float32.
Backward by autograd, at the rounded operands (their rounding passed straight through).
"""

from __future__ import annotations

import math

import torch

from tests.correct_kernels.tensor_core import operand

__all__ = ["gla_forward_f64_parallel", "gla_forward_identity_dg", "gla_forward_tc_operands", "identity_dg_kernel"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def gla_forward_f64_parallel(q, k, v, g, initial_state=None, *, scale=1.0):
    """The parallel form in float64 (autograd); o in the input dtype, the state in the accumulation dtype."""
    f64 = torch.float64
    Q, K, V, G = (x.to(f64).transpose(1, 2) for x in (q, k, v, g))  # [B, H, T, *]
    T = Q.shape[2]
    b = G.cumsum(2)  # [B, H, T, D]
    later = ~torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # s > t: no contribution
    diff = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(later[:, :, None], float("-inf"))  # [B,H,t,s,D]
    A = (Q[:, :, :, None, :] * torch.exp(diff) * K[:, :, None, :, :]).sum(-1)  # [B, H, t, s]
    o = A @ V
    last = torch.exp(b[:, :, -1:, :] - b)  # exp(b_T - b_s): [B, H, T, D]
    S = (K * last).transpose(-1, -2) @ V
    if initial_state is not None:
        S0 = initial_state.to(f64)
        o = o + (Q * torch.exp(b)) @ S0
        S = S + torch.exp(b[:, :, -1, :])[..., None] * S0
    return (scale * o).transpose(1, 2).to(q.dtype), S.to(_acc(q.dtype))


def _recurrence(Q, K, V, G, S):
    """[B, H, T, *] tensors in one dtype; returns o [B, H, T, E] (unscaled) and S_T."""
    outs = []
    for t in range(Q.shape[2]):
        S = torch.exp(G[:, :, t])[..., None] * S + K[:, :, t, :, None] * V[:, :, t, None, :]
        outs.append((Q[:, :, t, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


class _IdentityDg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, dg_dtype):
        acc = _acc(q.dtype)
        Q, K, V, G = (x.to(acc).transpose(1, 2) for x in (q, k, v, g))
        S0 = s0.to(acc) if s0 is not None else torch.zeros(*Q.shape[:2], Q.shape[-1], V.shape[-1], dtype=acc)
        o, S = _recurrence(Q, K, V, G, S0)
        ctx.save_for_backward(q, k, v, g, S0, S)
        ctx.scale, ctx.has_s0, ctx.dg_dtype = scale, s0 is not None, dg_dtype
        return (scale * o).transpose(1, 2).to(q.dtype), S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, S0, S_T = ctx.saved_tensors
        acc = S_T.dtype
        with torch.enable_grad():
            Q, K, V = (x.detach().to(acc).transpose(1, 2).requires_grad_() for x in (q, k, v))
            S0_ = S0.detach().clone().requires_grad_()
            o, S = _recurrence(Q, K, V, g.detach().to(acc).transpose(1, 2), S0_)
            grads = torch.autograd.grad((ctx.scale * o, S), (Q, K, V, S0_), (do.to(acc).transpose(1, 2),
                                        torch.zeros_like(S) if dS is None else dS.to(acc)))
        dQ, dK, dV, dS0 = grads
        dd = ctx.dg_dtype or acc
        Qd, Kd, dQd, dKd = (x.to(dd) for x in (Q.detach(), K.detach(), dQ, dK))
        dg = (Qd * dQd - Kd * dKd).flip(2).cumsum(2).flip(2)  # [B, H, T, D]
        if dS is not None:
            dg = dg + (dS.to(dd) * S_T.detach().to(dd)).sum(-1).unsqueeze(2)
        return (dQ.transpose(1, 2).to(q.dtype), dK.transpose(1, 2).to(k.dtype), dV.transpose(1, 2).to(v.dtype),
                dg.transpose(1, 2).to(g.dtype), dS0.to(S0.dtype) if ctx.has_s0 else None, None, None)


def identity_dg_kernel(q, k, v, g, initial_state=None, *, scale=1.0, dg_dtype=None):
    return _IdentityDg.apply(q, k, v, g, initial_state, scale, dg_dtype)


def gla_forward_identity_dg(q, k, v, g, initial_state=None, *, scale=1.0):
    """The recurrence forward, the gate gradient by the GLA identity in the accumulation dtype (fla's way)."""
    return identity_dg_kernel(q, k, v, g, initial_state, scale=scale)



def gla_forward_tc_operands(q, k, v, g, initial_state=None, *, scale=1.0, chunk=64):
    """Chunked, every product's operands rounded to the input dtype, float32 accumulation and state."""
    dt, acc = q.dtype, _acc(q.dtype)
    Q, K, V, G = (x.to(acc).transpose(1, 2) for x in (q, k, v, g))  # [B, H, T, *]
    B, H, T, D = Q.shape
    S = torch.zeros(B, H, D, V.shape[-1], dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(math.ceil(T / chunk)):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc = Q[:, :, sl], K[:, :, sl], V[:, :, sl]
        b = G[:, :, sl].cumsum(2)  # [B, H, L, D], float32
        L = b.shape[2]
        later = ~torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        diff = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(later[:, :, None], float("-inf"))
        A = operand(scale * (Qc[:, :, :, None, :] * torch.exp(diff) * Kc[:, :, None, :, :]).sum(-1), dt)
        outs.append(A @ Vc + scale * (operand(Qc * torch.exp(b), dt) @ operand(S, dt)))
        decayed_k = operand(Kc * torch.exp(b[:, :, -1:] - b), dt)
        S = torch.exp(b[:, :, -1])[..., None] * S + decayed_k.transpose(-1, -2) @ Vc
    o = torch.cat(outs, dim=2) if outs else Q.new_zeros(B, H, 0, V.shape[-1])
    return o.transpose(1, 2).to(dt), S
