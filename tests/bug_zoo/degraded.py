"""A kernel that lost precision but still passes: what the regression gate (``iqa-verify gate``) is for.

It rounds the chunked kernel's output to 16 mantissa bits: a relative error of ~8e-6, inside the float32
value tolerance (rtol 2e-5) but some 30x the built-in kernel's usual error ratio.
"""

from __future__ import annotations

import torch

from iqa_verify.kernels.la_forward_chunked import la_forward_chunked

__all__ = ["precision_loss_within_tolerance"]


def precision_loss_within_tolerance(q, k, v, g, initial_state=None, *, scale=1.0):
    o, state = la_forward_chunked(q, k, v, g, initial_state, scale=scale)
    mantissa, exponent = torch.frexp(o.detach())
    rounded = torch.ldexp(torch.round(mantissa * 2**16) / 2**16, exponent)
    return o + (rounded - o).detach(), state
