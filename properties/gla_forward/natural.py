"""Natural scale of the gla-forward decay gradient (SPEC §5, "natural scale"), per key dimension.

The identity of ``la-forward`` (:mod:`iqa_verify.properties.la_forward.natural`) holds for every key dimension on
its own. With ``b_td = sum_{s <= t} g_sd``, scaling ``q_td`` by ``exp(b_td)`` and ``k_td`` by ``exp(-b_td)`` leaves
O unchanged (``S_t = diag(exp(b_t)) S~_t`` with S~ the ungated state of the scaled keys), and S_T gains the factor
``exp(b_Td)`` in row d, so::

    dL/db_td = q_td dq_td - k_td dk_td  (+ <dS_T[d, :], S_T[d, :]> at t = T)
    dg_td   = sum_{s >= t} (q_sd dq_sd - k_sd dk_sd) + <dS_T[d, :], S_T[d, :]>

This is how the GLA paper and flash-linear-attention's ``chunk_gla`` form dg (``dg = q * dq - k * dk`` summed in
reverse, plus the state term): a difference of terms that under a strongly gated (underflowing) dimension are
O(1) while dg_td itself is ~1e-20. By the standard bound ``|computed - exact| <= gamma_n sum |terms|``, with dq, dk
themselves carrying the rounding of their own sums, the error is at most ``gamma_n N_td``::

    N_td = sum_{s >= t} (|q_sd| Dq_sd + |k_sd| Dk_sd) + sum_e |dS_T[d, e]| S̄_T[d, e]

where Dq, Dk, S̄_T are the gradients and final state of the *magnitude problem* (the recurrence on |q|, |k|, |v|,
|S_0| with the same gates and cotangents |do|, |dS_T|: the sums of |terms| that form dq, dk, S_T; the gates are
positive factors, so nothing cancels there). They are computed by the magnitude problem's own recurrences in
float64, forward for its state and backward for its adjoint, one step at a time (every step's state kept:
O(B T H D E) memory)::

    S̄_t = diag(exp(g_t)) S̄_{t-1} + |k_t| |v_t|^T   (S̄_0 = |S_0|)         Dq_t = |scale| S̄_t |do_t|
    dS̄_t = |scale| |q_t| |do_t|^T + diag(exp(g_{t+1})) dS̄_{t+1}   (dS̄_T includes |dS_T|)      Dk_t = dS̄_t |v_t|

and ``n = 2T + E + 3`` the longest chain of roundings
(T + E terms in dq, one product q_td dq_td — no sum over d, unlike la-forward's D —, T in the reverse sum, the
exp and the state term's E). The term returned is ``n N`` (float64, [B, T, H, D]); the tolerance table
multiplies it by the accumulation dtype's eps (:attr:`Kind.NATURAL_SCALE`).

The natural scale only widens what a kernel returning a gradient may be off by; a kernel returning no dg at
all is judged without it. Written here, in the judging code, from the float64 reference only.
"""

from __future__ import annotations

import torch

__all__ = ["dg_natural_scale"]

F64 = torch.float64


def dg_natural_scale(q, k, v, g, initial_state, do, d_state, *, scale: float = 1.0) -> torch.Tensor:
    """``n N`` for dg (see the module docstring): q, k, g [B, T, H, D], v, do [B, T, H, E], initial_state and
    d_state [B, H, D, E] or None; any dtype in, float64 [B, T, H, D] out."""
    qa, ka, va, dov = (x.detach().to(F64).abs() for x in (q, k, v, do))
    lam = torch.exp(g.detach().to(F64))
    B, T, H, D = qa.shape
    E = va.shape[-1]
    sc = abs(float(scale))
    S = initial_state.detach().to(F64).abs() if initial_state is not None else qa.new_zeros(B, H, D, E)
    gates = lam[..., None].unbind(1)  # per-step views [B, H, D, 1]: the loops below are the recurrences alone
    states = []
    for lam_t, kv_t in zip(gates, (ka[..., None] * va[..., None, :]).unbind(1)):
        S = lam_t * S + kv_t
        states.append(S)
    dq = sc * torch.einsum("bthde,bthe->bthd", torch.stack(states, 1), dov)  # |scale| S̄_t |do_t|
    cot_s = d_state.detach().to(F64).abs() if d_state is not None else torch.zeros_like(S)
    dS, adjoints = cot_s, [None] * T
    q_do = (sc * qa[..., None] * dov[..., None, :]).unbind(1)  # |scale| |q_t| |do_t|^T
    for t in range(T - 1, -1, -1):
        if t + 1 < T:
            dS = gates[t + 1] * dS
        dS = dS + q_do[t]
        adjoints[t] = dS
    dk = torch.einsum("bthde,bthe->bthd", torch.stack(adjoints, 1), va)  # dS̄_t |v_t|
    per_step = qa * dq + ka * dk  # [B, T, H, D]
    n_terms = per_step.flip(1).cumsum(1).flip(1) + (cot_s * S).sum(-1).unsqueeze(1)
    return (2 * T + E + 3) * n_terms
