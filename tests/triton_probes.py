"""Tiny Triton kernels the tests launch to probe one device function (imported only where Triton runs)."""

from __future__ import annotations

from iqa_verify.triton.mode import apply_interpret_mode

apply_interpret_mode()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from iqa_verify.triton.rounding import to_output  # noqa: E402


@triton.jit
def _store_as_output(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y + offs, to_output(tl.load(x + offs, mask=m), y.dtype.element_ty), mask=m)


def stored_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32, 1-D) stored by a Triton program through :func:`to_output` into a ``dtype`` buffer."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _store_as_output[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), BLOCK=128)
    return y
