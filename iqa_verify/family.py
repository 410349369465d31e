"""What the engine knows about a family of operators: how to make cases, call a kernel, and judge it.

A :class:`Family` bundles a contract (signature, output names), a case strategy, a float64 reference,
a same-precision baseline and its :class:`Property` list. Families live under ``properties/``; the
engine (runner, CLI, pytest plugin, reports) only sees this interface.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from hypothesis.strategies import SearchStrategy

from iqa_verify.comparison import TensorCheck
from iqa_verify.diagnostics import Diagnostic
from iqa_verify.execution import CallOutcome, ExtraCall, KernelCall, accepts_keyword
from iqa_verify.profiles import Profile
from iqa_verify.supervisor import KernelDied, KernelHost

__all__ = [
    "BuiltinKernel",
    "Case",
    "CaseSpec",
    "Family",
    "ForwardBackward",
    "KernelCrashed",
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
    """The kernel under test raised on a valid input: a failing verdict, not a harness crash.
    ``error_type`` is the class name of what it raised (the object itself stays in the kernel's process)."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class KernelCrashed(Violation):
    """The kernel's process exited, was killed or stopped answering during a call (see supervisor)."""


class NotApplicable(Exception):
    """The property does not apply to this kernel (e.g. a varlen check for a kernel without ``cu_seqlens``):
    the result is NOT_APPLICABLE with this reason, neither a pass nor a failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def digest(tensors: Mapping[str, torch.Tensor | None]) -> tuple:
    """A memo key for tensors: names, dtypes, layouts and a hash of the values."""
    key = []
    for n, t in tensors.items():
        if t is None:
            key.append((n, None))
            continue
        data = t.detach().to("cpu").contiguous()
        raw = ctypes.string_at(data.data_ptr(), data.numel() * data.element_size()) if data.numel() else b""
        key.append((n, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), hashlib.sha1(raw).hexdigest()))
    return tuple(key)


@dataclass
class ForwardBackward:
    """The kernel's (or a reference's) outputs by name and gradients by input name (None: no gradient)."""

    outputs: Tensors
    grads: dict[str, torch.Tensor | None]


@dataclass
class PropertyContext:
    """What a property's check sees: the case and its family, the kernel (behind a
    :class:`~iqa_verify.supervisor.KernelHost`: in a worker process or here), and what it records.

    Every interaction with the kernel goes through :meth:`call`, :meth:`forward_backward`, :meth:`extra`
    and :meth:`accepts`; each returns tensors and data, never the kernel's own objects. ``during`` names
    the property in messages; ``timeout_s`` bounds each call. ``printed`` collects what the kernel printed
    and ``state_changes`` the global torch settings it left changed (judged by ``contract``).

    ``memo`` is shared by every property judged on the same case (engine v2: one evaluation per case):
    the plain forward call, each forward+backward (by its cotangents, poisoned or not) and whatever a
    property stores with :meth:`memoized` (the reference, a dense analysis) are computed once. Calls on
    other inputs or keywords, and ``call(fresh=True)``, always run."""

    family: Family
    host: KernelHost
    kernel_name: str
    case: Case
    during: str = ""
    timeout_s: float = 60.0
    checks: list[TensorCheck] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)
    state_changes: list[str] = field(default_factory=list)
    memo: dict[Any, Any] = field(default_factory=dict)

    def run(self, request: KernelCall | ExtraCall, key: Any = None) -> CallOutcome:
        """Run one request on the kernel's host (once per case when ``key`` is given: a memo entry); a dead,
        killed or hung kernel process is a :class:`KernelCrashed` violation, raised again for every
        property that asks for the same memoized call."""
        if key is not None and key in self.memo:
            outcome = self.memo[key]
        else:
            try:
                outcome = self.host.run(request, self.during, self.timeout_s)
            except KernelDied as died:
                outcome = KernelCrashed(died.message)
            if key is not None:
                self.memo[key] = outcome
        if isinstance(outcome, KernelCrashed):
            raise KernelCrashed(outcome.message)
        if outcome.output:
            self.printed.append(outcome.output)
        self.state_changes.extend(outcome.state_changes)
        return outcome

    def memoized(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per case for ``key`` (shared by the properties judging the case)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def forward_outcome(self) -> CallOutcome:
        """The plain forward call on the case (no gradients), once per case, inputs returned after it."""
        case = self.case
        return self.run(KernelCall(dict(case.inputs), dict(case.kwargs), return_inputs=True), ("forward",))

    def forward_backward_outcome(self, cots: Mapping[str, torch.Tensor], *, poisoned: bool = False) -> CallOutcome:
        """Forward and backward of <cots, outputs> on the case, once per case and cotangents."""
        case = self.case
        cot = tuple(cots.get(n) for n in self.family.output_names)
        request = KernelCall(dict(case.inputs), dict(case.kwargs), self.family.differentiable(case), cot,
                             poisoned=poisoned, return_inputs=True)
        return self.run(request, ("forward-backward", poisoned, digest(cots)))

    def _inputs_kwargs(self, inputs, kwargs) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
        return dict(self.case.inputs if inputs is None else inputs), dict(self.case.kwargs if kwargs is None else kwargs)

    def named(self, outcome: CallOutcome) -> Tensors:
        """The outputs of a call by name; what the kernel raised is :class:`KernelRaised`, a return that
        breaks the contract's structure a :class:`Violation`."""
        if outcome.error is not None:
            raise KernelRaised(outcome.error.describe(), outcome.error.type_name)
        n = len(self.family.output_names)
        if outcome.outputs is None or len(outcome.outputs) != n:
            got = outcome.returned
            raise Violation(f"kernel returned {got}; the contract `{self.family.signature}` returns {n} tensor(s)"
                            f" {self.family.output_names}")
        return dict(zip(self.family.output_names, outcome.outputs))

    def call(self, inputs: Mapping[str, torch.Tensor | None] | None = None,
             kwargs: Mapping[str, Any] | None = None, *, fresh: bool = False) -> Tensors:
        """One forward call on ``inputs`` (default: the case's) with ``kwargs`` (default: the case's); on the
        case itself the call is shared by the properties (see ``memo``) unless ``fresh``."""
        if inputs is None and kwargs is None and not fresh:
            return self.named(self.forward_outcome())
        args, kw = self._inputs_kwargs(inputs, kwargs)
        return self.named(self.run(KernelCall(args, kw)))

    def forward_backward(self, cots: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor | None] | None = None,
                         kwargs: Mapping[str, Any] | None = None, *, poisoned: bool = False) -> ForwardBackward:
        """Outputs and the gradients of <cots, outputs> w.r.t. the family's differentiable inputs. Cotangents
        keep their layout (strides) on the way to the kernel. A detached output is a Violation that says so."""
        own = inputs is None
        if own and kwargs is None:
            diff = self.family.differentiable(self.case)
            outcome = self.forward_backward_outcome(cots, poisoned=poisoned)
        else:
            args, kw = self._inputs_kwargs(inputs, kwargs)
            diff = self.family.differentiable(dataclasses.replace(self.case, inputs=args))
            cot = tuple(cots.get(n) for n in self.family.output_names)
            outcome = self.run(KernelCall(args, kw, diff, cot, poisoned=poisoned))
        outs = self.named(outcome)
        if own:  # a property passing inputs of other shapes checks the shapes it expects itself
            for name, spec in self.family.output_contract(self.case).items():
                if tuple(outs[name].shape) != spec.shape:
                    raise Violation(f"out/{name}: shape {tuple(outs[name].shape)} but the contract requires {spec.shape}")
        detached = [n for n, rg in zip(self.family.output_names, outcome.requires_grad) if n in cots and not rg]
        if detached:
            raise Violation(
                f"output(s) {', '.join(detached)} do not require grad although inputs {', '.join(diff)} do: the kernel"
                " returns a detached tensor, so no loss downstream can train through it"
            )
        if outcome.error is None and outcome.grads is None:
            return ForwardBackward(outs, {n: None for n in diff})
        return ForwardBackward(outs, dict(outcome.grads))

    def extra(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(kernel, *args)`` beside the kernel (fn a module-level function returning data)."""
        outcome = self.run(ExtraCall(fn, args))
        if outcome.error is not None:
            raise KernelRaised(outcome.error.describe(), outcome.error.type_name)
        return outcome.value

    def accepts(self, keyword: str) -> bool:
        """Whether the kernel's signature takes the keyword argument ``keyword`` (e.g. ``cu_seqlens``)."""
        return bool(self.extra(accepts_keyword, keyword))

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

    def property(self, property_id: str) -> Property:
        for p in self.properties:
            if p.id == property_id:
                return p
        raise KeyError(f"{property_id!r}: no such property in family {self.name}; valid: {', '.join(p.id for p in self.properties)}")

