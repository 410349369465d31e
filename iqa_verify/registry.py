"""Families and built-in kernels, by name, for the CLI, the pytest plugin and reports.

A :class:`Registry` refuses duplicate names and raises ``KeyError`` listing the valid ones. Each
family lives in its own module under ``properties/`` (attribute ``FAMILY``), which also lists the
family's built-in kernels; modules are imported lazily so ``iqa-verify --help`` and argument errors
stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from iqa_verify.family import BuiltinKernel, Family

__all__ = ["Registry", "FAMILIES", "family", "builtin_kernels"]

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

    def __len__(self) -> int:
        return len(self._items)


# family name -> module whose FAMILY attribute is the Family
FAMILIES: Registry[str] = Registry("family")
for _name, _module in (
    ("la-forward", "properties.la_forward"),
):
    FAMILIES.register(_name, _module)


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (KeyError listing the valid names)."""
    return importlib.import_module(FAMILIES[name]).FAMILY


def builtin_kernels(family_name: str) -> tuple[BuiltinKernel, ...]:
    return family(family_name).builtin_kernels
