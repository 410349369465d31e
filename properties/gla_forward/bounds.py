"""Magnitude bounds of ``gla-forward`` (SPEC §6, per-key-dimension gates): the atol scale of its reference-free
properties (``Kind.METAMORPHIC``, see :mod:`iqa_verify.properties.recurrent_forward`).

Row d of the state evolves on its own, ``S_t[d, :] = exp(g_td) S_{t-1}[d, :] + k_td v_t``, so the bounds of
``la-forward`` (:mod:`iqa_verify.properties.la_forward.bounds`) hold row by row with the row's own gate. Per
batch, head and key dimension d, with ``lambda_td = exp(g_td) <= 1``::

    m_0[d] = max_e |S_0[d, e]|,   m_t[d] = lambda_td m_{t-1}[d] + |k_td| ‖v_t‖∞        (|S_t[d, e]| <= m_t[d])
    |o_t[e]| <= |scale| sum_d |q_td| m_t[d] =: bound o           |S_T| <= max_d m_T[d] =: bound final_state

m_t[d] is the sum of |every term| of ``S_t[d, e]`` (each a product of gates and one |k v| or |S_0|), and
``sum_d |q_td| m_t[d]`` the sum of |every term| of o_t[e]: a bound on the terms, whatever order (recurrent,
chunked, factored ``exp(b_i - b_C) exp(b_C - b_j)``) a kernel sums them in. With the cotangents do, dS_T and
the state's adjoint ``dS_t = |scale| q_t do_t^T + diag(lambda_{t+1}) dS_{t+1}``::

    n_T[d] = max_e |dS_T[d, e]| + |scale| |q_Td| ‖do_T‖∞,   n_t[d] = |scale| |q_td| ‖do_t‖∞ + lambda_{t+1,d} n_{t+1}[d]
    |dq_td| <= |scale| m_t[d] ‖do_t‖_1     |dk_td| <= n_t[d] ‖v_t‖_1     |dv_te| <= sum_d n_t[d] |k_td|
    |dS_0[d, e]| <= n_1[d]
    |dg_td| <= E m_{t-1}[d] n_t[d]  and  <= sum_s (|q_sd| |dq_sd| + |k_sd| |dk_sd|) + E m_T[d] n_T[d]

(the second: the per-dimension GLA identity ``dg_td = sum_{s >= t} (q_sd dq_sd - k_sd dk_sd) + <dS_T[d], S_T[d]>``
that chunked kernels use, flash-linear-attention's ``chunk_gla`` among them; the larger of the two is taken).
Each bound is the max over batch, heads, time and dimensions, as a float. As for ``la-forward``, every bound
is then multiplied by ``1 + max|b| / 64``, ``b = cumsum(g)`` over time (per dimension): a kernel that takes
``exp(b_i - b_j)`` from a cumulative sum in its accumulation dtype has an exponent error of eps |b_i|.
Written here, in the judging code, apart from any kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from iqa_verify.properties.recurrent_forward.scan import forward_scan, reverse_scan

__all__ = ["magnitude_bounds"]

F64 = torch.float64


def magnitude_bounds(inputs: Mapping[str, torch.Tensor | None], scale: float,
                     cots: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The bounds of the module docstring. inputs: q, k, g [B, T, H, D], v [B, T, H, E], initial_state
    [B, H, D, E] or None; cots: o [B, T, H, E] and final_state [B, H, D, E], or None (values only).
    Returns {"o", "final_state"} and, with cotangents, {"q", "k", "v", "g", "initial_state"} as floats."""
    q, k, v, g = (inputs[n].detach().to(F64) for n in ("q", "k", "v", "g"))
    B, T, H, D = q.shape
    E = v.shape[-1]
    s0 = inputs.get("initial_state")
    m0 = s0.detach().to(F64).abs().amax(-1) if s0 is not None else q.new_zeros(B, H, D)  # [B, H, D]
    lam = torch.exp(g)  # [B, T, H, D]
    kv = k.abs() * v.abs().amax(-1, keepdim=True)  # |k_td| ‖v_t‖∞
    m_all = forward_scan(lam, kv, m0)  # [B, T, H, D]
    sc = abs(float(scale))
    widen = 1.0 + float(g.cumsum(1).abs().max()) / 64.0
    out = {"o": widen * float((sc * (q.abs() * m_all).sum(-1)).max()), "final_state": widen * float(m_all[:, -1].max())}
    if cots is None:
        return out
    do = cots["o"].detach().to(F64)
    n = cots["final_state"].detach().to(F64).abs().amax(-1)  # [B, H, D]
    qdo = sc * q.abs() * do.abs().amax(-1, keepdim=True)  # [B, T, H, D]
    n_all = reverse_scan(lam, qdo, n)  # [B, T, H, D]: bound on |dS_t[d, :]|
    dq = sc * m_all * do.abs().sum(-1, keepdim=True)
    dk = n_all * v.abs().sum(-1, keepdim=True)
    dv = (n_all * k.abs()).sum(-1)  # [B, T, H]
    m_prev = torch.cat([m0[:, None], m_all[:, :-1]], 1)
    dg_direct = E * m_prev * n_all
    dg_identity = (q.abs() * dq + k.abs() * dk).sum(1) + E * m_all[:, -1] * n_all[:, -1]  # [B, H, D]
    out.update(q=widen * float(dq.max()), k=widen * float(dk.max()), v=widen * float(dv.max()),
               g=widen * max(float(dg_direct.max()), float(dg_identity.max())),
               initial_state=widen * float(n_all[:, 0].max()))
    return out
