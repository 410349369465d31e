"""Properties every family shares, written once against the :class:`~iqa_verify.family.Family` interface.

ids are ``<family>/<name>``:

- ``contract``: outputs have the contract's count, shapes, dtypes and device.
- ``values``: outputs equal the float64 reference under the VALUE tolerance and baseline rule.
- ``gradients``: gradients of random cotangents on *all* outputs w.r.t. every differentiable input equal
  the float64 reference's under the GRAD tolerance; a detached output or a missing gradient fails.
- ``finite``: outputs and gradients are finite wherever the reference is finite in the kernel's dtype.
- ``inputs-unchanged``: every input's storage is bitwise the same after forward and backward.
- ``no-uninit-reads``: with NaN-poisoned ``torch.empty*`` allocations, values and gradients equal those of an
  ordinary call of the same kernel.
- ``deterministic``: two forward calls on the same input agree bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import Case, Property, PropertyContext, Violation
from iqa_verify.poison import nan_poisoned_allocations
from iqa_verify.tolerances import Kind, tolerance

__all__ = [
    "shared_properties", "cotangents_for", "ForwardBackward", "require_finite",
    "run_forward_backward", "reference_forward_backward",
]

Tensors = dict[str, torch.Tensor]
NaturalScales = Callable[[Case, Tensors], Mapping[str, torch.Tensor]]


@dataclass
class ForwardBackward:
    outputs: Tensors
    grads: dict[str, torch.Tensor | None]


def cotangents_for(case: Case, reference: Tensors) -> Tensors:
    """Random float64 cotangents, one per output, seeded by the case so repeats see the same ones."""
    gen = torch.Generator().manual_seed(int(getattr(case.spec, "seed", 0)) + 7919)
    return {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in reference.items()}


def _upcast(inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {n: (t.detach().to(torch.float64) if t is not None else None) for n, t in inputs.items()}


def _backward(outputs: Tensors, leaves: Tensors, cots: Tensors, ctx: PropertyContext | None) -> dict[str, torch.Tensor | None]:
    outs = [outputs[n] for n in cots]
    cot = [cots[n].to(device=outputs[n].device, dtype=outputs[n].dtype) for n in cots]
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    if not keep:
        return {n: None for n in leaves}
    args = ([outs[i] for i in keep], list(leaves.values()), [cot[i] for i in keep])
    grads = ctx.backward(*args) if ctx else torch.autograd.grad(*args, allow_unused=True)
    return dict(zip(leaves, grads))


def reference_forward_backward(ctx: PropertyContext, cots: Tensors | None = None) -> tuple[ForwardBackward, Tensors]:
    """float64 reference outputs and gradients of <cotangents, outputs>; returns (result, cotangents)."""
    case, fam = ctx.case, ctx.family
    inputs = _upcast(case.inputs)
    leaves = {n: inputs[n].requires_grad_() for n in fam.differentiable(case)}
    with torch.enable_grad():
        outs = fam.reference(inputs, case.kwargs)
        cots = cots if cots is not None else cotangents_for(case, outs)
        grads = _backward(outs, leaves, {n: c.to(outs[n].device) for n, c in cots.items()}, None)
    return ForwardBackward({n: o.detach() for n, o in outs.items()}, grads), cots


def _baseline_forward_backward(ctx: PropertyContext, cots: Tensors) -> ForwardBackward:
    case, fam = ctx.case, ctx.family
    inputs = {n: (t.detach() if t is not None else None) for n, t in case.inputs.items()}
    leaves = {n: inputs[n].requires_grad_() for n in fam.differentiable(case)}
    with torch.enable_grad():
        outs = fam.baseline(inputs, case.kwargs)
        grads = _backward(outs, leaves, cots, None)
    return ForwardBackward({n: o.detach() for n, o in outs.items()}, grads)


def run_forward_backward(ctx: PropertyContext, cots: Tensors, inputs: Mapping[str, torch.Tensor | None] | None = None,
                         kwargs: Mapping[str, object] | None = None) -> ForwardBackward:
    """The kernel's outputs and gradients of <cots, outputs> on ``inputs``/``kwargs`` (default: the case's);
    a detached output is a Violation that says so."""
    case, fam = ctx.case, ctx.family
    diff = fam.differentiable(case)
    inputs = dict(case.inputs if inputs is None else inputs)
    leaves = {n: inputs[n].detach().requires_grad_() for n in diff}
    with torch.enable_grad():
        outs = ctx.call({**inputs, **leaves}, kwargs)
        _check_shapes(ctx, outs)
        detached = [n for n in cots if not outs[n].requires_grad]
        if detached:
            raise Violation(
                f"output(s) {', '.join(detached)} do not require grad although inputs {', '.join(diff)} do: the kernel"
                " returns a detached tensor, so no loss downstream can train through it"
            )
        grads = _backward(outs, leaves, cots, ctx)
    return ForwardBackward({n: o.detach() for n, o in outs.items()}, grads)


def _check_shapes(ctx: PropertyContext, outs: Tensors) -> None:
    for name, spec in ctx.family.output_contract(ctx.case).items():
        if tuple(outs[name].shape) != spec.shape:
            raise Violation(f"out/{name}: shape {tuple(outs[name].shape)} but the contract requires {spec.shape}")


def _value_checks(ctx: PropertyContext, outs: Tensors, ref: Tensors, base: Tensors) -> list[TensorCheck]:
    tol = tolerance(Kind.VALUE, ctx.case.dtype)
    return [compare(f"out/{n}", outs[n], ref[n], tol, dtype=ctx.case.dtype, baseline=base.get(n)) for n in ref]


def _grad_checks(ctx: PropertyContext, got: ForwardBackward, ref: ForwardBackward, base: ForwardBackward,
                 natural: Mapping[str, torch.Tensor] | None = None) -> list[TensorCheck]:
    """``natural``: per input name, the natural scale of its gradient declared by the family (see
    :func:`shared_properties`); it adds ``eps_acc * N`` (table entry NATURAL_SCALE) to the allowance."""
    tol = tolerance(Kind.GRAD, ctx.case.dtype)
    natural = natural or {}
    nat_tol = tolerance(Kind.NATURAL_SCALE, ctx.case.dtype) if natural else None
    # A gradient that is exactly zero in theory (dg at T = 1 without an initial state) is judged against the
    # scale of its siblings, not against its own round-off (see compare's ``scale``).
    siblings = max((float(r.abs().max()) for r in ref.grads.values() if r is not None and r.numel()), default=0.0)
    checks = []
    for n, r in ref.grads.items():
        r = r if r is not None else torch.zeros_like(ctx.case.inputs[n], dtype=torch.float64)
        scale = siblings if r.numel() and not bool(r.abs().max() > 0) else None
        g = got.grads[n]
        b = base.grads[n]
        if g is None:
            check = compare(f"grad/d{n}", torch.zeros_like(r), r, tol, dtype=ctx.case.dtype, baseline=b, scale=scale)
            if not check.passed:
                check = TensorCheck(
                    path=check.path, passed=False, ratio=check.ratio, numel=check.numel, mismatches=check.mismatches,
                    worst_index=check.worst_index, worst_abs=check.worst_abs, tolerance=tol,
                    note=f"no gradient flows to {n} (autograd returned None) but the reference gradient is not zero",
                )
        else:
            check = compare(f"grad/d{n}", g, r, tol, dtype=ctx.case.dtype, baseline=b, scale=scale,
                            natural=natural.get(n), natural_tol=nat_tol)
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------- checks


def _contract(ctx: PropertyContext) -> None:
    outs = ctx.call()
    device = ctx.case.device
    problems = []
    for name, spec in ctx.family.output_contract(ctx.case).items():
        t = outs[name]
        if tuple(t.shape) != spec.shape:
            problems.append(f"out/{name}: shape {tuple(t.shape)}, the contract requires {spec.shape}")
        if t.dtype not in spec.dtypes:
            allowed = " or ".join(str(d) for d in spec.dtypes)
            problems.append(f"out/{name}: dtype {t.dtype}, the contract requires {allowed}")
        if t.device != device:
            problems.append(f"out/{name}: device {t.device}, the inputs are on {device}")
    if problems:
        raise Violation("outputs break the contract:\n  " + "\n  ".join(problems))


def _values(ctx: PropertyContext) -> None:
    outs = ctx.call()
    _check_shapes(ctx, outs)
    case, fam = ctx.case, ctx.family
    with torch.no_grad():
        ref = fam.reference(_upcast(case.inputs), case.kwargs)
        base = fam.baseline({n: (t.detach() if t is not None else None) for n, t in case.inputs.items()}, case.kwargs)
    ctx.require(_value_checks(ctx, outs, ref, base), "values differ from the float64 reference")


def _gradients(ctx: PropertyContext, natural_scales: NaturalScales | None = None) -> None:
    ref, cots = reference_forward_backward(ctx)
    got = run_forward_backward(ctx, cots)
    base = _baseline_forward_backward(ctx, cots)
    natural = natural_scales(ctx.case, cots) if natural_scales is not None else None
    ctx.require(_grad_checks(ctx, got, ref, base, natural), "gradients differ from the float64 reference")


def nonfinite_problem(path: str, got: torch.Tensor | None, ref: torch.Tensor | None, dtype: torch.dtype,
                      kind: Kind, judge_overflow: bool = True) -> str | None:
    """Non-finite kernel values where the reference is finite in ``dtype`` with room for the allowed
    relative error (a reference within rtol of the dtype's largest number may legitimately overflow).
    With ``judge_overflow=False`` only NaN counts (callers that cannot bound the error, e.g. gradients
    of an ill-conditioned solve, accept an overflow to inf but never a NaN)."""
    if got is None or ref is None:
        return None
    r = ref.detach().to("cpu", torch.float64)
    a = got.detach().to("cpu", torch.float64)
    if a.shape != r.shape:
        return None
    room = 1.0 + tolerance(kind, dtype).rtol
    finite_ref = torch.isfinite(r) & (r.abs() * room <= torch.finfo(dtype).max)
    bad = finite_ref & (torch.isnan(a) if not judge_overflow else ~torch.isfinite(a))
    if not bool(bad.any()):
        return None
    first = [int(i) for i in torch.nonzero(bad)[0]]
    return f"{path}: {int(bad.sum())} of {int(finite_ref.sum())} values non-finite where the reference is finite; first at {first} (kernel {float(a[tuple(first)])}, reference {float(r[tuple(first)]):.6g})"


def require_finite(ctx: PropertyContext, *, output_kind: Kind = Kind.VALUE, judge_output_overflow: bool = True,
                   judge_grad_overflow: bool = True, why: str = "") -> None:
    """Raise a Violation listing outputs and gradients that are non-finite where the float64 reference is
    finite (see :func:`nonfinite_problem`; ``why`` is appended to the message when overflow is not judged)."""
    ref, cots = reference_forward_backward(ctx)
    got = run_forward_backward(ctx, cots)
    dtype = ctx.case.dtype
    problems = [nonfinite_problem(f"out/{n}", got.outputs[n], ref.outputs[n], dtype, output_kind,
                                  judge_overflow=judge_output_overflow) for n in ref.outputs]
    problems += [nonfinite_problem(f"grad/d{n}", got.grads[n], ref.grads[n], dtype, Kind.GRAD,
                                   judge_overflow=judge_grad_overflow) for n in ref.grads]
    problems = [p for p in problems if p]
    if problems:
        raise Violation("non-finite values where the float64 reference is finite" + why + ":\n  " + "\n  ".join(problems))


def _finite(ctx: PropertyContext) -> None:
    require_finite(ctx)


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


def _changed_inputs(tensors: Tensors, before: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    problems = []
    for n, t in tensors.items():
        values, storage = before[n]
        if not torch.equal(values, t.detach()):
            changed = int((values != t.detach()).sum())
            problems.append(f"{n}: {changed} of {t.numel()} elements changed by the call")
        elif not torch.equal(storage, _storage_bytes(t)):
            problems.append(f"{n}: memory outside the view (a non-contiguous input) was written")
    return problems


def _inputs_unchanged(ctx: PropertyContext) -> None:
    """A plain forward call first (in-place edits of inputs that do not require grad pass autograd's
    checks), then forward and backward with gradients."""
    tensors = ctx.case.tensors()
    before = {n: (t.detach().clone(), _storage_bytes(t)) for n, t in tensors.items()}
    with torch.no_grad():
        ctx.call()
    problems = _changed_inputs(tensors, before)
    if not problems:
        cots = cotangents_for(ctx.case, {n: torch.zeros(s.shape) for n, s in ctx.family.output_contract(ctx.case).items()})
        run_forward_backward(ctx, cots)
        problems = [f"{p} (during forward+backward)" for p in _changed_inputs(tensors, before)]
    if problems:
        raise Violation("the kernel modified its inputs:\n  " + "\n  ".join(problems))


def _no_uninit_reads(ctx: PropertyContext) -> None:
    """Poisoned run against the kernel's own ordinary run, so only the effect of the poison is judged."""
    cots = cotangents_for(ctx.case, {n: torch.zeros(s.shape) for n, s in ctx.family.output_contract(ctx.case).items()})
    plain = run_forward_backward(ctx, cots)
    with nan_poisoned_allocations():
        poisoned = run_forward_backward(ctx, cots)
    dtype = ctx.case.dtype
    checks = [compare(f"out/{n}", poisoned.outputs[n], plain.outputs[n], tolerance(Kind.VALUE, dtype), dtype=dtype)
              for n in plain.outputs]
    checks += [compare(f"grad/d{n}", poisoned.grads[n], plain.grads[n], tolerance(Kind.GRAD, dtype), dtype=dtype)
               for n in plain.grads if plain.grads[n] is not None and poisoned.grads[n] is not None]
    ctx.require(checks, "with torch.empty/empty_like/new_empty returning NaN-filled memory the results change"
                        " (the kernel reads memory it never wrote)")


def _deterministic(ctx: PropertyContext) -> None:
    first = ctx.call()
    second = ctx.call()
    problems = []
    for n in first:
        a, b = first[n].detach(), second[n].detach()
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"out/{n}: {tuple(a.shape)}/{a.dtype} then {tuple(b.shape)}/{b.dtype}")
            continue
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not bool(same.all()):
            diff = (a.double() - b.double()).abs().nan_to_num(float("inf"))
            idx = [int(i) for i in torch.nonzero(~same)[0]]
            problems.append(f"out/{n}: {int((~same).sum())} elements differ, max |diff| {float(diff.max()):.3e}, first at {idx}")
    if problems:
        raise Violation("two calls on the same input disagree (hidden state or non-determinism):\n  " + "\n  ".join(problems))


