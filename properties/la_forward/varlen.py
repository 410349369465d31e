"""Packed variable-length batches for ``la-forward`` (SPEC.md §6, flash-linear-attention's ``cu_seqlens``).

Each property builds its own packed case from the spec (:func:`packed_case`) and calls the kernel with the
``cu_seqlens`` keyword; a kernel without it is "not varlen-capable" and the properties are not applicable
to it (n/a, neither pass nor fail). ids ``la-forward/<name>``:

- ``varlen-values``: o before ``cu[N]`` and the N final states equal the per-sequence float64 reference
  (VALUE tolerance and baseline rule).
- ``varlen-gradients``: gradients equal the reference's (GRAD tolerance); at padding positions they must be
  zero although the cotangents there are not (padding outputs are not judged, nothing may flow from them).
- ``varlen-one-by-one``: the packed call equals each sequence run alone (a plain call), values and
  gradients, with padding inputs far from the rest (10x the values, strong gates) that must change nothing
  (``Kind.METAMORPHIC``, no reference: runs at the spec's ``free_T``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import NotApplicable, Property, PropertyContext, Violation
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.generic import ForwardBackward, cotangents_for, run_forward_backward
from iqa_verify.properties.la_forward.cases import LACase, build_la_inputs
from iqa_verify.properties.la_forward.metamorphic import check_runs, far_from, grad_or_zeros, magnitude_bounds
from iqa_verify.reference.la_forward import la_forward_baseline, la_forward_ref

__all__ = ["PackedCase", "packed_case", "packing", "varlen_properties"]

_SEQ = ("q", "k", "v", "g")
_SHORT = (1, 2, 3, 5, 7, 13, 15, 17, 31)  # shorter than a 16- or 64-step chunk, none a multiple of 16


def packing(seed: int, total: int) -> tuple[list[int], int]:
    """Sequence lengths summing to ``total`` and the padding after them, from ``seed`` (three patterns in turn).

    seed % 3 == 0: many short sequences (1, 2, 3, 5, ... 31 steps) beside one long one;
    seed % 3 == 1: random cuts (1 to 6), so lengths off every multiple of 16 and 64 are common;
    seed % 3 == 2: sequences of length 1 around one ragged sequence.
    Padding: 0 when seed % 4 == 0, else 1 to 5 positions. At most 12 sequences.
    """
    rng = random.Random(seed)
    pattern = seed % 3
    if total <= 1:
        lengths = [total]
    elif pattern == 0:
        shorts: list[int] = []
        while len(shorts) < 10:
            n = rng.choice(_SHORT)
            if sum(shorts) + n > total // 2:
                break
            shorts.append(n)
        long = total - sum(shorts)
        at = rng.randint(0, len(shorts))
        lengths = shorts[:at] + [long] + shorts[at:]
    elif pattern == 1:
        cuts = sorted(rng.sample(range(1, total), min(total - 1, rng.randint(1, 6))))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    else:
        ones = min(3, total - 1)
        lengths = [1] * (ones - ones // 2) + [total - ones] + [1] * (ones // 2)
    pad = 0 if seed % 4 == 0 else 1 + seed % 5
    return lengths, pad


@dataclass(frozen=True)
class PackedCase:
    """inputs: q, k, v, g [1, T, H, *] (T = sum of lengths + padding; padding inputs far from the rest) and
    initial_state [N, H, D, E] or None; cu_seqlens: int64 [N + 1]; lengths; pad."""

    inputs: dict[str, torch.Tensor | None]
    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    pad: int

    @property
    def end(self) -> int:
        return int(sum(self.lengths))

    def describe(self) -> str:
        return f"packed lengths {list(self.lengths)} + {self.pad} padding, cu_seqlens={self.cu_seqlens.tolist()}"


def packed_case(spec: LACase, total: int, dtype: torch.dtype, device: torch.device) -> PackedCase:
    """The packed batch for ``spec`` with ``total`` real positions: lengths from :func:`packing`, H, D, E,
    decay, layout, magnitude and seed from the spec, one initial state per sequence when the spec has one."""
    lengths, pad = packing(spec.seed, total)
    x = build_la_inputs(replace(spec, B=1, T=total + pad, initial_state=False), dtype, device)
    if pad:
        x = far_from(x, total, torch.Generator().manual_seed(spec.seed + 17))
    if spec.initial_state:
        x["initial_state"] = build_la_inputs(replace(spec, B=len(lengths), T=1, seed=spec.seed + 1), dtype, device)["initial_state"]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)
    return PackedCase(x, cu, tuple(lengths), pad)


def _require_varlen(ctx: PropertyContext) -> None:
    if not ctx.accepts("cu_seqlens"):
        raise NotApplicable("not varlen-capable: the kernel takes no cu_seqlens keyword (SPEC §6)")


def _kwargs(ctx: PropertyContext, p: PackedCase) -> dict:
    return {**ctx.case.kwargs, "cu_seqlens": p.cu_seqlens}


def _expect(outs: dict[str, torch.Tensor], p: PackedCase, what: str) -> None:
    _, T, H, D = p.inputs["q"].shape
    E = p.inputs["v"].shape[-1]
    want = {"o": (1, T, H, E), "final_state": (len(p.lengths), H, D, E)}
    bad = [f"out/{n}: shape {tuple(outs[n].shape)}, the contract requires {s}" for n, s in want.items()
           if tuple(outs[n].shape) != s]
    if bad:
        raise Violation(f"{what} ({p.describe()}): outputs break the contract:\n  " + "\n  ".join(bad))


def _cots(ctx: PropertyContext, p: PackedCase) -> dict[str, torch.Tensor]:
    _, T, H, D = p.inputs["q"].shape
    E = p.inputs["v"].shape[-1]
    return cotangents_for(ctx.case, {"o": torch.zeros(1, T, H, E), "final_state": torch.zeros(len(p.lengths), H, D, E)})


def _reference(fn, p: PackedCase, scale: float, cots: dict[str, torch.Tensor] | None, upcast: bool):
    inputs = {n: (t.detach().to(torch.float64) if upcast else t.detach()) if t is not None else None
              for n, t in p.inputs.items()}
    leaves = [inputs[n].requires_grad_() for n in (*_SEQ, "initial_state") if inputs[n] is not None]
    with torch.enable_grad():
        o, state = fn(*inputs.values(), scale=scale, cu_seqlens=p.cu_seqlens)
        if cots is None:
            return {"o": o.detach(), "final_state": state.detach()}, {}
        outs = (o, state)
        cot = [cots["o"].to(o.dtype), cots["final_state"].to(state.dtype)]
        grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True)
    names = [n for n in (*_SEQ, "initial_state") if inputs[n] is not None]
    return {"o": o.detach(), "final_state": state.detach()}, dict(zip(names, grads))


# ------------------------------------------------------------------------------------------ properties


def _varlen_values(ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    p = packed_case(case.spec, case.spec.T, case.dtype, case.device)
    outs = ctx.call(p.inputs, _kwargs(ctx, p))
    _expect(outs, p, "packed call")
    scale = case.kwargs.get("scale", 1.0)
    ref, _ = _reference(la_forward_ref, p, scale, None, upcast=True)
    base, _ = _reference(la_forward_baseline, p, scale, None, upcast=False)
    tol, dtype, end = tolerance(Kind.VALUE, case.dtype), case.dtype, p.end
    checks = [
        compare("out/o[:, :cu[N]]", outs["o"][:, :end], ref["o"][:, :end], tol, dtype=dtype, baseline=base["o"][:, :end]),
        compare("out/final_state", outs["final_state"], ref["final_state"], tol, dtype=dtype, baseline=base["final_state"]),
    ]
    ctx.require(checks, f"packed batch ({p.describe()}) differs from the per-sequence float64 reference")


def _varlen_gradients(ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    p = packed_case(case.spec, case.spec.T, case.dtype, case.device)
    cots = _cots(ctx, p)
    got = run_forward_backward(ctx, cots, inputs=p.inputs, kwargs=_kwargs(ctx, p))
    _expect(got.outputs, p, "packed call")
    scale = case.kwargs.get("scale", 1.0)
    _, ref = _reference(la_forward_ref, p, scale, cots, upcast=True)
    _, base = _reference(la_forward_baseline, p, scale, cots, upcast=False)
    tol, dtype, end = tolerance(Kind.GRAD, case.dtype), case.dtype, p.end
    siblings = max(float(r.abs().max()) for r in ref.values() if r is not None and r.numel())
    checks: list[TensorCheck] = []
    for n, r in ref.items():
        g = grad_or_zeros(got, n, p.inputs[n])
        r = r if r is not None else torch.zeros_like(p.inputs[n], dtype=torch.float64)
        b = base.get(n)
        if n == "initial_state":
            zero = not bool(r.abs().max() > 0)
            checks.append(compare("grad/dinitial_state", g, r, tol, dtype=dtype, baseline=b, scale=siblings if zero else None))
            continue
        # a gradient exactly 0 in theory (dg of a length-1 sequence without S0) is judged against the scale of
        # its siblings, not its own round-off, as the gradients property does
        zero = not bool(r[:, :end].abs().max() > 0)
        checks.append(compare(f"grad/d{n}[:, :cu[N]]", g[:, :end], r[:, :end], tol, dtype=dtype,
                              baseline=None if b is None else b[:, :end], scale=siblings if zero else None))
        if p.pad:
            # exactly 0 in theory: judged against the scale of the real gradients, as generic does for dg at T = 1
            checks.append(compare(f"grad/d{n}[:, cu[N]:] (padding)", g[:, end:], r[:, end:], tol, dtype=dtype,
                                  scale=siblings))
    ctx.require(checks, f"packed batch ({p.describe()}) gradients differ from the per-sequence float64 reference"
                        " (at padding they must be 0)")


def _run(ctx: PropertyContext, inputs, cots, kwargs, what: str) -> ForwardBackward:
    res = run_forward_backward(ctx, cots, inputs=inputs, kwargs=kwargs)
    return ForwardBackward({n: t.detach().clone() for n, t in res.outputs.items()},
                           {n: (t.detach().clone() if t is not None else None) for n, t in res.grads.items()})


def _varlen_one_by_one(ctx: PropertyContext) -> None:
    _require_varlen(ctx)
    case = ctx.case
    spec = case.spec
    total = spec.free_T or spec.T
    p = packed_case(spec, total, case.dtype, case.device)
    cots = _cots(ctx, p)
    packed = _run(ctx, p.inputs, cots, _kwargs(ctx, p), "packed call")
    _expect(packed.outputs, p, "packed call")
    dtype, scale = case.dtype, case.kwargs.get("scale", 1.0)
    cu = p.cu_seqlens.tolist()
    checks: list[TensorCheck] = []
    against = "the sequence run alone (a plain call)"
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = p.inputs["initial_state"]
        xi = {n: p.inputs[n][:, a:b] for n in _SEQ}
        xi["initial_state"] = s0[i:i + 1] if s0 is not None else None
        ci = {"o": cots["o"][:, a:b], "final_state": cots["final_state"][i:i + 1]}
        alone = _run(ctx, xi, ci, dict(case.kwargs), f"sequence {i} alone")
        bound = magnitude_bounds(xi, scale, ci)
        tag = f"[seq {i}: {a}:{b}]"
        checks.append(check_runs(f"out/o{tag}", packed.outputs["o"][:, a:b], alone.outputs["o"], Kind.METAMORPHIC, dtype,
                             bound["o"], against))
        checks.append(check_runs(f"out/final_state[{i}]", packed.outputs["final_state"][i:i + 1], alone.outputs["final_state"],
                             Kind.METAMORPHIC, dtype, bound["final_state"], against))
        for n in _SEQ:
            checks.append(check_runs(f"grad/d{n}{tag}", grad_or_zeros(packed, n, p.inputs[n])[:, a:b], grad_or_zeros(alone, n, xi[n]),
                                 Kind.METAMORPHIC_GRAD, dtype, bound[n], against))
        if s0 is not None:
            checks.append(check_runs(f"grad/dinitial_state[{i}]", grad_or_zeros(packed, "initial_state", s0)[i:i + 1],
                                 grad_or_zeros(alone, "initial_state", xi["initial_state"]), Kind.METAMORPHIC_GRAD, dtype,
                                 bound["initial_state"], against))
    if len(checks) and p.pad:
        bound = magnitude_bounds({**p.inputs, "initial_state": None}, scale, {**cots, "final_state": cots["final_state"][:1]})
        for n in _SEQ:
            g = grad_or_zeros(packed, n, p.inputs[n])[:, p.end:]
            checks.append(check_runs(f"grad/d{n}[:, cu[N]:] (padding)", g, torch.zeros_like(g, dtype=torch.float64),
                                 Kind.METAMORPHIC_GRAD, dtype, bound[n], "zero (padding gets no gradient)"))
    ctx.require(checks, f"the packed call ({p.describe()}) differs from its sequences run one by one")


def varlen_properties(family: str) -> tuple[Property, ...]:
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=fn, catches=catches)

    return (
        p("varlen-values", "packed batches (cu_seqlens): outputs and final states equal the per-sequence reference",
          _varlen_values, "state not reset between sequences, wrong per-sequence initial/final state, padding leaking"),
        p("varlen-gradients", "packed batches: gradients equal the per-sequence reference's, zero at padding",
          _varlen_gradients, "padding rows never written or fed back into gradients, states mixed in the backward"),
        p("varlen-one-by-one", "a packed batch equals its sequences run one by one, padding changes nothing",
          _varlen_one_by_one, "pack offsets and chunk grids of the whole pack at lengths past the reference's"),
    )
