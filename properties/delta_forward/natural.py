"""Natural scale of the delta-forward decay gradient (SPEC §5, "natural scale").

la-forward's identity ``dg_t = sum_{s >= t} (q_s.dq_s - k_s.dk_s) + <dS_T, S_T>`` does not hold for the delta rule:
its keys enter twice (``I - beta k k^T`` and ``beta k v^T``), so the decay cannot be moved onto them. It can be
moved onto the values: with ``b_t = sum_{s <= t} g_s`` and ``S_t = exp(b_t) S~_t``::

    S~_t = (I - beta_t k_t k_t^T) S~_{t-1} + beta_t k_t (exp(-b_t) v_t)^T,   o_t = scale S~_t^T (exp(b_t) q_t)

so scaling q_t by exp(b_t) and v_t by exp(-b_t) leaves O unchanged, S_T gains the factor exp(b_T), and::

    dg_t = sum_{s >= t} (q_s.dq_s - v_s.dv_s) + <dS_T, S_T>

Chunked kernels form dg as such differences of larger terms: flash-linear-attention's ``chunk_gated_delta_rule``
sums ``q.dq - k.dk`` plus the UT transform's own terms in reverse within each chunk, with ``<dh, h>`` (state
times state adjoint) at each chunk's end. Under strong (underflowing) decay those terms are O(1) while dg_t is
~exp(g_t) small, so their rounding, eps times the terms, is what a standard algorithm gets — the
la-forward natural scale's reason, with the delta rule's terms. By ``|computed - exact| <= gamma_n sum|terms|``::

    N_t = kappa * ( sum_{s >= t} (‖q_s‖_1 Dq_s + ‖k_s‖_1 Dk_s + sum_e |v_se| Dv_se) + max_{s >= t} sum_e n_s[e] m_s[e] )

with Dq, Dk, Dv the bounds on |dq|, |dk|, |dv| and m, n the column-norm bounds of the state and its adjoint
(:func:`iqa_verify.properties.delta_forward.bounds.column_bounds`: sums of |terms| of the product form, the
transition's norm rho_t = max(1, |1 - beta_t ‖k_t‖²|) included), and kappa the factor for the terms formed within a
step. Unlike linear attention there is no exact *magnitude problem* (the delta rule subtracts in the forward
too), so bounds of the term sizes stand in for it; the last term covers ``<dS_T, S_T>`` and every chunk end's
``<dh, h>``. ``n = 2T + D + E + 2`` is the longest chain of roundings (as for la-forward). The products
``A ⊙ dA`` of the UT transform's backward (``A_tj = beta_t exp(b_t - b_j) k_t.k_j`` within a chunk) are products of
the same quantities (the pseudo-values are corrections ``beta_j (v_j - S'^T k_j)``, bounded by the terms of Dk)
and are not counted separately. The term returned is ``n N`` (float64, [B, T, H]); the tolerance table
multiplies it by the accumulation dtype's eps (:attr:`Kind.NATURAL_SCALE`).

The natural scale only widens what a kernel returning a gradient may be off by; a kernel returning no dg at
all is judged without it. Written here, in the judging code, from the inputs only (nothing shared with a kernel).
"""

from __future__ import annotations

import torch

from iqa_verify.properties.delta_forward.bounds import column_bounds

__all__ = ["dg_natural_scale"]

F64 = torch.float64


def dg_natural_scale(q, k, v, beta, g, initial_state, do, d_state, *, scale: float = 1.0) -> torch.Tensor:
    """``n N`` for dg (see the module docstring): q, k [B, T, H, D], v, do [B, T, H, E], beta, g [B, T, H],
    initial_state and d_state [B, H, D, E] or None; any dtype in, float64 [B, T, H] out."""
    T, D, E = q.shape[1], q.shape[-1], v.shape[-1]
    inputs = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "initial_state": initial_state}
    cots = {"o": do, "final_state": d_state if d_state is not None else torch.zeros(
        q.shape[0], q.shape[2], D, E, dtype=F64)}
    cb = column_bounds(inputs, scale, cots)
    qa, ka, va = (x.detach().to(F64).abs() for x in (q, k, v))
    per_step = qa.sum(-1) * cb.dq + ka.sum(-1) * cb.dk + (va * cb.dv).sum(-1)  # [B, T, H]
    state_terms = (cb.n * cb.m).sum(-1)  # [B, T, H]
    later_state = state_terms.flip(1).cummax(1).values.flip(1)  # max_{s >= t}
    n_terms = per_step.flip(1).cumsum(1).flip(1) + later_state
    return (2 * T + D + E + 2) * cb.kappa * n_terms
