"""Independent correct ``la_forward`` kernels (SPEC §1), for calibration.

- :func:`la_forward_f64_recurrent`: the textbook recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``,
  ``o_t = scale S_t^T q_t`` computed step by step in float64 and differentiated by autograd; outputs cast
  to the contract's dtypes. Float64-exact up to the final rounding.
- :func:`la_forward_identity_dg`: what flash-linear-attention's ``chunk_simple_gla`` does, in PyTorch:
  a chunked forward (chunks of 16; within a chunk ``exp(b_i - b_j)`` from a chunk-local cumulative sum of
  g, across chunks the carried state) in the accumulation dtype, and a hand-written backward in which
  dq, dk, dv, dS_0 come from the chunked form with g held fixed and the decay gradient from the identity
  of the GLA paper, summed in reverse::

      dg_t = sum_{s >= t} (q_s · dq_s - k_s · dk_s)  +  <dS_T, S_T>

  in the accumulation dtype (float32 for bf16/fp16). Its rounding error is eps times
  ``sum |q| |dq| + |k| |dk|``, not times |dg|: under underflowing decay dg is ~1e-20 and this kernel returns
  ~1e-8, which is right at its precision.
- :func:`la_forward_tc_operands`: the chunked forward as a GPU kernel with tensor cores computes it (as
  flash-linear-attention's ``chunk_simple_gla`` forward does): chunks of 64, every product's operands in the
  input dtype and its accumulation in float32, so the intra-chunk attention matrix, the chunk-start state (for
  ``q^T S``) and the decayed keys (for the state update) are each rounded to bf16/fp16 once, while the state is
  carried in float32. Backward by autograd, at the rounded operands (their rounding passed straight through).
"""

from __future__ import annotations

import math

import torch

from tests.correct_kernels.tensor_core import operand

