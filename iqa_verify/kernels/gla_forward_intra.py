"""Intra-chunk scores of :func:`iqa_verify.kernels.gla_forward_chunked.gla_forward_chunked` and their backward.

Per chunk (leading dims [B, H, N]), local steps i, j = 1 .. C, key dimension d::

    A_ij = sum_d q_id k_jd exp(Gamma_ijd)   for i >= j, 0 above,    Gamma_ijd = sum_{j < t <= i} g_td

Two forms of the same A:

* FACTORED (moderate gates): ``exp(Gamma_ijd) = exp(-c_id) exp(c_jd)`` with ``c_j = sum_{t > j} g_t``, so
  ``A = tril((Q ⊙ exp(-c)) (K ⊙ exp(c))^T)``: one matmul per chunk. ``exp(-c)`` reaches ``exp(span)``, which
  the caller bounds (``gate_form``).
* MASKED (any gate): Gamma as a cumulative sum down the rows of a strictly-lower copy of g (sums of one
  sign, never a difference), masked to the underflow floor above the diagonal before the exp:
  O(C^2 D) memory and work per chunk, exact zeros where the gates underflow, never inf or NaN.

Gradients, with dA the (lower-triangular) gradient of A:

* FACTORED, ``Qs = Q ⊙ exp(-c)``, ``Ks = K ⊙ exp(c)``: ``dQs = dA Ks``, ``dKs = dA^T Qs``, ``dq = dQs ⊙ exp(-c)``,
  ``dk = dKs ⊙ exp(c)`` and, since Qs's exponent is ``-sum_{t > i} g_t`` and Ks's ``+sum_{t > j} g_t``,
  ``dg_t = sum_{j < t} (dKs'_j ⊙ Ks_j - dQs'_j ⊙ Qs_j)`` where ' drops the diagonal of dA (``A_ii`` does not
  depend on g: its terms would only cancel up to rounding).
* MASKED, ``W_ijd = exp(Gamma_ijd)``: ``dq_id = sum_j dA_ij k_jd W_ijd``, ``dk_jd = sum_i dA_ij q_id W_ijd`` and,
  with ``G_ijd = dA_ij q_id k_jd W_ijd``, ``dg_td = sum_{i >= t > j} G_ijd`` (a direct sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from iqa_verify.kernels.chunks import batched_matmul

__all__ = ["factored_scores", "factored_scores_backward", "masked_scores", "masked_scores_backward"]


def factored_scores(qc: torch.Tensor, ke: torch.Tensor, exp_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = tril(Qs Ke^T) with Qs = Q / exp(c) (exp(c) >= exp(-span) > 0 in this form).
    qc, ke, exp_c: [..., C, D] -> (A [..., C, C], Qs [..., C, D])."""
    qs = qc / exp_c
    return batched_matmul(qs, ke.transpose(-1, -2)).tril_(), qs


def factored_scores_backward(d_scores: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor, exp_c: torch.Tensor):
    """-> (dq, dKs, dg) of the factored scores; dKs still to be multiplied by exp(c) (the caller merges it)."""
    strict = d_scores.tril(-1)
    d_qs = batched_matmul(strict, ks)
    d_ks = batched_matmul(strict.transpose(-1, -2), qs)
    per_step = d_ks * ks - d_qs * qs  # [..., C, D]
    d_g = F.pad(per_step.cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # sum_{j < t}
    diag = d_scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # dA_ii: [..., C, 1]
    d_qs.addcmul_(diag, ks)
    d_ks.addcmul_(diag, qs)
    return d_qs / exp_c, d_ks, d_g


def _log_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _decay_weights(gc: torch.Tensor) -> torch.Tensor:
    """[..., C, D] gates -> W [..., C(i), C(j), D]: exp(sum_{j < t <= i} g_t) for i >= j, exactly 0 above."""
    C = gc.shape[-2]
    floor = _log_floor(gc.dtype)
    ones = torch.ones(C, C, dtype=gc.dtype, device=gc.device)
    gamma = (gc.unsqueeze(-2) * ones.tril(-1).unsqueeze(-1)).cumsum(dim=-3)  # [..., i, j, D]
    high = (ones.triu(1) * floor).unsqueeze(-1).expand(C, C, gc.shape[-1])
    gamma = torch.maximum(torch.minimum(gamma, high), torch.full_like(high, floor))
    return F.threshold(gamma.exp(), 1.5 * math.exp(floor), 0.0)


def masked_scores(qc: torch.Tensor, kc: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """A_ij = sum_d q_id k_jd W_ijd. qc, kc, gc: [..., C, D] -> [..., C, C]."""
    w = _decay_weights(gc)
    return torch.einsum("...id,...jd,...ijd->...ij", qc, kc, w)


def masked_scores_backward(d_scores: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor, gc: torch.Tensor):
    """-> (dq, dk, dg) of the masked scores (W recomputed from g)."""
    w = _decay_weights(gc)
    dw = d_scores.unsqueeze(-1) * w  # dA_ij W_ijd
    d_q = torch.einsum("...ijd,...jd->...id", dw, kc)
    d_k = torch.einsum("...ijd,...id->...jd", dw, qc)
    contrib = dw * qc.unsqueeze(-2) * kc.unsqueeze(-3)  # G_ijd (0 on and above the diagonal's g-free part)
    below = F.pad(contrib.cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # [i, t]: sum_{j < t} G_ijd
    from_rows = below.flip(-3).cumsum(-3).flip(-3)  # [i, t]: sum_{i' >= i} ... ; need i = t
    d_g = from_rows.diagonal(dim1=-3, dim2=-2).transpose(-1, -2)  # [..., C(t), D]
    return d_q, d_k, d_g
