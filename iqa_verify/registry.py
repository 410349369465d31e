"""Families and built-in kernels, by name, for the CLI, the pytest plugin and reports.

A :class:`Registry` refuses duplicate names and raises ``KeyError`` listing the valid ones. The engine
names no family and no provider: both are found through entry points of the installed distributions.

- ``iqa_verify.families``: ``name = "package.module:FAMILY"``, a :class:`~iqa_verify.family.Family`
  declaration (which also lists the family's built-in PyTorch kernels). The shipped ones are declared in
  this project's ``pyproject.toml``; a user's own family is one more entry point in theirs.
- ``iqa_verify.kernels``: ``name = "package.module:optional_kernels"``, a function returning
  ``Sequence[OptionalKernel]``: kernels that need optional packages (Triton, third-party libraries through
  adapters). Its module must be cheap to import (no import of the optional package itself) and say, for
  each kernel, what is missing when it cannot run here.

Entry points are loaded lazily, so ``iqa-verify --help`` and argument errors stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import EntryPoint, entry_points
from dataclasses import dataclass
from typing import Generic, TypeVar

from iqa_verify.family import BuiltinKernel, Family

__all__ = ["Registry", "FAMILIES", "PROVIDERS", "OptionalKernel", "family", "builtin_kernels",
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


FAMILY_GROUP = "iqa_verify.families"
PROVIDER_GROUP = "iqa_verify.kernels"


def _registry(group: str, what: str) -> Registry[EntryPoint]:
    reg: Registry[EntryPoint] = Registry(what)
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):  # a stable order across installs
        reg.register(ep.name, ep)
    if not len(reg):
        raise RuntimeError(f"no entry points in group {group!r}: iqa-verify is not installed (pip install -e .)")
    return reg


FAMILIES: Registry[EntryPoint] = _registry(FAMILY_GROUP, "family")
"""family name -> entry point of its :class:`~iqa_verify.family.Family` declaration."""
PROVIDERS: Registry[EntryPoint] = _registry(PROVIDER_GROUP, "kernel provider")
"""provider name -> entry point of its ``optional_kernels`` function."""


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (KeyError listing the valid names)."""
    fam = FAMILIES[name].load()
    if not isinstance(fam, Family) or fam.name != name:
        raise TypeError(f"entry point {FAMILIES[name].value!r} of family {name!r} is not the Family {name!r}")
    return fam


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


def optional_kernels() -> list[OptionalKernel]:
    """Every optional kernel of every provider that exists in this installation."""
    out: list[OptionalKernel] = []
    for name in PROVIDERS:
        provide: Callable[[], Sequence[OptionalKernel]] = PROVIDERS[name].load()
        out.extend(provide())
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
