"""Reference-free properties of the recurrent forward families (SPEC §6): two runs of the kernel that must agree.

ids ``<family>/<name>``:

- ``state-handoff``: running [0, P) and then [P, T) from the returned final state equals running [0, T):
  outputs, final state, and gradients (the second run's initial-state gradient is the first run's
  final-state cotangent). P alternates between a chunk boundary (a multiple of 64, or 16 for short T)
  and a point off every boundary.
- ``causality``: replacing the inputs at positions >= P by far ones (:class:`~.form.Far`: large values, strong
  gates) changes no output at positions < P; with cotangents only on outputs < P, gradients at positions < P
  do not change and gradients at positions >= P are zero.
- ``sequence-independence``: in a batch with a neighbour whose inputs are far from the others', every
  sequence's outputs and gradients equal those of the sequence run alone.

They need no float64 reference, so they run at the spec's ``free_T`` when it has one (sequence independence
at the shorter of T and free_T): lengths where the reference is slow. None may demand bitwise equality: a
correct chunked kernel computes the two runs in different orders (chunk boundaries move, a form is chosen per
call). The allowance is ``Kind.METAMORPHIC`` (``METAMORPHIC_GRAD``) of the tolerance table in units of the
family's magnitude bounds (``RecurrentForward.bounds``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from iqa_verify.family import Property, PropertyContext
from iqa_verify.properties.recurrent_forward.form import Inputs, RecurrentForward
from iqa_verify.properties.recurrent_forward.runs import (
    case_seed,
    check_runs,
    copied_run,
    far_amplitude,
    cotangents,
    expect_shapes,
    far_from,
    grad_or_zeros,
)
from iqa_verify.tolerances import Kind

__all__ = ["free_inputs", "metamorphic_properties"]


def free_inputs(form: RecurrentForward, ctx: PropertyContext) -> Inputs:
    """The case's inputs, or the same spec's inputs at length ``free_T`` when the spec sets one."""
    spec = ctx.case.spec
    free_t = getattr(spec, "free_T", 0)
    if free_t and free_t != spec.T:
        return form.build(replace(spec, T=free_t), ctx.case.dtype, ctx.case.device)
    return dict(ctx.case.inputs)


def _time_slice(form: RecurrentForward, inputs: Inputs, start: int, stop: int, initial_state: torch.Tensor | None) -> Inputs:
    """Positions [start, stop) of every time input, in the contract's order, with ``initial_state``."""
    out: Inputs = {}
    for n, t in inputs.items():
        out[n] = initial_state if n == "initial_state" else (t[:, start:stop] if t is not None else None)
    return out


