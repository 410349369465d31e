"""First-order linear recurrences along the time axis, for the judging code's magnitude bounds.

``m_t = a_t m_{t-1} + b_t`` (forward) and ``n_t = b_t + a_{t+1} n_{t+1}`` (reverse, an adjoint's) over dim 1 of
``a`` and ``b``, in whatever dtype they come in (the bounds use float64). The loops take per-step views from one
``unbind`` each, so a step costs two tensor ops: the bounds run for every case and every split or packed
sequence of the reference-free properties, at lengths up to 1100 in ci. Written here, in the judging code,
apart from any kernel.
"""

from __future__ import annotations

import torch

__all__ = ["forward_scan", "reverse_scan"]


def forward_scan(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``m_t = a_t * m_{t-1} + b_t`` for t = 0 .. T-1 (dim 1 of a and b) from ``m_{-1} = start``: every m_t,
    stacked along dim 1. ``a_t`` broadcasts against m (e.g. a [B, T, H, 1] with m [B, H, E])."""
    m, out = start, []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        m = a_t * m + b_t
        out.append(m)
    return torch.stack(out, 1)


def reverse_scan(a: torch.Tensor, b: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``n_t = b_t + a_{t+1} * n_{t+1}`` for t = T-1 .. 0, with ``n_{T-1} = b_{T-1} + end`` (the cotangent of the
    last state enters undecayed): every n_t, stacked along dim 1."""
    a_steps, b_steps = a.unbind(1), b.unbind(1)
    T = len(b_steps)
    n, out = end, [end] * T
    for t in range(T - 1, -1, -1):
        n = b_steps[t] + (a_steps[t + 1] * n if t + 1 < T else n)
        out[t] = n
    return torch.stack(out, 1)
