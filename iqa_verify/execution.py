"""Running the kernel under test on one request, in whatever process holds it, and saying what happened.

This is the only code that calls a kernel. It runs inside the kernel worker (or in the supervisor's own
process with ``--in-process``) and returns plain data: the tensors the kernel produced, what it raised,
which of torch's global settings it changed (they are put back), and the inputs as they are after the
call. It judges nothing: the supervisor compares those tensors with its references.

A :class:`KernelCall` is one forward call (no gradients when ``differentiable`` is empty) or one
forward and backward (``cotangents`` given: the vector-Jacobian product of <cotangents, outputs> with
respect to the inputs named in ``differentiable``). An :class:`ExtraCall` runs a family's module-level
function ``fn(kernel, *args)`` beside the kernel (the few calls a family needs besides the contract,
such as a solver's statistics).
"""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from iqa_verify.poison import nan_poisoned_allocations
from iqa_verify.wire import cast_keeping_layout

__all__ = ["KernelCall", "ExtraCall", "KernelError", "CallOutcome", "execute", "global_state", "accepts_keyword"]


@dataclass(frozen=True)
class KernelCall:
    """inputs: the positional inputs in contract order (None where absent); kwargs: the keywords;
    differentiable: the inputs made leaves that require grad; cotangents: one per output position (None
    for an output that gets none), or None for a forward call only; poisoned: run with NaN-filled
    ``torch.empty*``; return_inputs: send the inputs back after the call (to see whether it wrote them)."""

    inputs: dict[str, torch.Tensor | None]
    kwargs: dict[str, Any]
    differentiable: tuple[str, ...] = ()
    cotangents: tuple[torch.Tensor | None, ...] | None = None
    poisoned: bool = False
    return_inputs: bool = False


@dataclass(frozen=True)
class ExtraCall:
    """``fn(kernel, *args)``; fn must be a module-level function (it travels by name) returning data."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class KernelError:
    """What the kernel raised: phase (forward, backward, extra), the exception's class name, its message,
    the end of its traceback, and whether the process is left unusable (out of memory, a CUDA error)."""

    phase: str
    type_name: str
    message: str
    traceback: str
    unusable: bool = False

    def describe(self) -> str:
        where = "kernel's backward" if self.phase == "backward" else "kernel"
        return f"{where} raised {self.type_name}: {self.message}"


@dataclass
class CallOutcome:
    """outputs: the returned tensors, detached (None when the call raised or returned something else);
    returned: what was returned, in words ("tuple of 2", "dict"); requires_grad: per
    output; grads: per differentiable input (None where no gradient flows); value: an ExtraCall's result;
    inputs_after: the inputs after the call (when asked); state_changes: global settings the kernel left
    changed (already restored; torch's global RNG is not among them: cases are drawn from their own
    seeded generators, and a kernel that draws random numbers must show up as non-deterministic); output: what the kernel printed (filled in by the worker); seconds."""

    outputs: tuple[torch.Tensor, ...] | None = None
    returned: str = ""
    requires_grad: tuple[bool, ...] = ()
    grads: dict[str, torch.Tensor | None] | None = None
    value: Any = None
    error: KernelError | None = None
    inputs_after: dict[str, torch.Tensor | None] | None = None
    state_changes: tuple[str, ...] = ()
    output: str = ""
    seconds: float = 0.0


def global_state() -> dict[str, Any]:
    """torch's process-wide settings a kernel must leave as it found them."""
    return {
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "anomaly mode": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "number of threads": torch.get_num_threads(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
    }


def _restore(state: dict[str, Any], now: dict[str, Any]) -> None:
    """Put back what changed (only that: some setters import heavy modules, e.g. torch._dynamo)."""
    changed = {k for k in state if state[k] != now[k]}
    if "default dtype" in changed:
        torch.set_default_dtype(state["default dtype"])
    if "grad mode" in changed:
        torch.set_grad_enabled(state["grad mode"])
    if "deterministic algorithms" in changed:
        det, warn_only = state["deterministic algorithms"]
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
    if "anomaly mode" in changed:
        anomaly, check_nan = state["anomaly mode"]
        torch.autograd.set_detect_anomaly(anomaly, check_nan=check_nan)
    if "number of threads" in changed:
        torch.set_num_threads(state["number of threads"])
    if "float32 matmul precision" in changed:
        torch.set_float32_matmul_precision(state["float32 matmul precision"])


def _changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k])


