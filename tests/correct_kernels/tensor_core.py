"""What a tensor core does to a product's operands, for the independent kernels written the way GPU kernels are
(``la_forward_tc_operands``, ``gla_forward_tc_operands``): bf16/fp16 inputs, float32 accumulation."""

from __future__ import annotations

import torch

__all__ = ["operand"]


def operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a tensor core takes it: rounded to the input dtype (a no-op for float32/float64), computed on in float32.
    The rounding is passed straight through in the backward (autograd of the casts would round the incoming
    gradient, a chunk's partial sum of the state's gradient, to the input dtype: a rounding no kernel does), so the
    backward is the float32 derivative taken at the rounded operands, as a kernel's backward reuses them."""
    if dtype not in (torch.bfloat16, torch.float16):
        return x
    return x + (x.detach().to(dtype).to(x.dtype) - x.detach())