__all__ = ["la_forward_f64_recurrent", "la_forward_identity_dg", "la_forward_tc_operands", "identity_dg_kernel"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def la_forward_f64_recurrent(q, k, v, g, initial_state=None, *, scale=1.0):
    """The recurrence in float64, one step at a time (autograd); o in the input dtype, state in the
    accumulation dtype."""
    f64 = torch.float64
    Q, K, V = (x.to(f64).transpose(1, 2) for x in (q, k, v))
    lam = torch.exp(g.to(f64)).transpose(1, 2)
    B, H, T, D = Q.shape
    E = V.shape[-1]
    S = torch.zeros(B, H, D, E, dtype=f64) if initial_state is None else initial_state.to(f64)
    outs = []
    for t in range(T):
        S = lam[:, :, t, None, None] * S + K[:, :, t, :, None] * V[:, :, t, None, :]
        outs.append(scale * (Q[:, :, t, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=1).to(q.dtype), S.to(_acc(q.dtype))


def _chunked(Q, K, V, G, S, scale, chunk=16):
    """Chunked form on [B, H, T, *] tensors in one dtype; returns o [B, H, T, E] and S_T."""
    T = Q.shape[2]
    outs = []
    for n in range(math.ceil(T / chunk)):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc = Q[:, :, sl], K[:, :, sl], V[:, :, sl]
        b = G[:, :, sl].cumsum(-1)
        L = b.shape[-1]
        lower = torch.ones(L, L, dtype=torch.bool).tril()
        M = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        outs.append(scale * (((Qc @ Kc.transpose(-1, -2)) * M) @ Vc + torch.exp(b)[..., None] * (Qc @ S)))
        S = torch.exp(b[..., -1])[..., None, None] * S + (Kc * torch.exp(b[..., -1:] - b)[..., None]).transpose(-1, -2) @ Vc
    return torch.cat(outs, dim=2), S


class _IdentityDg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, dg_dtype):
        acc = _acc(q.dtype)
        Q, K, V = (x.to(acc).transpose(1, 2) for x in (q, k, v))
        G = g.to(acc).transpose(1, 2)
        S0 = s0.to(acc) if s0 is not None else torch.zeros(*Q.shape[:2], Q.shape[-1], V.shape[-1], dtype=acc)
        o, S = _chunked(Q, K, V, G, S0, scale)
        ctx.save_for_backward(q, k, v, g, S0, S)
        ctx.scale, ctx.has_s0, ctx.dg_dtype = scale, s0 is not None, dg_dtype
        return o.transpose(1, 2).to(q.dtype), S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, S0, S_T = ctx.saved_tensors
        acc = S_T.dtype
        with torch.enable_grad():
            Q, K, V = (x.detach().to(acc).transpose(1, 2).requires_grad_() for x in (q, k, v))
            S0_ = S0.detach().clone().requires_grad_()
            o, S = _chunked(Q, K, V, g.detach().to(acc).transpose(1, 2), S0_, ctx.scale)
            grads = torch.autograd.grad((o, S), (Q, K, V, S0_), (do.to(acc).transpose(1, 2),
                                        torch.zeros_like(S) if dS is None else dS.to(acc)))
        dQ, dK, dV, dS0 = grads
        dd = ctx.dg_dtype or acc  # the planted bug computes the identity in the input dtype
        Qd, Kd, dQd, dKd = (x.to(dd) for x in (Q.detach(), K.detach(), dQ, dK))
        local = (Qd * dQd).sum(-1) - (Kd * dKd).sum(-1)  # [B, H, T]
        dg = local.flip(-1).cumsum(-1).flip(-1)
        if dS is not None:
            dg = dg + (dS.to(dd) * S_T.detach().to(dd)).sum((-1, -2)).unsqueeze(-1)
        return (dQ.transpose(1, 2).to(q.dtype), dK.transpose(1, 2).to(k.dtype), dV.transpose(1, 2).to(v.dtype),
                dg.transpose(1, 2).to(g.dtype), dS0.to(S0.dtype) if ctx.has_s0 else None, None, None)


def identity_dg_kernel(q, k, v, g, initial_state=None, *, scale=1.0, dg_dtype=None):
    o, S = _IdentityDg.apply(q, k, v, g, initial_state, scale, dg_dtype)
    return o, S


def la_forward_identity_dg(q, k, v, g, initial_state=None, *, scale=1.0):
    """Chunked forward, decay gradient by the GLA identity in the accumulation dtype (fla's way)."""
    return identity_dg_kernel(q, k, v, g, initial_state, scale=scale)



def la_forward_tc_operands(q, k, v, g, initial_state=None, *, scale=1.0, chunk=64):
    """Chunked, every product's operands rounded to the input dtype, float32 accumulation and state."""
    dt, acc = q.dtype, _acc(q.dtype)
    Q, K, V = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    G = g.to(acc).transpose(1, 2)
    B, H, T, D = Q.shape
    S = torch.zeros(B, H, D, V.shape[-1], dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(math.ceil(T / chunk)):
        sl = slice(n * chunk, min((n + 1) * chunk, T))
        Qc, Kc, Vc = Q[:, :, sl], K[:, :, sl], V[:, :, sl]
        b = G[:, :, sl].cumsum(-1)  # chunk-local cumulative log decay, float32
        L = b.shape[-1]
        lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        M = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))
        A = operand(scale * (Qc @ Kc.transpose(-1, -2)) * M, dt)
        outs.append(A @ Vc + (scale * torch.exp(b))[..., None] * (Qc @ operand(S, dt)))
        decayed_k = operand(Kc * torch.exp(b[..., -1:] - b)[..., None], dt)
        S = torch.exp(b[..., -1])[..., None, None] * S + decayed_k.transpose(-1, -2) @ Vc
    o = torch.cat(outs, dim=2) if outs else Q.new_zeros(B, H, 0, V.shape[-1])
    return o.transpose(1, 2).to(dt), S
