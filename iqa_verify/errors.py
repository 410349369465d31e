"""The one project exception and the two-line ``check_*`` helpers that raise it.

Every message echoes ``name=value`` and the rule that was broken, e.g.
``T=0: sequence length must be >= 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "IqaVerifyError",
    "check_at_least",
    "check_dtype",
    "check_floating",
    "check_ndim",
    "check_one_of",
    "check_same_device",
    "check_shape",
]


class IqaVerifyError(ValueError):
    """Bad input to the suite or to a built-in kernel. The text names the argument and the rule."""


def check_at_least(name: str, value: int | float, minimum: int | float, what: str) -> None:
    if not value >= minimum:
        raise IqaVerifyError(f"{name}={value}: {what} must be >= {minimum}")


def check_one_of(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise IqaVerifyError(f"{name}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.ndim != ndim:
        raise IqaVerifyError(f"{name}.shape={tuple(tensor.shape)}: must be {layout} ({ndim} dims)")


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise IqaVerifyError(f"{name}.shape={tuple(tensor.shape)}: must be {layout} = {tuple(shape)}")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise IqaVerifyError(f"{name}.dtype={tensor.dtype}: must be a floating dtype")


def check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise IqaVerifyError(f"{name}.dtype={tensor.dtype}: must match the other inputs ({dtype})")


def check_same_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise IqaVerifyError(f"{name}.device={tensor.device}: must be on the same device as the other inputs ({device})")
