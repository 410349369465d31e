"""Magnitude bounds of ``la-forward`` (SPEC §1): the atol scale of its reference-free properties.

:func:`magnitude_bounds` bounds |every term| the outputs and gradients are sums of, from the inputs' magnitudes
alone; ``Kind.METAMORPHIC`` (``METAMORPHIC_GRAD``) allows 64 (128) eps of the accumulation dtype times it (see
:mod:`iqa_verify.properties.recurrent_forward`). Written here, in the judging code, apart from any kernel.
"""

from __future__ import annotations

import torch

from iqa_verify.properties.recurrent_forward.scan import forward_scan, reverse_scan

__all__ = ["magnitude_bounds"]

Inputs = dict[str, torch.Tensor | None]
_SEQ = ("q", "k", "v", "g")  # inputs with a time axis (dim 1)


def magnitude_bounds(inputs: Inputs, scale: float, cots: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Bounds on |every term| the outputs (and gradients) are sums of, from the inputs' magnitudes alone.

    Per batch and head, with ``a_t = ‖k_t‖∞ ‖v_t‖∞`` and ``lambda_t = exp(g_t) <= 1``::

        m_0 = max|S_0|,  m_t = lambda_t m_{t-1} + a_t        (|S_t[d, e]| <= m_t)
        |o_t[e]| <= |scale| ‖q_t‖_1 m_t =: bound o           |S_T| <= m_T =: bound final_state

    and with the cotangents do, dS_T (the adjoint ``dS_t`` of the state)::

        n_{T+1} = max|dS_T|,  n_t = |scale| ‖q_t‖∞ ‖do_t‖∞ + lambda_{t+1} n_{t+1}   (|dS_t[d, e]| <= n_t)
        |dq_t| <= |scale| m_t ‖do_t‖_1    |dk_t| <= n_t ‖v_t‖_1    |dv_t| <= n_t ‖k_t‖_1    |dS_0| <= n_1
        |dg_t| <= D E m_{t-1} n_t  and  <= sum_s (‖q_s‖_1 |dq_s| + ‖k_s‖_1 |dk_s|) (the identity
        dg_t = sum_{s >= t} (q_s . dq_s - k_s . dk_s) standard kernels use; the larger of the two)

    Each bound is the max over batch, heads and time, as a float. Any summation order of those terms has a
    rounding error within n eps of the bound, which is what ``Kind.METAMORPHIC`` allows (64 eps).

    Every bound is then multiplied by ``1 + max|b| / 64``, ``b = cumsum(g)`` within each sequence: a kernel
    that takes ``exp(b_i - b_j)`` from a cumulative sum in its accumulation dtype (a standard algorithm,
    SPEC §5) has an exponent error of eps |b_i|, a relative error of each term that 64 eps alone would not
    admit once the cumulative log-decay passes 64 nats (strong decay over long sequences).
    """
    f64 = torch.float64
    q, k, v, g = (inputs[n].detach().to(f64) for n in _SEQ)
    B, T, H, D = q.shape
    E = v.shape[-1]
    s0 = inputs.get("initial_state")
    m = s0.detach().to(f64).abs().amax((-2, -1)) if s0 is not None else q.new_zeros(B, H)
    lam = torch.exp(g)  # [B, T, H]
    a = k.abs().amax(-1) * v.abs().amax(-1)  # [B, T, H]
    m_all = forward_scan(lam, a, m)  # [B, T, H]: bound on |S_t|
    sc = abs(float(scale))
    q1, k1, v1 = q.abs().sum(-1), k.abs().sum(-1), v.abs().sum(-1)
    widen = 1.0 + float(g.cumsum(1).abs().max()) / 64.0
    out = {"o": widen * float((sc * q1 * m_all).max()), "final_state": widen * float(m_all[:, -1].max())}
    if cots is None:
        return out
    do = cots["o"].detach().to(f64)
    n = cots["final_state"].detach().to(f64).abs().amax((-2, -1))  # [B, H]
    qdo = sc * q.abs().amax(-1) * do.abs().amax(-1)  # [B, T, H]
    n_all = reverse_scan(lam, qdo, n)  # [B, T, H]: bound on |dS_t|
    dq = sc * m_all * do.abs().sum(-1)
    dk, dv = n_all * v1, n_all * k1
    m_prev = torch.cat([(s0.detach().to(f64).abs().amax((-2, -1)) if s0 is not None else q.new_zeros(B, H))[:, None],
                        m_all[:, :-1]], 1)
    dg_direct = D * E * m_prev * n_all
    dg_identity = (q1 * dq + k1 * dk).sum(1)  # [B, H]
    out.update(q=widen * float(dq.max()), k=widen * float(dk.max()), v=widen * float(dv.max()),
               g=widen * max(float(dg_direct.max()), float(dg_identity.max())), initial_state=widen * float(n_all[:, 0].max()))
    return out
