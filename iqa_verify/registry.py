"""Families and built-in kernels, by name, for the CLI, the pytest plugin and reports.

A :class:`Registry` refuses duplicate names and raises ``KeyError`` listing the valid ones. Each
family lives in its own module under ``properties/`` (attribute ``FAMILY``), which also lists the
family's built-in PyTorch kernels; modules are imported lazily so ``iqa-verify --help`` and argument
errors stay fast.

Kernels that need optional packages (Triton, third-party libraries through adapters) come from
*provider* modules listed in :data:`OPTIONAL_PROVIDERS`. A provider has a function
``optional_kernels() -> Sequence[OptionalKernel]``; it must be cheap to import (no import of the
optional package itself) and say, for each kernel, what is missing when it cannot run here.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from iqa_verify.family import BuiltinKernel, Family

__all__ = ["Registry", "FAMILIES", "OPTIONAL_PROVIDERS", "OptionalKernel", "family", "builtin_kernels",
           "optional_kernels", "third_party_kernels"]

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
    ("gla-forward", "properties.gla_forward"),
    ("delta-forward", "properties.delta_forward"),
    ("la-solve-v", "properties.la_inverse.solve_v"),
    ("la-solve-k", "properties.la_inverse.solve_k"),
    ("la-solve-q", "properties.la_inverse.solve_q"),
    ("iqa", "properties.iqa"),
):
    FAMILIES.register(_name, _module)


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (KeyError listing the valid names)."""
    return importlib.import_module(FAMILIES[name]).FAMILY


@dataclass(frozen=True)
class OptionalKernel:
    """A kernel of ``family`` that needs optional packages; ``missing`` says what is absent (None: runnable).

    ``third_party``: a kernel nobody here wrote (through an adapter). The suite's own kernels must hold
    every property (the test suite asserts it); third-party kernels are verified and reported as they are.
    """

    family: str
    kernel: BuiltinKernel
    missing: str | None = None
    third_party: bool = False


OPTIONAL_PROVIDERS: tuple[str, ...] = ("iqa_verify.triton", "iqa_verify.adapters")


def optional_kernels() -> list[OptionalKernel]:
    """Every optional kernel of every provider that exists in this installation."""
    out: list[OptionalKernel] = []
    for name in OPTIONAL_PROVIDERS:
        if importlib.util.find_spec(name) is None:
            continue
        out.extend(importlib.import_module(name).optional_kernels())
    return out


def builtin_kernels(family_name: str) -> tuple[BuiltinKernel, ...]:
    """The suite's own kernels of the family (optional ones included where they can run here)."""
    extra = tuple(o.kernel for o in optional_kernels()
                  if o.family == family_name and o.missing is None and not o.third_party)
    return family(family_name).builtin_kernels + extra


def third_party_kernels(family_name: str) -> tuple[BuiltinKernel, ...]:
    """Third-party kernels of the family (through adapters) that can run here."""
    return tuple(o.kernel for o in optional_kernels()
                 if o.family == family_name and o.missing is None and o.third_party)