def _error(phase: str, exc: BaseException) -> KernelError:
    text = str(exc) if not isinstance(exc, SystemExit) else f"exit status {exc.code!r}"
    unusable = isinstance(exc, MemoryError) or "out of memory" in text.lower() or "CUDA error" in text
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return KernelError(phase, type(exc).__name__, text.strip() or "(no message)", tail, unusable)


def _describe_return(raw: Any) -> tuple[tuple[torch.Tensor, ...] | None, str]:
    """The returned tensors (None unless every item is a tensor) and what was returned, in words."""
    items = raw if isinstance(raw, (tuple, list)) else (raw,)
    what = f"{type(raw).__name__} of {len(raw)}" if isinstance(raw, (tuple, list)) else type(raw).__name__
    return (tuple(items) if all(isinstance(t, torch.Tensor) for t in items) else None), what


def _forward_backward(kernel: Callable[..., Any], call: KernelCall, out: CallOutcome) -> None:
    inputs = dict(call.inputs)
    leaves = {n: inputs[n].detach().requires_grad_() for n in call.differentiable}
    inputs.update(leaves)
    with torch.set_grad_enabled(bool(leaves)):
        try:
            raw = kernel(*inputs.values(), **call.kwargs)
        except BaseException as exc:  # noqa: BLE001 - whatever the kernel does is a verdict
            out.error = _error("forward", exc)
            return
        outputs, out.returned = _describe_return(raw)
        if outputs is None:
            return
        out.requires_grad = tuple(bool(o.requires_grad) for o in outputs)
        if call.cotangents is None or not leaves:
            out.outputs = tuple(o.detach() for o in outputs)
            return
        keep = [i for i, (o, c) in enumerate(zip(outputs, call.cotangents)) if c is not None and o.requires_grad]
        out.outputs = tuple(o.detach() for o in outputs)
        if not keep:
            out.grads = {n: None for n in leaves}
            return
        try:
            grads = torch.autograd.grad([outputs[i] for i in keep], list(leaves.values()),
                                        [cast_keeping_layout(call.cotangents[i], outputs[i].dtype, outputs[i].device) for i in keep],
                                        allow_unused=True)
        except BaseException as exc:  # noqa: BLE001
            out.error = _error("backward", exc)
            return
        out.grads = {n: (g.detach() if g is not None else None) for n, g in zip(leaves, grads)}


def execute(kernel: Callable[..., Any], request: KernelCall | ExtraCall, *, interrupts_are_kernel: bool) -> CallOutcome:
    """Run ``request``; every exception the kernel raises becomes ``CallOutcome.error``. A
    KeyboardInterrupt counts as the kernel's own only when ``interrupts_are_kernel`` (a worker, where the
    user's Ctrl-C never arrives); in the supervisor's process it is the user's and propagates."""
    out = CallOutcome()
    before = global_state()
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            if isinstance(request, KernelCall):
                if request.poisoned:
                    stack.enter_context(nan_poisoned_allocations())
                _forward_backward(kernel, request, out)
            else:
                try:
                    out.value = request.fn(kernel, *request.args)
                except BaseException as exc:  # noqa: BLE001
                    out.error = _error("extra", exc)
            after = global_state()
    finally:
        out.seconds = time.perf_counter() - started
    if out.error is not None and out.error.type_name == "KeyboardInterrupt" and not interrupts_are_kernel:
        raise KeyboardInterrupt
    out.state_changes = _changes(before, after)
    _restore(before, global_state())
    if isinstance(request, KernelCall) and request.return_inputs:
        out.inputs_after = dict(request.inputs)
    return out


def accepts_keyword(kernel: Callable[..., Any], keyword: str) -> bool:
    """Whether ``kernel``'s signature takes the keyword argument ``keyword`` (an ExtraCall function)."""
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