def shared_properties(family: str, *, grad_natural_scales: NaturalScales | None = None) -> tuple[Property, ...]:
    """The shared properties with ids ``<family>/<name>``. ``grad_natural_scales(case, cotangents)`` -> {input
    name: N}: the family's declaration of the natural scale of some gradients (SPEC §5; float64, the
    gradient's shape), added to the ``gradients`` allowance as ``eps_acc * N``."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=fn, catches=catches)

    return (
        p("contract", "output count, shapes, dtypes and device follow the contract", _contract,
          "wrong output dtype (e.g. float32 out for bf16 in), transposed state, outputs on the wrong device"),
        p("values", "outputs equal the float64 reference", _values,
          "wrong math, scale, decay, initial/final state, ragged chunks, low-precision accumulation"),
        p("gradients", "gradients of all outputs w.r.t. every input equal the float64 reference's",
          partial(_gradients, natural_scales=grad_natural_scales),
          "wrong or missing gradients (decay, initial state), detached outputs"),
        p("finite", "finite wherever the float64 reference is finite", _finite,
          "0/0 and inf*0 from decay ratios that underflow, overflow in intermediates"),
        p("inputs-unchanged", "inputs bitwise unchanged after forward and backward", _inputs_unchanged,
          "in-place updates of q, k, v, g or the initial state, writes past a view"),
        p("no-uninit-reads", "same results with NaN-poisoned torch.empty* scratch memory", _no_uninit_reads,
          "reads of memory the kernel never wrote (unwritten padding, partial tiles)"),
        p("deterministic", "two calls on the same input agree bitwise", _deterministic,
          "state cached across calls, races, uninitialised accumulators"),
    )
