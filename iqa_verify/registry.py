"""Families and built-in kernels, by name, for the CLI, the pytest plugin and reports.

A :class:`Registry` refuses duplicate names and raises ``KeyError`` listing the valid ones.
Families are imported lazily: ``iqa-verify list`` and argument errors stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from iqa_verify.family import Family

__all__ = ["Registry", "BuiltinKernel", "FAMILIES", "BUILTIN_KERNELS", "family", "builtin_kernels"]

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self._what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self._what} {name!r} is already registered")
        self._items[name] = item

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"{name!r}: no such {self._what}; valid: {', '.join(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()


@dataclass(frozen=True)
class BuiltinKernel:
    """A kernel shipped with the suite: its IMPL path (as a user would type it), family and summary."""

    impl: str
    family: str
    summary: str


# family name -> module whose FAMILY attribute is the Family
FAMILIES: Registry[str] = Registry("family")
FAMILIES.register("la-forward", "properties.la_forward")

BUILTIN_KERNELS: Registry[BuiltinKernel] = Registry("built-in kernel")
for _k in (
    BuiltinKernel("iqa_verify.kernels.la_forward_recurrent:la_forward_recurrent", "la-forward",
                  "loop over time, float32 state for bf16/fp16"),
    BuiltinKernel("iqa_verify.kernels.la_forward_chunked:la_forward_chunked", "la-forward",
                  "chunked (chunk 64): intra-chunk matmuls, log-space decay, state passed between chunks"),
):
    BUILTIN_KERNELS.register(_k.impl, _k)


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (KeyError listing the valid names)."""
    return importlib.import_module(FAMILIES[name]).FAMILY


def builtin_kernels(family_name: str | None = None) -> list[BuiltinKernel]:
    return [k for _, k in BUILTIN_KERNELS.items() if family_name in (None, k.family)]
