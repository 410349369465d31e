"""Properties every family shares, written once against the :class:`~iqa_verify.family.Family` interface.

ids are ``<family>/<name>``:

- ``contract``: outputs have the contract's count, shapes, dtypes and device, and the kernel leaves torch's
  global settings (default dtype, grad mode, deterministic algorithms, anomaly mode, threads) as it found them.
- ``values``: outputs equal the float64 reference under the VALUE tolerance and baseline rule.
- ``gradients``: gradients of random cotangents on *all* outputs w.r.t. every differentiable input equal
  the float64 reference's under the GRAD tolerance; a detached output or a missing gradient fails.
- ``finite``: outputs and gradients are finite wherever the reference is finite in the kernel's dtype.
- ``inputs-unchanged``: every input's storage is bitwise the same after forward and backward.
- ``no-uninit-reads``: with NaN-poisoned ``torch.empty*`` allocations, values and gradients equal those of an
  ordinary call of the same kernel.
- ``deterministic``: two forward+backward calls on the same input agree bitwise, outputs and gradients
  (the second is the NaN-poisoned call of ``no-uninit-reads``: a correct kernel writes all it reads, so
  poisoning changes nothing bitwise).

Every property judges the shared evaluation of the case (:class:`~iqa_verify.family.PropertyContext`'s
memo): three kernel calls per case in all (a plain forward, a forward+backward, and the same poisoned),
one float64 reference and one same-precision baseline.

A family states which of them it uses and with which knobs in its declaration, as arguments of
:func:`shared_properties` (``use``, ``grad_natural_scales``, ``honest_refusal``), never by rebuilding the
properties it gets back.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.errors import IqaVerifyError, check_one_of
from iqa_verify.family import Case, ForwardBackward, KernelRaised, Property, PropertyContext, Violation, digest
from iqa_verify.tolerances import Kind, Tolerance, tolerance
from iqa_verify.wire import cast_keeping_layout

__all__ = [
    "shared_properties", "SHARED", "HonestRefusal", "NaturalScales", "ValueNaturalScales", "ValueOperandScales",
    "tolerating", "cotangents_for", "CotangentLayout", "ForwardBackward", "require_finite", "run_forward_backward", "reference_forward_backward",
    "cast_keeping_layout", "spacing",
]

Tensors = dict[str, torch.Tensor]

NaturalScales = Callable[[Case, Tensors], Mapping[str, torch.Tensor]]
"""``(case, cotangents) -> {input name: N}``: a family's declaration of the natural scale of some gradients
(SPEC §5; float64, the gradient's shape), added to the ``gradients`` allowance as ``eps_acc * N``."""

ValueNaturalScales = Callable[[Case], Mapping[str, float]]
"""``case -> {output name: N}``: a family's declaration of the natural scale of some outputs in ``values`` (SPEC §5):
where standard algorithms carry the quantity through magnitudes far above its final value (the delta rule's
state), ``eps_acc * N`` is added to the allowance of every element (:attr:`Kind.NATURAL_SCALE`)."""

ValueOperandScales = Callable[[Case], Mapping[str, torch.Tensor]]
"""``case -> {output name: N}``: a family's declaration of what rounding the operands of tensor-core products costs
in ``values`` (SPEC §5; float64, the output's shape; see :mod:`iqa_verify.properties.recurrent_forward.operands`):
``eps_x * N`` is added to the allowance of each element (:attr:`Kind.OPERAND_ROUNDING`)."""

HonestRefusal = Callable[[PropertyContext, KernelRaised], str | None]
"""``(ctx, raised) -> note or None``: a family's declaration of when a kernel may refuse a case. Given what
the kernel raised on the case, a note saying why that refusal is honest (the property then passes with the
note recorded, so the pass is not silent), or None (the exception fails the property, as always)."""


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing (one ulp) of ``dtype`` at each ``|x|`` (x float64): ``eps * 2^floor(log2 |x|)``, the subnormal
    spacing below the smallest normal. Rounding to nearest moves a value by at most half of it."""
    finfo = torch.finfo(dtype)
    return finfo.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(finfo.tiny))))


class CotangentLayout(enum.Enum):
    """Memory layout of the cotangents fed to backward (upstream layers hand kernels transposed, sliced
    and broadcast gradients; a backward that reads ``do`` as if contiguous gets them wrong, fla #1138).

    CONTIGUOUS; TRANSPOSED: a state-like output (name ending in ``state``) column-major in its last two
    dims, any other output with dims 1 and 2 swapped in memory (time and heads for ``o``); SLICED: every
    other element along dim 1 of a buffer twice as long; EXPANDED: stride 0 along the first dim of size > 1
    (the values are constant along it, as after a sum or mean), contiguous where every dim is 1.
    """

    CONTIGUOUS = "contiguous"
    TRANSPOSED = "transposed"
    SLICED = "sliced"
    EXPANDED = "expanded"


def _laid_out(name: str, shape: tuple[int, ...], layout: CotangentLayout, gen: torch.Generator,
              dtype: torch.dtype) -> torch.Tensor:
    """Random float64 values of ``shape``, each exactly representable in ``dtype``, in ``layout`` (see
    :class:`CotangentLayout`)."""
    f64 = torch.float64

    def draw(size: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size, generator=gen, dtype=f64).to(dtype).to(f64)

    if layout is CotangentLayout.EXPANDED:
        dim = next((d for d, n in enumerate(shape) if n > 1), None)
        if dim is None:
            return draw(shape)
        return draw((*shape[:dim], 1, *shape[dim + 1:])).expand(shape)
    x = draw(shape)
    if layout is CotangentLayout.TRANSPOSED and len(shape) >= 2:
        a, b = (-2, -1) if name.endswith("state") or len(shape) < 3 else (1, 2)
        return x.transpose(a, b).contiguous().transpose(a, b)
    if layout is CotangentLayout.SLICED and len(shape) >= 1:
        dim = 1 if len(shape) >= 2 else 0
        buf = torch.zeros((*shape[:dim], 2 * shape[dim], *shape[dim + 1:]), dtype=f64)
        view = buf.narrow(dim, 0, 2 * shape[dim]).unflatten(dim, (shape[dim], 2)).select(dim + 1, 0)
        view.copy_(x)
        return view
    return x


def cotangents_for(case: Case, reference: Tensors) -> Tensors:
    """Random cotangents, one per output, seeded by the case so repeats see the same ones, laid out as
    ``case.spec.cotangents`` says (a :class:`CotangentLayout`; contiguous for specs without one).

    Held in float64 but with values the case's dtype represents exactly: the kernel receives them in its
    output dtype, and the reference and baseline must differentiate against the very cotangent the kernel was
    handed. Drawn in float64 and rounded by the kernel alone, they left every reference gradient off by the
    cotangent's rounding, amplified wherever a gradient cancels (iqa, ci seed 12, bf16: dx 100x smaller than
    its terms, every correct kernel at 0.96-0.99 of its allowance; issue #14)."""
    gen = torch.Generator().manual_seed(int(getattr(case.spec, "seed", 0)) + 7919)
    layout = getattr(case.spec, "cotangents", CotangentLayout.CONTIGUOUS)
    return {n: _laid_out(n, tuple(t.shape), layout, gen, case.dtype) for n, t in reference.items()}


def _upcast(inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {n: (t.detach().to(torch.float64) if t is not None else None) for n, t in inputs.items()}


def _backward(outputs: Tensors, leaves: Tensors, cots: Tensors) -> dict[str, torch.Tensor | None]:
    outs = [outputs[n] for n in cots]
    cot = [cast_keeping_layout(cots[n], outputs[n].dtype, outputs[n].device) for n in cots]
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    if not keep:
        return {n: None for n in leaves}
    args = ([outs[i] for i in keep], list(leaves.values()), [cot[i] for i in keep])
    grads = torch.autograd.grad(*args, allow_unused=True)
    return dict(zip(leaves, grads))


def reference_forward_backward(ctx: PropertyContext, cots: Tensors | None = None) -> tuple[ForwardBackward, Tensors]:
    """float64 reference outputs and gradients of <cotangents, outputs>; returns (result, cotangents).
    Once per case and cotangents (shared by the properties)."""
    if cots is None:
        cots = standard_cotangents(ctx)
    return ctx.memoized(("reference", digest(cots)), lambda: _reference_forward_backward(ctx, cots))


def standard_cotangents(ctx: PropertyContext) -> Tensors:
    """The case's cotangents (one per output, seeded by the case), once per case."""
    return ctx.memoized(("cotangents",), lambda: _zero_cotangents(ctx))


def _reference_forward_backward(ctx: PropertyContext, cots: Tensors) -> tuple[ForwardBackward, Tensors]:
    case, fam = ctx.case, ctx.family
    inputs = _upcast(case.inputs)
    leaves = {n: inputs[n].requires_grad_() for n in fam.differentiable(case)}
    with torch.enable_grad():
        outs = fam.reference(inputs, case.kwargs)
        grads = _backward(outs, leaves, {n: c.to(outs[n].device) for n, c in cots.items()})
    return ForwardBackward({n: o.detach() for n, o in outs.items()}, grads), cots


def _baseline_forward_backward(ctx: PropertyContext, cots: Tensors) -> ForwardBackward:
    """The same-precision baseline's outputs and gradients, once per case and cotangents."""
    return ctx.memoized(("baseline", digest(cots)), lambda: _baseline_fb(ctx, cots))


def _baseline_fb(ctx: PropertyContext, cots: Tensors) -> ForwardBackward:
    case, fam = ctx.case, ctx.family
    inputs = {n: (t.detach() if t is not None else None) for n, t in case.inputs.items()}
    leaves = {n: inputs[n].requires_grad_() for n in fam.differentiable(case)}
    with torch.enable_grad():
        outs = fam.baseline(inputs, case.kwargs)
        grads = _backward(outs, leaves, cots)
    return ForwardBackward({n: o.detach() for n, o in outs.items()}, grads)


def run_forward_backward(ctx: PropertyContext, cots: Tensors, inputs: Mapping[str, torch.Tensor | None] | None = None,
                         kwargs: Mapping[str, object] | None = None, *, poisoned: bool = False) -> ForwardBackward:
    """The kernel's outputs and gradients of <cots, outputs> on ``inputs``/``kwargs`` (default: the case's);
    a detached output is a Violation that says so (see :meth:`PropertyContext.forward_backward`).

    The differentiable inputs are those of the inputs actually passed (an initial state a property adds is
    differentiated). Output shapes are checked against the contract for the case's own inputs only: a
    property that passes inputs of other shapes checks the shapes it expects itself. ``poisoned``: torch.empty*
    allocations are NaN-filled during the call (see :mod:`iqa_verify.poison`), so an element the kernel never
    writes shows as NaN, not as whatever the heap held."""
    return ctx.forward_backward(cots, inputs, kwargs, poisoned=poisoned)


def _check_shapes(ctx: PropertyContext, outs: Tensors) -> None:
    for name, spec in ctx.family.output_contract(ctx.case).items():
        if tuple(outs[name].shape) != spec.shape:
            raise Violation(f"out/{name}: shape {tuple(outs[name].shape)} but the contract requires {spec.shape}")


def _zero_cotangents(ctx: PropertyContext) -> Tensors:
    return cotangents_for(ctx.case, {n: torch.zeros(s.shape) for n, s in ctx.family.output_contract(ctx.case).items()})


def _value_checks(ctx: PropertyContext, outs: Tensors, ref: Tensors, base: Tensors,
                  natural: Mapping[str, float] | None = None,
                  operands: Mapping[str, torch.Tensor] | None = None) -> list[TensorCheck]:
    dtype = ctx.case.dtype
    tol = tolerance(Kind.VALUE, dtype)
    scales: dict[str, tuple[torch.Tensor, Tolerance]] = {
        n: (torch.full(ref[n].shape, x, dtype=torch.float64), tolerance(Kind.NATURAL_SCALE, dtype))
        for n, x in (natural or {}).items()}
    for n, x in (operands or {}).items():
        if n in scales:
            raise IqaVerifyError(f"{n}: a family declares a natural scale or an operand-rounding scale, not both")
        scales[n] = (x, tolerance(Kind.OPERAND_ROUNDING, dtype))
    return [compare(f"out/{n}", outs[n], ref[n], tol, dtype=dtype, baseline=base.get(n),
                    natural=scales[n][0] if n in scales else None, natural_tol=scales[n][1] if n in scales else None)
            for n in ref]


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
    """Judged on the shared forward+backward call, so global settings changed in either half are seen; a
    backward that raises is left to ``gradients``."""
    case = ctx.case
    outcome = ctx.forward_backward_outcome(standard_cotangents(ctx))
    if outcome.error is not None and outcome.error.phase == "backward":
        outcome = dataclasses.replace(outcome, error=None)
    outs = ctx.named(outcome)
    device = case.device
    problems = []
    for name, spec in ctx.family.output_contract(case).items():
        t = outs[name]
        if tuple(t.shape) != spec.shape:
            problems.append(f"out/{name}: shape {tuple(t.shape)}, the contract requires {spec.shape}")
        if t.dtype not in spec.dtypes:
            allowed = " or ".join(str(d) for d in spec.dtypes)
            problems.append(f"out/{name}: dtype {t.dtype}, the contract requires {allowed}")
        if t.device != device:
            problems.append(f"out/{name}: device {t.device}, the inputs are on {device}")
    if ctx.state_changes:
        problems += [f"global torch state changed by the kernel (restored for the next call): {c}"
                     for c in dict.fromkeys(ctx.state_changes)]
    if problems:
        raise Violation("outputs break the contract:\n  " + "\n  ".join(problems))


def _values(ctx: PropertyContext, natural_scales: ValueNaturalScales | None = None,
            operand_scales: ValueOperandScales | None = None) -> None:
    outs = ctx.call()
    _check_shapes(ctx, outs)
    ref, cots = reference_forward_backward(ctx)
    base = _baseline_forward_backward(ctx, cots)
    natural = natural_scales(ctx.case) if natural_scales is not None else None
    operands = operand_scales(ctx.case) if operand_scales is not None else None
    ctx.require(_value_checks(ctx, outs, ref.outputs, base.outputs, natural, operands),
                "values differ from the float64 reference")


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


def _changed_inputs(after: Mapping[str, torch.Tensor | None], before: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    problems = []
    for n, (values, storage) in before.items():
        t = after[n]
        if not torch.equal(values, t.detach()):
            changed = int((values != t.detach()).sum())
            problems.append(f"{n}: {changed} of {t.numel()} elements changed by the call")
        elif not torch.equal(storage, _storage_bytes(t)):
            problems.append(f"{n}: memory outside the view (a non-contiguous input) was written")
    return problems


def _inputs_unchanged(ctx: PropertyContext) -> None:
    """The plain forward call (in-place edits of inputs that do not require grad pass autograd's checks) and
    the forward+backward call: the kernel's copies of the inputs come back after each and are compared,
    storage and all (memory outside a non-contiguous view too), with the case's."""
    case = ctx.case
    before = {n: (t.detach(), _storage_bytes(t)) for n, t in case.tensors().items()}
    outcome = ctx.forward_outcome()
    ctx.named(outcome)
    problems = _changed_inputs(outcome.inputs_after, before)
    if not problems:
        outcome = ctx.forward_backward_outcome(standard_cotangents(ctx))
        if outcome.inputs_after is not None:
            problems = [f"{p} (during forward+backward)" for p in _changed_inputs(outcome.inputs_after, before)]
        ctx.named(outcome)
    if problems:
        raise Violation("the kernel modified its inputs:\n  " + "\n  ".join(problems))


def _no_uninit_reads(ctx: PropertyContext) -> None:
    """Poisoned run against the kernel's own ordinary run, so only the effect of the poison is judged."""
    cots = standard_cotangents(ctx)
    plain = ctx.forward_backward(cots)
    poisoned = ctx.forward_backward(cots, poisoned=True)
    dtype = ctx.case.dtype
    checks = [compare(f"out/{n}", poisoned.outputs[n], plain.outputs[n], tolerance(Kind.VALUE, dtype), dtype=dtype)
              for n in plain.outputs]
    checks += [compare(f"grad/d{n}", poisoned.grads[n], plain.grads[n], tolerance(Kind.GRAD, dtype), dtype=dtype)
               for n in plain.grads if plain.grads[n] is not None and poisoned.grads[n] is not None]
    ctx.require(checks, "with torch.empty/empty_like/new_empty returning NaN-filled memory the results change"
                        " (the kernel reads memory it never wrote)")


def _bitwise_differences(path: str, a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    if a is None or b is None:
        return None if a is None and b is None else f"{path}: a tensor the first time, None the second (or the reverse)"
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{path}: {tuple(a.shape)}/{a.dtype} then {tuple(b.shape)}/{b.dtype}"
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if bool(same.all()):
        return None
    diff = (a.double() - b.double()).abs().nan_to_num(float("inf"))
    idx = [int(i) for i in torch.nonzero(~same)[0]]
    return f"{path}: {int((~same).sum())} elements differ, max |diff| {float(diff.max()):.3e}, first at {idx}"


def _deterministic(ctx: PropertyContext) -> None:
    cots = standard_cotangents(ctx)
    first = ctx.forward_backward(cots)
    second = ctx.forward_backward(cots, poisoned=True)
    problems = [_bitwise_differences(f"out/{n}", first.outputs[n], second.outputs[n]) for n in first.outputs]
    problems += [_bitwise_differences(f"grad/d{n}", first.grads[n], second.grads[n]) for n in first.grads]
    problems = [p for p in problems if p]
    if problems:
        raise Violation("two calls on the same input disagree (hidden state kept across calls, non-determinism, or"
                        " reads of memory never written: the second call ran with NaN-filled torch.empty*):\n  "
                        + "\n  ".join(problems))


def tolerating(check: Callable[[PropertyContext], None], honest_refusal: HonestRefusal) -> Callable[[PropertyContext], None]:
    """``check`` judged under the family's :data:`HonestRefusal` policy: what the kernel raises is passed to
    ``honest_refusal``; a note makes it a pass (recorded at path ``kernel``), None re-raises it."""

    def judged(ctx: PropertyContext) -> None:
        try:
            check(ctx)
        except KernelRaised as exc:
            why = honest_refusal(ctx, exc)
            if why is None:
                raise
            ctx.record([TensorCheck(path="kernel", passed=True, ratio=0.0, note=why)])

    return judged


SHARED = ("contract", "values", "gradients", "finite", "inputs-unchanged", "no-uninit-reads", "deterministic")
"""The shared properties' names, in their default order."""


def shared_properties(family: str, *, grad_natural_scales: NaturalScales | None = None,
                      value_natural_scales: ValueNaturalScales | None = None,
                      value_operand_scales: ValueOperandScales | None = None, use: Sequence[str] | None = None,
                      honest_refusal: HonestRefusal | None = None) -> tuple[Property, ...]:
    """The shared properties with ids ``<family>/<name>``, as the family's declaration states them.

    - ``grad_natural_scales``: the natural scale of some gradients (:data:`NaturalScales`), added to the
      ``gradients`` allowance as ``eps_acc * N``;
    - ``value_natural_scales``: the natural scale of some outputs (:data:`ValueNaturalScales`), added to the
      ``values`` allowance as ``eps_acc * N``;
    - ``value_operand_scales``: what rounding tensor-core operands costs in some outputs (:data:`ValueOperandScales`),
      added to the ``values`` allowance as ``eps_x * N``;
    - ``use``: the names (of :data:`SHARED`) the family uses, in the order given (None: all of them, in
      :data:`SHARED`'s order); a name not in :data:`SHARED` is an IqaVerifyError;
    - ``honest_refusal``: when a kernel may refuse a case (:data:`HonestRefusal`), applied to every property
      returned (None: every exception the kernel raises fails the property)."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        check = fn if honest_refusal is None else tolerating(fn, honest_refusal)
        return Property(id=f"{family}/{name}", title=title, check=check, catches=catches)

    props = (
        p("contract", "output count, shapes, dtypes and device follow the contract", _contract,
          "wrong output dtype (e.g. float32 out for bf16 in), transposed state, outputs on the wrong device"),
        p("values", "outputs equal the float64 reference", partial(_values, natural_scales=value_natural_scales,
                                                                    operand_scales=value_operand_scales),
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
        p("deterministic", "two forward+backward calls on the same input agree bitwise", _deterministic,
          "state cached across calls, races and atomics (forward and backward), uninitialised accumulators"),
    )
    if use is None:
        return props
    for name in use:
        check_one_of("use", name, SHARED)
    by_name = dict(zip(SHARED, props))
    return tuple(by_name[name] for name in use)
