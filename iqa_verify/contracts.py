"""The kernel contracts (public API, ../shared/SPEC.md): argument checks shared by every kernel.

A kernel of a family may call the matching ``check_*_inputs`` first; it raises
:class:`~iqa_verify.errors.IqaVerifyError` naming the bad argument and the rule, and returns the
sizes. Layout is ``(batch, time, heads, dim)`` as in flash-linear-attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from iqa_verify.errors import (
    check_at_least,
    check_dtype,
    check_floating,
    check_ndim,
    check_same_device,
    check_shape,
)

__all__ = ["LASizes", "check_la_forward_inputs", "state_dtype_for"]


class LASizes(NamedTuple):
    B: int
    T: int
    H: int
    D: int
    E: int


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for bf16/fp16 inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def check_la_forward_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> LASizes:
    """Validate ``la_forward(q, k, v, g, initial_state)`` arguments.

    q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    All on one device in one floating dtype; T >= 1, D >= 1, E >= 1.
    """
    check_ndim("q", q, 4, "[B, T, H, D]")
    check_floating("q", q)
    B, T, H, D = q.shape
    check_at_least("T", T, 1, "sequence length")
    check_at_least("D", D, 1, "key dimension")
    check_ndim("v", v, 4, "[B, T, H, E]")
    E = v.shape[-1]
    check_at_least("E", E, 1, "value dimension")
    check_shape("k", k, (B, T, H, D), "[B, T, H, D]")
    check_shape("v", v, (B, T, H, E), "[B, T, H, E]")
    check_shape("g", g, (B, T, H), "[B, T, H]")
    tensors = {"k": k, "v": v, "g": g}
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, D, E), "[B, H, D, E]")
        tensors["initial_state"] = initial_state
    for name, t in tensors.items():
        check_dtype(name, t, q.dtype)
        check_same_device(name, t, q.device)
    return LASizes(B, T, H, D, E)