def _state_as_input(state: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A returned state as the next call's initial_state: in the inputs' dtype and device (the contract)."""
    return state.detach().to(device=like.device, dtype=like.dtype).contiguous()


def _split_point(T: int, on_boundary: bool) -> int | None:
    """A split 0 < P < T: on a chunk boundary (the last multiple of 64 below T, else of 16) or off every
    multiple of 16 (near the middle); None when there is none."""
    if T < 2:
        return None
    if on_boundary:
        for c in (64, 16):
            if T > c:
                return c * ((T - 1) // c)
    p = max(1, T // 2)
    return p - 1 if p % 16 == 0 else p


def _gen(ctx: PropertyContext, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(case_seed(ctx) * 31 + salt)


def _state_handoff(form: RecurrentForward, ctx: PropertyContext) -> None:
    x = free_inputs(form, ctx)
    T = x["q"].shape[1]
    on_boundary = case_seed(ctx) % 2 == 0
    P = _split_point(T, on_boundary)
    if P is None:
        return  # one step cannot be split; judged on every longer case
    cots = cotangents(ctx, x)
    full = copied_run(ctx, x, cots)
    expect_shapes(full.outputs, x, f"one call on [0, {T})")
    dtype = ctx.case.dtype
    with torch.no_grad():
        first_fwd = ctx.call(_time_slice(form, x, 0, P, x["initial_state"]))
    expect_shapes(first_fwd, _time_slice(form, x, 0, P, None), f"the call on [0, {P})")
    handed = _state_as_input(first_fwd["final_state"], x["q"])
    second_in = _time_slice(form, x, P, T, handed)
    second = copied_run(ctx, second_in, {"o": cots["o"][:, P:], "final_state": cots["final_state"]})
    expect_shapes(second.outputs, second_in, f"the call on [{P}, {T})")
    d_handed = grad_or_zeros(second, "initial_state", handed)
    first_in = _time_slice(form, x, 0, P, x["initial_state"])
    first = copied_run(ctx, first_in, {"o": cots["o"][:, :P], "final_state": d_handed.detach()})
    expect_shapes(first.outputs, first_in, f"the call on [0, {P})")
    bounds = form.bounds(x, ctx.case.kwargs.get("scale", 1.0), cots)
    one_call = f"one call on [0, {T})"
    where = f"split at P={P} ({'on' if on_boundary else 'off'} a chunk boundary) of T={T}"
    checks = [
        check_runs("out/o", torch.cat([first.outputs["o"], second.outputs["o"]], 1), full.outputs["o"], Kind.METAMORPHIC,
                   dtype, bounds["o"], one_call),
        check_runs("out/final_state", second.outputs["final_state"], full.outputs["final_state"], Kind.METAMORPHIC, dtype,
                   bounds["final_state"], one_call),
    ]
    for n in form.time_inputs:
        if x[n] is None:
            continue
        got = torch.cat([grad_or_zeros(first, n, x[n][:, :P]), grad_or_zeros(second, n, x[n][:, P:])], 1)
        checks.append(check_runs(f"grad/d{n}", got, grad_or_zeros(full, n, x[n]), Kind.METAMORPHIC_GRAD, dtype, bounds[n],
                                 one_call))
    if x["initial_state"] is not None:
        checks.append(check_runs("grad/dinitial_state", grad_or_zeros(first, "initial_state", x["initial_state"]),
                                 grad_or_zeros(full, "initial_state", x["initial_state"]), Kind.METAMORPHIC_GRAD, dtype,
                                 bounds["initial_state"], one_call))
    ctx.require(checks, f"running [0, P) then [P, T) from the returned state differs from one call ({where})")


def _causality(form: RecurrentForward, ctx: PropertyContext) -> None:
    x = free_inputs(form, ctx)
    T = x["q"].shape[1]
    P = _split_point(T, on_boundary=False)
    if P is None:
        return
    y = far_from(form, x, P, _gen(ctx, 1))
    cots = cotangents(ctx, x)
    # cotangents on outputs before P only: then nothing at or after P may receive a gradient
    do = cots["o"].clone()
    do[:, P:] = 0
    past = {"o": do, "final_state": torch.zeros_like(cots["final_state"])}
    a = copied_run(ctx, x, past)
    expect_shapes(a.outputs, x, "the case's inputs")
    b = copied_run(ctx, y, past)
    expect_shapes(b.outputs, y, f"inputs at positions >= {P} replaced")
    dtype, scale = ctx.case.dtype, ctx.case.kwargs.get("scale", 1.0)
    ba, bb = form.bounds(x, scale, past), form.bounds(y, scale, past)
    bound = {n: max(ba[n], bb[n]) for n in ba}
    orig, zero = "the run on the case's own inputs", "zero (nothing at or after P may receive gradient)"
    checks = [check_runs("out/o[:, :P]", b.outputs["o"][:, :P], a.outputs["o"][:, :P], Kind.METAMORPHIC, dtype,
                         bound["o"], orig)]
    for n in form.time_inputs:
        if x[n] is None:
            continue
        ga, gb = grad_or_zeros(a, n, x[n]), grad_or_zeros(b, n, y[n])
        checks.append(check_runs(f"grad/d{n}[:, :P]", gb[:, :P], ga[:, :P], Kind.METAMORPHIC_GRAD, dtype, bound[n], orig))
        for tag, gr in (("", ga), (" (future replaced)", gb)):
            checks.append(check_runs(f"grad/d{n}[:, P:]{tag}", gr[:, P:], torch.zeros_like(gr[:, P:], dtype=torch.float64),
                                     Kind.METAMORPHIC_GRAD, dtype, bound[n], zero))
    if x["initial_state"] is not None:
        checks.append(check_runs("grad/dinitial_state", grad_or_zeros(b, "initial_state", x["initial_state"]),
                                 grad_or_zeros(a, "initial_state", x["initial_state"]), Kind.METAMORPHIC_GRAD, dtype,
                                 bound["initial_state"], orig))
    ctx.require(checks, f"the future leaks into the past: inputs at positions >= P={P} of T={T} change outputs or"
                        " gradients before P (or receive gradient from cotangents before P)")


def _with_far_neighbour(form: RecurrentForward, x: Inputs, gen: torch.Generator) -> Inputs:
    """x with one more sequence appended to the batch: sequence 0's shapes, every entry far from the others."""
    far = far_from(form, {n: (t[:1] if t is not None else None) for n, t in x.items()}, 0, gen)
    out: Inputs = {}
    for n, t in x.items():
        if n == "initial_state" or t is None:
            continue
        out[n] = torch.cat([t.detach(), far[n]], 0)
    s0 = x["initial_state"]
    out = {n: out.get(n) for n in x}  # the contract's order, absent inputs None
    if s0 is not None:
        amp = far_amplitude(s0, s0[:1].shape)
        extra = (amp * torch.randn(s0[:1].shape, generator=gen, dtype=torch.float64)).to(s0.device, s0.dtype)
        out["initial_state"] = torch.cat([s0.detach(), extra], 0)
    return out


def _sequence_independence(form: RecurrentForward, ctx: PropertyContext) -> None:
    """Three runs whatever B: the case's batch with a far neighbour appended, the far neighbour alone, and the
    case's batch alone; each sequence of the first is judged against the run without the others' kind of
    neighbour. At the shorter of T and free_T: the neighbour's effect shows at any length."""
    spec = ctx.case.spec
    free_t = getattr(spec, "free_T", 0)
    short = min(spec.T, free_t) if free_t else spec.T
    x = dict(ctx.case.inputs) if short == spec.T else form.build(replace(spec, T=short), ctx.case.dtype, ctx.case.device)
    xb = _with_far_neighbour(form, x, _gen(ctx, 2))
    B = xb["q"].shape[0]
    cots = cotangents(ctx, xb)
    together = copied_run(ctx, xb, cots)
    expect_shapes(together.outputs, xb, f"a batch of {B}")
    dtype, scale = ctx.case.dtype, ctx.case.kwargs.get("scale", 1.0)
    checks = []
    for rows, tag, what in ((slice(B - 1, B), f"[{B - 1}] (far neighbour)", "the far neighbour run alone"),
                            (slice(0, B - 1), f"[:{B - 1}]", "the case's batch run without the far neighbour")):
        xs = {n: (t[rows] if t is not None else None) for n, t in xb.items()}
        cs = {n: c[rows] for n, c in cots.items()}
        alone = copied_run(ctx, xs, cs)
        expect_shapes(alone.outputs, xs, what)
        bound = form.bounds(xs, scale, cs)
        for n in ("o", "final_state"):
            checks.append(check_runs(f"out/{n}{tag}", together.outputs[n][rows], alone.outputs[n], Kind.METAMORPHIC, dtype,
                                     bound[n], what))
        for n in form.grad_names(xs):
            checks.append(check_runs(f"grad/d{n}{tag}", grad_or_zeros(together, n, xb[n])[rows],
                                     grad_or_zeros(alone, n, xs[n]), Kind.METAMORPHIC_GRAD, dtype, bound[n], what))
    ctx.require(checks, f"a sequence's results depend on its neighbours: in a batch of {B} (the last one far from the"
                        " others: large values, strong gates) they differ from the runs without that neighbour")


def metamorphic_properties(family: str, form: RecurrentForward) -> tuple[Property, ...]:
    """``state-handoff``, ``causality`` and ``sequence-independence`` with ids ``<family>/<name>``."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=partial(fn, form), catches=catches)

    return (
        p("state-handoff", "[0, P) then [P, T) from the returned state equals one call, values and gradients",
          _state_handoff, "prefill-to-decode hand-off, chunk offsets and ragged chunks at lengths past the reference's"),
        p("causality", "inputs at positions >= P change no output or gradient before P", _causality,
          "later gates or keys changing earlier outputs (a form chosen from part of a chunk), backward leaks"),
        p("sequence-independence", "each sequence of a batch equals the sequence run alone, beside a far neighbour",
          _sequence_independence, "batch-wide decisions and statistics, sequences mixed through shared scratch"),
    )
