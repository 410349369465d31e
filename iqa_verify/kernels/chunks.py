"""Chunk-layout helpers shared by the chunked la-forward kernels (factored and masked paths).

Time-major tensors ``[B, T, H, F]`` go into the heads-first chunk layout ``[B, H, N, C, F]`` (N = ceil(T / C)
chunks of C steps, the last one zero-padded) and back, and batched matmuls run over its leading dims
``[B, H, N]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["batched_matmul", "from_chunk_layout", "to_chunk_layout"]


def to_chunk_layout(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, F] -> [B, H, N, C, F] in ``dtype``, zero-padding time to N * C steps."""
    B, T, H, width = x.shape
    x = x.to(dtype)
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, n_chunks, chunk, H, width).permute(0, 3, 1, 2, 4).contiguous()


def from_chunk_layout(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, F] -> [B, T, H, F] in ``dtype``, dropping the padded steps."""
    B, H, N, C, width = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, width)[:, :T].to(dtype)


def batched_matmul(
    a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, add: torch.Tensor | None = None, inplace: bool = False
) -> torch.Tensor:
    """``alpha * a @ b (+ add)`` over the leading batch dims, as one ``baddbmm`` (no extra passes).

    With ``inplace=True`` the product is accumulated into ``add`` (contiguous) and ``add`` is returned.
    """
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    shape = (*a.shape[:-1], b.shape[-1])
    if add is None and alpha == 1.0:
        return torch.bmm(a3, b3).view(shape)
    if add is None:
        base = a3.new_empty(a3.shape[0], a3.shape[1], b3.shape[2])
        return torch.baddbmm(base, a3, b3, beta=0.0, alpha=alpha).view(shape)
    base = add.view(-1, *shape[-2:]) if inplace else add.reshape(-1, *shape[-2:])
    if inplace:
        base.baddbmm_(a3, b3, alpha=alpha)
        return add
    return torch.baddbmm(base, a3, b3, alpha=alpha).view(shape)
