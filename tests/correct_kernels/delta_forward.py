"""Independent correct ``delta_forward`` kernels (SPEC §6), for calibration.

:func:`delta_forward_f64_transitions` multiplies by each step's transition matrix in float64,
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t`` (the matrix form,
not the prediction-error form of the built-ins), differentiated by autograd; float64-exact up to the final
rounding.

:func:`delta_forward_identity_dg` takes its decay gradient from an identity.

With ``b_t = sum_{s <= t} g_s`` the decay can be moved onto the values and queries (``S_t = exp(b_t) S~_t``,
``S~_t = (I - beta_t k_t k_t^T) S~_{t-1} + beta_t k_t (exp(-b_t) v_t)^T``, ``o_t = scale S~_t^T (exp(b_t) q_t)``), so::

    dg_t = sum_{s >= t} (q_s . dq_s - v_s . dv_s)  +  <dS_T, S_T>

:func:`delta_forward_identity_dg` runs the recurrence in the accumulation dtype forward; backward, dq, dk, dv,
dbeta, dS_0 by autograd with g held fixed and dg from the identity, summed in reverse in the accumulation dtype
(``dg_dtype`` overrides it, for the planted bug that sums it in the input dtype). Its rounding error is eps times
``sum |q| |dq| + |v| |dv|``: under underflowing decay dg is ~exp(g) small while this kernel returns ~1e-8.
"""

from __future__ import annotations

import torch

__all__ = ["delta_forward_f64_transitions", "delta_forward_identity_dg", "identity_dg_kernel"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def delta_forward_f64_transitions(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """The transition-matrix recurrence in float64 (autograd); o in the input dtype, the state in the
    accumulation dtype."""
    f64 = torch.float64
    Q, K, V = (x.to(f64).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    Beta = beta.to(f64).transpose(1, 2)  # [B, H, T]
    decay = None if g is None else torch.exp(g.to(f64).transpose(1, 2))
    B, H, T, D = Q.shape
    eye = torch.eye(D, dtype=f64, device=q.device)
    S = torch.zeros(B, H, D, V.shape[-1], dtype=f64, device=q.device) if initial_state is None else initial_state.to(f64)
    outs = []
    for t in range(T):
        k_t = K[:, :, t]
        A = eye - Beta[:, :, t, None, None] * (k_t[..., :, None] * k_t[..., None, :])
        if decay is not None:
            A = decay[:, :, t, None, None] * A
        S = A @ S + (Beta[:, :, t, None] * k_t)[..., None] * V[:, :, t, None, :]
        outs.append((Q[:, :, t, None, :] @ S).squeeze(-2))
    return (scale * torch.stack(outs, dim=2)).transpose(1, 2).to(q.dtype), S.to(_acc(q.dtype))


def _recurrence(Q, K, V, Beta, G, S):
    """[B, H, T, *] tensors in one dtype (G None: no decay); returns o [B, H, T, E] (unscaled) and S_T."""
    outs = []
    for t in range(Q.shape[2]):
        if G is not None:
            S = torch.exp(G[:, :, t])[..., None, None] * S
        k_t = K[:, :, t]
        error = V[:, :, t] - (k_t[..., None, :] @ S).squeeze(-2)
        S = S + (Beta[:, :, t, None] * k_t)[..., None] * error[..., None, :]
        outs.append((Q[:, :, t, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


class _IdentityDg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale, dg_dtype):
        acc = _acc(q.dtype)
        Q, K, V, Beta = (x.to(acc).transpose(1, 2) for x in (q, k, v, beta))
        G = None if g is None else g.to(acc).transpose(1, 2)
        S0 = s0.to(acc) if s0 is not None else torch.zeros(*Q.shape[:2], Q.shape[-1], V.shape[-1], dtype=acc)
        o, S = _recurrence(Q, K, V, Beta, G, S0)
        ctx.save_for_backward(q, k, v, beta, g, S0, S)
        ctx.scale, ctx.has_s0, ctx.dg_dtype = scale, s0 is not None, dg_dtype
        return (scale * o).transpose(1, 2).to(q.dtype), S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, beta, g, S0, S_T = ctx.saved_tensors
        acc = S_T.dtype
        with torch.enable_grad():
            Q, K, V, Beta = (x.detach().to(acc).transpose(1, 2).requires_grad_() for x in (q, k, v, beta))
            S0_ = S0.detach().clone().requires_grad_()
            G = None if g is None else g.detach().to(acc).transpose(1, 2)
            o, S = _recurrence(Q, K, V, Beta, G, S0_)
            grads = torch.autograd.grad((ctx.scale * o, S), (Q, K, V, Beta, S0_), (do.to(acc).transpose(1, 2),
                                        torch.zeros_like(S) if dS is None else dS.to(acc)))
        dQ, dK, dV, dBeta, dS0 = grads
        dg = None
        if g is not None:
            dd = ctx.dg_dtype or acc
            Qd, Vd, dQd, dVd = (x.to(dd) for x in (Q.detach(), V.detach(), dQ, dV))
            dg = ((Qd * dQd).sum(-1) - (Vd * dVd).sum(-1)).flip(2).cumsum(2).flip(2)  # [B, H, T]
            if dS is not None:
                dg = dg + (dS.to(dd) * S_T.detach().to(dd)).sum((-1, -2)).unsqueeze(-1)
            dg = dg.transpose(1, 2).to(g.dtype)
        return (dQ.transpose(1, 2).to(q.dtype), dK.transpose(1, 2).to(k.dtype), dV.transpose(1, 2).to(v.dtype),
                dBeta.transpose(1, 2).to(beta.dtype), dg, dS0.to(S0.dtype) if ctx.has_s0 else None, None, None)


def identity_dg_kernel(q, k, v, beta, g=None, initial_state=None, *, scale=1.0, dg_dtype=None):
    return _IdentityDg.apply(q, k, v, beta, g, initial_state, scale, dg_dtype)


def delta_forward_identity_dg(q, k, v, beta, g=None, initial_state=None, *, scale=1.0):
    """The recurrence forward, the decay gradient by the identity in the accumulation dtype."""
    return identity_dg_kernel(q, k, v, beta, g, initial_state, scale=scale)
