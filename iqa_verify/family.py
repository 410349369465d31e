"""What the engine knows about a family of operators: how to make cases, call a kernel, and judge it.

A :class:`Family` bundles a contract (signature, output names), a case strategy, a float64 reference,
a same-precision baseline and its :class:`Property` list. Families live under ``properties/``; the
engine (runner, CLI, pytest plugin, reports) only sees this interface.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from hypothesis.strategies import SearchStrategy

from iqa_verify.comparison import TensorCheck
from iqa_verify.diagnostics import Diagnostic
from iqa_verify.profiles import Profile

__all__ = [
    "BuiltinKernel",
    "Case",
    "CaseSpec",
    "Family",
    "KernelRaised",
    "NotApplicable",
    "OutputSpec",
    "Property",
    "PropertyContext",
    "Violation",
]

Tensors = dict[str, torch.Tensor]


class CaseSpec(Protocol):
    """A small, frozen, JSON-serialisable description of one generated input (shapes, regime, seed)."""

    def to_json(self) -> str: ...

    def regime(self) -> str: ...


@dataclass(frozen=True)
class Case:
    """One concrete input: the spec it was built from, the positional inputs in contract order
    (``None`` where an optional input is absent), the keyword arguments, and dtype/device."""

    spec: Any
    inputs: dict[str, torch.Tensor | None]
    kwargs: dict[str, Any]
    dtype: torch.dtype
    device: torch.device

    def tensors(self) -> Tensors:
        return {n: t for n, t in self.inputs.items() if t is not None}

    def shapes(self) -> str:
        return ", ".join(f"{n}{list(t.shape)}" for n, t in self.tensors().items())


@dataclass(frozen=True)
class OutputSpec:
    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]


class Violation(Exception):
    """A property does not hold on a case. ``checks`` are the tensor comparisons behind it (all of them)."""

    def __init__(self, message: str, checks: Sequence[TensorCheck] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.checks = list(checks)


class KernelRaised(Violation):
    """The kernel under test raised on a valid input: a failing verdict, not a harness crash."""


class NotApplicable(Exception):
    """The property does not apply to this kernel (e.g. a varlen check for a kernel without ``cu_seqlens``):
    the result is NOT_APPLICABLE with this reason, neither a pass nor a failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class PropertyContext:
    """What a property's check sees: the kernel, the case and its family, plus measurements it records."""

    family: Family
    kernel: Callable[..., Any]
    kernel_name: str
    case: Case
    checks: list[TensorCheck] = field(default_factory=list)

    def call(self, inputs: Mapping[str, torch.Tensor | None] | None = None,
             kwargs: Mapping[str, Any] | None = None) -> Tensors:
        """Call the kernel on ``inputs`` (default: the case's) with ``kwargs`` (default: the case's), turning
        any exception into :class:`KernelRaised` and the returned value into named outputs (a
        :class:`Violation` if it breaks the contract's structure)."""
        args = dict(self.case.inputs if inputs is None else inputs)
        kw = dict(self.case.kwargs if kwargs is None else kwargs)
        try:
            raw = self.kernel(*args.values(), **kw)
        except Exception as exc:  # the kernel under test misbehaved: a verdict, not a crash
            raise KernelRaised(f"kernel raised {type(exc).__name__}: {exc}") from exc
        return self.family.name_outputs(raw)

    def accepts(self, keyword: str) -> bool:
        """Whether the kernel's signature takes the keyword argument ``keyword`` (e.g. ``cu_seqlens``)."""
        try:
            params = inspect.signature(self.kernel).parameters
        except (TypeError, ValueError):
            return False
        return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def backward(self, outputs: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]):
        try:
            return torch.autograd.grad(list(outputs), list(leaves), list(cotangents), allow_unused=True)
        except Exception as exc:
            raise KernelRaised(f"kernel's backward raised {type(exc).__name__}: {exc}") from exc

    def record(self, checks: Sequence[TensorCheck]) -> None:
        self.checks.extend(checks)

    def require(self, checks: Sequence[TensorCheck], what: str) -> None:
        """Record ``checks`` and raise a :class:`Violation` listing every failing one."""
        self.record(checks)
        failing = [c for c in checks if not c.passed]
        if failing:
            detail = "\n".join(c.describe() for c in failing)
            raise Violation(f"{what}: {len(failing)} of {len(checks)} tensors out of tolerance\n{detail}", checks)


@dataclass(frozen=True)
class Property:
    """A named, documented check. ``check`` raises :class:`Violation` when the property fails on the case."""

    id: str
    title: str
    check: Callable[[PropertyContext], None]
    catches: str = ""


@dataclass(frozen=True)
class BuiltinKernel:
    """A kernel shipped with the suite: its IMPL path (as a user would type it) and a one-line summary.

    profile/device: where the suite's own tests and report run it when it cannot run everywhere at full
    size (a Triton kernel in the interpreter runs the ``smoke`` profile on CPU; compiled, only on CUDA);
    None means the run's own profile and every device.
    """

    impl: str
    summary: str
    profile: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Family:
    """A family of operators sharing one contract (SPEC.md).

    name: the CLI's ``--family``; signature: the contract's call; output_names: the returned tuple's names.
    cases(profile) -> strategy of specs; pinned(profile) -> edge-regime specs always run first;
    spec_from_json(text) -> spec; build(spec, dtype, device) -> Case;
    output_contract(case) -> {name: OutputSpec}; differentiable(case) -> input names with gradients;
    reference(inputs64, kwargs) -> float64 outputs, differentiable; baseline(inputs, kwargs) -> same-dtype outputs.
    """

    name: str
    signature: str
    output_names: tuple[str, ...]
    cases: Callable[[Profile], SearchStrategy]
    pinned: Callable[[Profile], Sequence[Any]]
    spec_from_json: Callable[[str], Any]
    build: Callable[[Any, torch.dtype, torch.device], Case]
    output_contract: Callable[[Case], dict[str, OutputSpec]]
    differentiable: Callable[[Case], tuple[str, ...]]
    reference: Callable[[Mapping[str, torch.Tensor | None], dict[str, Any]], Tensors]
    baseline: Callable[[Mapping[str, torch.Tensor | None], dict[str, Any]], Tensors]
    properties: tuple[Property, ...]
    builtin_kernels: tuple[BuiltinKernel, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    diagnostics: Callable[[Profile], Sequence[Diagnostic]] | None = None

    def name_outputs(self, raw: Any) -> Tensors:
        n = len(self.output_names)
        items = raw if isinstance(raw, (tuple, list)) else (raw,)
        if len(items) != n or not all(isinstance(t, torch.Tensor) for t in items):
            got = type(raw).__name__ if not isinstance(raw, (tuple, list)) else f"{type(raw).__name__} of {len(raw)}"
            raise Violation(f"kernel returned {got}; the contract `{self.signature}` returns {n} tensor(s) {self.output_names}")
        return dict(zip(self.output_names, items))

    def property(self, property_id: str) -> Property:
        for p in self.properties:
            if p.id == property_id:
                return p
        raise KeyError(f"{property_id!r}: no such property in family {self.name}; valid: {', '.join(p.id for p in self.properties)}")

