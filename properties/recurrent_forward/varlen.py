"""Packed variable-length batches for the recurrent forward families (SPEC §6, ``cu_seqlens``).

Each property builds its own packed case from the spec (:func:`~.packing.packed_case`) and calls the kernel
with the ``cu_seqlens`` keyword; a kernel without it is "not varlen-capable" and the properties are not
applicable to it (n/a, neither pass nor fail). ids ``<family>/<name>``:

- ``varlen-values``: o before ``cu[N]`` and the N final states equal the per-sequence float64 reference
  (VALUE tolerance and baseline rule; each final state with its sequence's natural scale where the family
  declares one, ``RecurrentForward.final_state_natural``, or o and the final states with each sequence's
  operand-rounding scale, ``RecurrentForward.operand_scales``).
- ``varlen-gradients``: gradients equal the reference's (GRAD tolerance, with the family's gradient natural
  scales per sequence, ``RecurrentForward.grad_natural``); at padding positions they must be zero although the
  cotangents there are not (padding outputs are not judged, nothing may flow from them).
- ``varlen-one-by-one``: the packed call equals each sequence run alone (a plain call), values and
  gradients, with padding inputs far from the rest that must change nothing (``Kind.METAMORPHIC``, no
  reference: runs at the spec's ``free_T`` when it has one).

The packed forward+backward runs with NaN-poisoned ``torch.empty*`` allocations: a kernel that never writes the
padding's gradients fails on every run, not only when the heap happened to hold garbage there (a fresh page
reads as the zero the property expects).
"""

from __future__ import annotations

from functools import partial

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import NotApplicable, Property, PropertyContext, digest
from iqa_verify.properties.generic import run_forward_backward
from iqa_verify.properties.recurrent_forward.form import RecurrentForward
from iqa_verify.properties.recurrent_forward.packing import PackedCase, packed_case
from iqa_verify.properties.recurrent_forward.runs import check_runs, copied_run, cotangents, expect_shapes, grad_or_zeros
from iqa_verify.tolerances import Kind, tolerance

__all__ = ["varlen_properties"]


def _require_varlen(ctx: PropertyContext) -> None:
    if not ctx.accepts("cu_seqlens"):
        raise NotApplicable("not varlen-capable: the kernel takes no cu_seqlens keyword (SPEC §6)")


def _kwargs(ctx: PropertyContext, p: PackedCase) -> dict:
    return {**ctx.case.kwargs, "cu_seqlens": p.cu_seqlens}


def _expect(outs, p: PackedCase, what: str) -> None:
    expect_shapes(outs, p.inputs, f"{what} ({p.describe()})", states=len(p.lengths))


def _sequence(p: PackedCase, i: int, a: int, b: int) -> dict[str, torch.Tensor | None]:
    """The inputs of sequence ``i`` (positions ``a:b``) alone: a batch of one, its own initial state."""
    s0 = p.inputs["initial_state"]
    return {n: (s0[i:i + 1] if s0 is not None else None) if n == "initial_state" else
            (t[:, a:b] if t is not None else None) for n, t in p.inputs.items()}


def _grad_natural(form: RecurrentForward, p: PackedCase, cots: dict[str, torch.Tensor],
                  scale: float) -> dict[str, torch.Tensor]:
    """The family's gradient natural scales (``RecurrentForward.grad_natural``), sequence by sequence, laid out
    like the packed inputs (0 at padding)."""
    if form.grad_natural is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    cu = p.cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        ci = {"o": cots["o"][:, a:b], "final_state": cots["final_state"][i:i + 1]}
        for n, nat in form.grad_natural(_sequence(p, i, a, b), ci, scale).items():
            full = out.setdefault(n, torch.zeros(p.inputs[n].shape, dtype=torch.float64))
            where = full[i:i + 1] if n == "initial_state" else full[:, a:b]  # a state per sequence, else time
            where.copy_(nat.to(torch.float64).reshape(where.shape))
    return out


def _reference(fn, p: PackedCase, scale: float, cots: dict[str, torch.Tensor], upcast: bool):
    """fn (reference or baseline) on the packed case: its outputs, and its gradients of <cots, outputs> by input name."""
    inputs = {n: (t.detach().to(torch.float64) if upcast else t.detach()) if t is not None else None
              for n, t in p.inputs.items()}
    names = [n for n, t in inputs.items() if t is not None]
    leaves = [inputs[n].requires_grad_() for n in names]
    with torch.enable_grad():
        o, state = fn(*inputs.values(), scale=scale, cu_seqlens=p.cu_seqlens)
        cot = [cots["o"].to(o.dtype), cots["final_state"].to(state.dtype)]
        grads = torch.autograd.grad((o, state), leaves, cot, allow_unused=True)
    return {"o": o.detach(), "final_state": state.detach()}, dict(zip(names, grads))


