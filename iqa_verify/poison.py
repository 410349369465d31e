"""NaN-poisoned scratch memory: catch kernels that read memory they never wrote.

Inside :func:`nan_poisoned_allocations`, ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided``
and ``Tensor.new_empty`` return floating tensors filled with NaN, so a read of an unwritten element
shows up as a NaN in the output instead of a lucky zero from a fresh page.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["nan_poisoned_allocations"]


def _poisoning(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    return wrapper


@contextmanager
def nan_poisoned_allocations() -> Iterator[None]:
    saved = {
        "empty": torch.empty,
        "empty_like": torch.empty_like,
        "empty_strided": torch.empty_strided,
    }
    new_empty = torch.Tensor.new_empty
    try:
        for name, fn in saved.items():
            setattr(torch, name, _poisoning(fn))
        torch.Tensor.new_empty = _poisoning(new_empty)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty
