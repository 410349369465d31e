"""Packed variable-length batches (SPEC §6, flash-linear-attention's ``cu_seqlens``) built from a case spec.

:func:`packing` chooses sequence lengths and padding from a seed (lengths of 1, shorter than a chunk, off every
multiple of 16 and 64, many short sequences beside a long one, padding or none); :func:`packed_case` builds the
packed tensors with the family's own case builder, the padding far from the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from iqa_verify.properties.recurrent_forward.form import Inputs, RecurrentForward
from iqa_verify.properties.recurrent_forward.runs import far_from

__all__ = ["PackedCase", "packed_case", "packing"]

_SHORT = (1, 2, 3, 5, 7, 13, 15, 17, 31)  # shorter than a 16- or 64-step chunk, none a multiple of 16


def packing(seed: int, total: int) -> tuple[list[int], int]:
    """Sequence lengths summing to ``total`` and the padding after them, from ``seed`` (three patterns in turn).

    seed % 3 == 0: many short sequences (1, 2, 3, 5, ... 31 steps) beside one long one;
    seed % 3 == 1: random cuts (1 to 6), so lengths off every multiple of 16 and 64 are common;
    seed % 3 == 2: sequences of length 1 around one ragged sequence.
    Padding: 0 when seed % 4 == 0, else 1 to 5 positions. At most 12 sequences.
    """
    rng = random.Random(seed)
    pattern = seed % 3
    if total <= 1:
        lengths = [total]
    elif pattern == 0:
        shorts: list[int] = []
        while len(shorts) < 10:
            n = rng.choice(_SHORT)
            if sum(shorts) + n > total // 2:
                break
            shorts.append(n)
        long = total - sum(shorts)
        at = rng.randint(0, len(shorts))
        lengths = shorts[:at] + [long] + shorts[at:]
    elif pattern == 1:
        cuts = sorted(rng.sample(range(1, total), min(total - 1, rng.randint(1, 6))))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    else:
        ones = min(3, total - 1)
        lengths = [1] * (ones - ones // 2) + [total - ones] + [1] * (ones // 2)
    pad = 0 if seed % 4 == 0 else 1 + seed % 5
    return lengths, pad


@dataclass(frozen=True)
class PackedCase:
    """inputs: every time input [1, T, H, *] (T = sum of lengths + padding; padding inputs far from the rest) and
    initial_state [N, H, D, E] or None, in the contract's order; cu_seqlens: int64 [N + 1]; lengths; pad."""

    inputs: Inputs
    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    pad: int

    @property
    def end(self) -> int:
        return int(sum(self.lengths))

    def describe(self) -> str:
        return f"packed lengths {list(self.lengths)} + {self.pad} padding, cu_seqlens={self.cu_seqlens.tolist()}"


def packed_case(form: RecurrentForward, spec: Any, total: int, dtype: torch.dtype, device: torch.device) -> PackedCase:
    """The packed batch for ``spec`` with ``total`` real positions: lengths from :func:`packing`, every other
    field (shapes, regimes, layout, magnitude, seed) from the spec, one initial state per sequence when the
    spec has one."""
    lengths, pad = packing(spec.seed, total)
    x = form.build(replace(spec, B=1, T=total + pad, initial_state=False), dtype, device)
    if pad:
        x = far_from(form, x, total, torch.Generator().manual_seed(spec.seed + 17))
    if spec.initial_state:
        x["initial_state"] = form.build(replace(spec, B=len(lengths), T=1, seed=spec.seed + 1), dtype, device)["initial_state"]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)
    return PackedCase(x, cu, tuple(lengths), pad)