def _packed_at_t(form: RecurrentForward, ctx: PropertyContext) -> PackedCase:
    """The case's packed batch at its own T (varlen-values and varlen-gradients judge the same one), built once."""
    case = ctx.case
    return ctx.memoized("varlen/packed-at-T", lambda: packed_case(form, case.spec, case.spec.T, case.dtype, case.device))


def _packed_references(form: RecurrentForward, ctx: PropertyContext, p: PackedCase, cots: dict[str, torch.Tensor]):
    """(reference outputs, reference gradients, baseline outputs, baseline gradients) on the packed batch at T with
    the case's cotangents: computed once for varlen-values (outputs) and varlen-gradients (both)."""
    scale = ctx.case.kwargs.get("scale", 1.0)

    def compute():
        ref = _reference(form.reference, p, scale, cots, upcast=True)
        base = _reference(form.baseline, p, scale, cots, upcast=False)
        return (*ref, *base)

    return ctx.memoized(("varlen/references-at-T", digest(cots)), compute)


def _varlen_values(form: RecurrentForward, ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    p = _packed_at_t(form, ctx)
    outs = ctx.call(p.inputs, _kwargs(ctx, p))
    _expect(outs, p, "packed call")
    ref, _, base, _ = _packed_references(form, ctx, p, cotangents(ctx, p.inputs, states=len(p.lengths)))
    tol, dtype, end = tolerance(Kind.VALUE, case.dtype), case.dtype, p.end
    cu = p.cu_seqlens.tolist()
    scales: dict[str, torch.Tensor] = {}
    scale_tol = None
    if form.final_state_natural is not None:  # each sequence's final state against the states it came through
        scale_tol = tolerance(Kind.NATURAL_SCALE, dtype)
        scales["final_state"] = torch.stack([
            torch.full(ref["final_state"].shape[1:], form.final_state_natural(_sequence(p, i, a, b)), dtype=torch.float64)
            for i, (a, b) in enumerate(zip(cu, cu[1:]))])
    elif form.operand_scales is not None:  # each sequence's own terms (nothing crosses a sequence boundary)
        scale_tol = tolerance(Kind.OPERAND_ROUNDING, dtype)
        per = [form.operand_scales(_sequence(p, i, a, b), case.kwargs.get("scale", 1.0))
               for i, (a, b) in enumerate(zip(cu, cu[1:]))]
        scales = {"o": torch.cat([s["o"] for s in per], dim=1),
                  "final_state": torch.cat([s["final_state"] for s in per])}
    checks = [
        compare("out/o[:, :cu[N]]", outs["o"][:, :end], ref["o"][:, :end], tol, dtype=dtype, baseline=base["o"][:, :end],
                natural=scales.get("o"), natural_tol=scale_tol if "o" in scales else None),
        compare("out/final_state", outs["final_state"], ref["final_state"], tol, dtype=dtype, baseline=base["final_state"],
                natural=scales.get("final_state"), natural_tol=scale_tol if "final_state" in scales else None),
    ]
    ctx.require(checks, f"packed batch ({p.describe()}) differs from the per-sequence float64 reference")


def _varlen_gradients(form: RecurrentForward, ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    p = _packed_at_t(form, ctx)
    cots = cotangents(ctx, p.inputs, states=len(p.lengths))
    got = run_forward_backward(ctx, cots, inputs=p.inputs, kwargs=_kwargs(ctx, p), poisoned=True)
    _expect(got.outputs, p, "packed call")
    scale = case.kwargs.get("scale", 1.0)
    _, ref, _, base = _packed_references(form, ctx, p, cots)
    tol, dtype, end = tolerance(Kind.GRAD, case.dtype), case.dtype, p.end
    siblings = max(float(r.abs().max()) for r in ref.values() if r is not None and r.numel())
    natural = _grad_natural(form, p, cots, scale)
    nat_tol = tolerance(Kind.NATURAL_SCALE, dtype) if natural else None
    checks: list[TensorCheck] = []
    for n, r in ref.items():
        g = grad_or_zeros(got, n, p.inputs[n])
        r = r if r is not None else torch.zeros_like(p.inputs[n], dtype=torch.float64)
        b = base.get(n)
        if n == "initial_state":
            zero = not bool(r.abs().max() > 0)
            checks.append(compare("grad/dinitial_state", g, r, tol, dtype=dtype, baseline=b, scale=siblings if zero else None,
                                  natural=natural.get(n), natural_tol=nat_tol if n in natural else None))
            continue
        # a gradient exactly 0 in theory (dg of a length-1 sequence without S0) is judged against the scale of
        # its siblings, not its own round-off, as the gradients property does
        zero = not bool(r[:, :end].abs().max() > 0)
        checks.append(compare(f"grad/d{n}[:, :cu[N]]", g[:, :end], r[:, :end], tol, dtype=dtype,
                              baseline=None if b is None else b[:, :end], scale=siblings if zero else None,
                              natural=natural[n][:, :end] if n in natural else None,
                              natural_tol=nat_tol if n in natural else None))
        if p.pad:
            # exactly 0 in theory: judged against the scale of the real gradients, as generic does for dg at T = 1
            checks.append(compare(f"grad/d{n}[:, cu[N]:] (padding)", g[:, end:], r[:, end:], tol, dtype=dtype,
                                  scale=siblings))
    ctx.require(checks, f"packed batch ({p.describe()}) gradients differ from the per-sequence float64 reference"
                        " (at padding they must be 0; the packed run had NaN-filled torch.empty*, so NaN there means never"
                        " written)")


def _varlen_one_by_one(form: RecurrentForward, ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    spec = case.spec
    total = getattr(spec, "free_T", 0) or spec.T
    p = packed_case(form, spec, total, case.dtype, case.device)
    cots = cotangents(ctx, p.inputs, states=len(p.lengths))
    packed = copied_run(ctx, p.inputs, cots, _kwargs(ctx, p), poisoned=True)
    _expect(packed.outputs, p, "packed call")
    dtype, scale = case.dtype, case.kwargs.get("scale", 1.0)
    cu = p.cu_seqlens.tolist()
    checks: list[TensorCheck] = []
    against = "the sequence run alone (a plain call)"
    s0 = p.inputs["initial_state"]
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        xi = _sequence(p, i, a, b)
        ci = {"o": cots["o"][:, a:b], "final_state": cots["final_state"][i:i + 1]}
        alone = copied_run(ctx, xi, ci, dict(case.kwargs))
        bound = form.bounds(xi, scale, ci)
        tag = f"[seq {i}: {a}:{b}]"
        checks.append(check_runs(f"out/o{tag}", packed.outputs["o"][:, a:b], alone.outputs["o"], Kind.METAMORPHIC, dtype,
                                 bound["o"], against))
        checks.append(check_runs(f"out/final_state[{i}]", packed.outputs["final_state"][i:i + 1], alone.outputs["final_state"],
                                 Kind.METAMORPHIC, dtype, bound["final_state"], against))
        for n in form.time_inputs:
            if xi[n] is None:
                continue
            checks.append(check_runs(f"grad/d{n}{tag}", grad_or_zeros(packed, n, p.inputs[n])[:, a:b],
                                     grad_or_zeros(alone, n, xi[n]), Kind.METAMORPHIC_GRAD, dtype, bound[n], against))
        if s0 is not None:
            checks.append(check_runs(f"grad/dinitial_state[{i}]", grad_or_zeros(packed, "initial_state", s0)[i:i + 1],
                                     grad_or_zeros(alone, "initial_state", xi["initial_state"]), Kind.METAMORPHIC_GRAD,
                                     dtype, bound["initial_state"], against))
    if len(checks) and p.pad:
        bound = form.bounds({**p.inputs, "initial_state": None}, scale, {**cots, "final_state": cots["final_state"][:1]})
        for n in form.time_inputs:
            if p.inputs[n] is None:
                continue
            g = grad_or_zeros(packed, n, p.inputs[n])[:, p.end:]
            checks.append(check_runs(f"grad/d{n}[:, cu[N]:] (padding)", g, torch.zeros_like(g, dtype=torch.float64),
                                     Kind.METAMORPHIC_GRAD, dtype, bound[n], "zero (padding gets no gradient)"))
    ctx.require(checks, f"the packed call ({p.describe()}) differs from its sequences run one by one (it ran with"
                        " NaN-filled torch.empty*: NaN at padding means gradients never written)")


def varlen_properties(family: str, form: RecurrentForward) -> tuple[Property, ...]:
    """``varlen-values``, ``varlen-gradients`` and ``varlen-one-by-one`` with ids ``<family>/<name>``."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=partial(fn, form), catches=catches)

    return (
        p("varlen-values", "packed batches (cu_seqlens): outputs and final states equal the per-sequence reference",
          _varlen_values, "state not reset between sequences, wrong per-sequence initial/final state, padding leaking"),
        p("varlen-gradients", "packed batches: gradients equal the per-sequence reference's, zero at padding",
          _varlen_gradients, "padding rows never written or fed back into gradients, states mixed in the backward"),
        p("varlen-one-by-one", "a packed batch equals its sequences run one by one, padding changes nothing",
          _varlen_one_by_one, "pack offsets and chunk grids of the whole pack at lengths past the reference's"),
    )
