"""Operand rounding of tensor-core kernels: the scale of what rounding each product's inputs costs (SPEC §5).

A chunked kernel on a GPU feeds its products to tensor cores, which take their operands in the input dtype
(bf16/fp16) and accumulate in float32. flash-linear-attention's chunked kernels (and flash-attention's ``P @ V``)
therefore round, once each, the intra-chunk attention matrix ``A_ts = scale (q_t ⊙ k_s) · exp(G_t - G_s)`` before
``A @ v``, the chunk-start state before ``q^T S``, and the decayed keys (or values) before the state update
``S += (k ⊙ exp(G_C - G))^T v``, while the state itself stays in float32. That is the expected practice for
bf16/fp16 (SPEC §5: float32 accumulation, inputs in the low dtype) applied to the intermediate operands too, and
its error is not the baseline's (which never rounds them): on sums with heavy cancellation (``o_t`` or the final
state much smaller than its terms) such a kernel erred by twice the VALUE allowance (measured, issue #14).

Each rounding errs by at most ``u |operand|`` (``u`` the input dtype's unit roundoff), with independent signs, so
the error of an output element is a sum of ``u |term|``-sized contributions: its natural size is the
root-sum-square of the terms, ``N`` below, and ``Kind.OPERAND_ROUNDING`` admits ``eps N`` (2u N: about 3.5 standard
deviations of a sum of uniform roundings). A kernel that rounds a running sum instead (the state carried in bf16,
the cumulative log-gate in bf16) errs by ``u |partial sum|`` at every step, which grows with the sequence where
``N`` does not: the bug zoo's ``state_in_input_dtype`` and ``cumsum_in_input_dtype`` stay caught.

For one output element (a sequence, a head; ``e`` a value dimension)::

    N(o_t,e)^2  = 2 sum_{s<=t} (A_ts v_se)^2  +  sum_d (scale q_td S_t,de)^2
                  (A rounded, the decayed keys rounded into the state, the state rounded for q^T S)
    N(S_T,de)^2 = sum_s (exp(G_T,d - G_s,d) k_sd v_se)^2  +  (exp(G_T,d) S_0,de)^2

with ``G`` the cumulative log gate (a scalar per step for ``la-forward``, per key dimension for ``gla-forward``)
and ``S_t`` the float64 state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["operand_rounding_scales"]

_ROWS_ELEMENTS = 1 << 22  # per block of rows of A in the per-dimension-gate path (float64 elements: 32 MiB)


def _intra_squares(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_{s<=t} (A_ts v_se)^2 on [B, H, T, *] tensors; G [B, H, T] (scalar gate) or [B, H, T, D]."""
    B, H, T, D = q.shape
    idx = torch.arange(T, device=q.device)
    if G.dim() == 3:
        lower = idx[:, None] >= idx[None, :]
        expo = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf"))
        A = scale * (q @ k.transpose(-1, -2)) * torch.exp(expo)
        return (A * A) @ (v * v)
    rows = max(1, _ROWS_ELEMENTS // max(1, B * H * T * D))
    out = []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        lower = idx[t0:t1, None] >= idx[None, :]  # [rows, T]
        expo = (G[:, :, t0:t1, None, :] - G[:, :, None, :, :]).masked_fill(~lower[..., None], float("-inf"))
        A = scale * (q[:, :, t0:t1, None, :] * k[:, :, None, :, :] * torch.exp(expo)).sum(-1)  # [B, H, rows, T]
        out.append((A * A) @ (v * v))
    return torch.cat(out, dim=2)


def operand_rounding_scales(inputs: Mapping[str, torch.Tensor | None], scale: float) -> dict[str, torch.Tensor]:
    """``{"o": N [B, T, H, E], "final_state": N [B, H, D, E]}`` (float64) for a gated linear recurrence
    ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` (``g`` [B, T, H] or [B, T, H, D]), ``o_t = scale S_t^T q_t``: the
    root-sum-square of the terms whose operands a tensor-core kernel rounds (module docstring)."""
    f64 = torch.float64
    q, k, v = (inputs[n].detach().to(f64).transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D|E]
    g = inputs["g"].detach().to(f64).transpose(1, 2)  # [B, H, T] or [B, H, T, D]
    s0 = inputs.get("initial_state")
    B, H, T, D = q.shape
    E = v.shape[-1]
    intra2 = _intra_squares(q, k, v, g.cumsum(2), scale)
    S = torch.zeros(B, H, D, E, dtype=f64, device=q.device) if s0 is None else s0.detach().to(f64)
    S2 = S * S
    inter2 = []
    k2, v2, q2 = k * k, v * v, q * q
    for t in range(T):
        lam = torch.exp(g[:, :, t])
        lam = lam[..., None, None] if lam.dim() == 2 else lam[..., :, None]
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        S2 = (lam * lam) * S2 + k2[:, :, t, :, None] * v2[:, :, t, None, :]
        inter2.append((scale * scale) * (q2[:, :, t, :, None] * (S * S)).sum(-2))  # [B, H, E]
    n_o = torch.sqrt(2 * intra2 + torch.stack(inter2, dim=2))  # T >= 1 (the contract)
    return {"o": n_o.transpose(1, 2), "final_state": torch.sqrt(S2)}
