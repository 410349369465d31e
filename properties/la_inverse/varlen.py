"""Packed variable-length batches (SPEC §6, ``cu_seqlens``) for ``la-solve-v``, whose substitution is sequential
in time like the forward's.

The packed system is block diagonal (no state crosses a sequence boundary), so the contract's minimum-norm
least-squares answer is, sequence by sequence, sequence i's own minimum-norm solution from ``initial_state[i]``
(:func:`iqa_verify.reference.la_inverse.la_solve_v_dense_ref` with ``cu_seqlens``). Padding positions
(``>= cu[N]``) belong to no system: their outputs are not judged, their inputs must change nothing, and the
gradients there must be zero.

Each property builds the same packed case from the spec (:func:`packed_solve_case`: lengths from
:func:`~iqa_verify.properties.recurrent_forward.packing.packing`, each sequence its own solve problem with the
spec's conditioning, padding far from the rest) and judges it per sequence with the condition-aware
judgements of :mod:`~iqa_verify.properties.la_inverse.checks`. A kernel without the keyword is "not
varlen-capable": the properties are not applicable to it (n/a, neither pass nor fail). ids ``la-solve-v/<name>``:

- ``varlen-backward-error``: per sequence, the ``backward-error`` judgement (any conditioning).
- ``varlen-minimum-norm``: per sequence, the ``minimum-norm`` judgement against that sequence's float64
  pinv solution (forward errors only where kappa is moderate).
- ``varlen-gradients``: per sequence where its system is full rank and well-conditioned, the ``gradients``
  judgement against the float64 per-sequence reference; at padding the gradients must be 0 (cotangents there
  are not), judged against the scale of the real gradients. Its packed run has NaN-poisoned ``torch.empty*``
  allocations, so padding gradients never written fail on every run, not only when the heap held garbage.
- ``varlen-one-by-one``: the packed answer equals each sequence solved alone (a plain call) within the
  forward-error allowance of that sequence's system (``idempotent``'s rule: two answers of one solver), the
  padding inputs far from the rest (no float64 solution is compared).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import NotApplicable, Property, PropertyContext, Violation
from iqa_verify.properties.la_forward.cases import Layout
from iqa_verify.properties.la_forward.natural import dg_natural_scale
from iqa_verify.properties.la_inverse.cases import SolveCase, build_solve_inputs
from iqa_verify.properties.la_inverse.checks import (
    DenseSystem,
    analyse,
    backward_error_checks,
    forward_error_checks,
    merge_natural,
    solution_rounding_natural,
)
from iqa_verify.properties.recurrent_forward.packing import PackedCase, packing
from iqa_verify.reference.la_inverse import Unknown, la_solve_v_dense_ref
from iqa_verify.tolerances import Kind, tolerance

__all__ = ["PackedSolve", "packed_solve_case", "varlen_solve_properties"]

F64 = torch.float64
_NAMES = ("q", "k", "o", "g")


@dataclass(frozen=True)
class PackedSolve(PackedCase):
    """A :class:`~iqa_verify.properties.recurrent_forward.packing.PackedCase` of a solve: inputs q, k [1, T, H, D],
    o [1, T, H, E], g [1, T, H] (T = sum of lengths + pad; padding far from the rest) and initial_state
    [N, H, D, E] or None, in contract order."""

    def spans(self) -> list[tuple[int, int, int]]:
        cu = self.cu_seqlens.tolist()
        return [(i, a, b) for i, (a, b) in enumerate(zip(cu, cu[1:]))]

    def sequence(self, i: int) -> dict[str, torch.Tensor | None]:
        """Sequence i's inputs as an ordinary (unpacked) call: [1, L, H, *] and initial_state [1, H, D, E]."""
        a, b = (int(c) for c in self.cu_seqlens[i:i + 2].tolist())
        s0 = self.inputs["initial_state"]
        return {**{n: self.inputs[n][:, a:b] for n in _NAMES}, "initial_state": s0[i:i + 1] if s0 is not None else None}


def packed_solve_case(spec: SolveCase, dtype: torch.dtype, device: torch.device) -> PackedSolve:
    """The packed batch for ``spec``: lengths and padding from :func:`packing` (``spec.la.T`` real positions), each
    sequence its own solve problem (the spec's conditioning, consistency, decay, magnitude and scale; seed
    varied per sequence; contiguous), one initial state per sequence when the spec has one; the padding a
    further problem with q, k, o, g moved far from the rest."""
    la = replace(spec.la, B=1, layout=Layout.CONTIGUOUS)
    lengths, pad = packing(spec.la.seed, spec.la.T)
    parts = [build_solve_inputs(replace(spec, la=replace(la, T=n, seed=la.seed + 7 * i)), dtype, device)
             for i, n in enumerate(lengths)]
    cat = {n: torch.cat([p[n] for p in parts], dim=1) for n in _NAMES}
    s0 = torch.cat([p["initial_state"] for p in parts], dim=0) if la.initial_state else None
    if pad:
        tail = build_solve_inputs(replace(spec, la=replace(la, T=pad, seed=la.seed + 104651)), dtype, device)
        far = {"q": 2.0, "k": -2.0, "o": -3.0, "g": 3.0}
        cat = {n: torch.cat([cat[n], (tail[n].to(F64) * far[n]).to(dtype)], dim=1) for n in _NAMES}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)
    return PackedSolve({**cat, "initial_state": s0}, cu, tuple(lengths), pad)


def _require_varlen(ctx: PropertyContext) -> PackedSolve:
    if not ctx.accepts("cu_seqlens"):
        raise NotApplicable("not varlen-capable: the kernel takes no cu_seqlens keyword (SPEC §6)")
    case = ctx.case
    return ctx.memoized(("la-solve-v/varlen", "case"), lambda: packed_solve_case(case.spec, case.dtype, case.device))


def _kwargs(ctx: PropertyContext, p: PackedSolve) -> dict:
    return {**ctx.case.kwargs, "cu_seqlens": p.cu_seqlens}


def _expect(v: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    if tuple(v.shape) != tuple(like.shape):
        raise Violation(f"out/v: shape {tuple(v.shape)} for {what} but the contract requires {tuple(like.shape)}")
    return v.detach()


def _packed_solution(ctx: PropertyContext, p: PackedSolve) -> torch.Tensor:
    def run():
        return _expect(ctx.call(p.inputs, _kwargs(ctx, p))["v"], p.inputs["o"], f"the packed call ({p.describe()})")
    return ctx.memoized(("la-solve-v/varlen", "call"), run)


def _systems(ctx: PropertyContext, p: PackedSolve) -> list[DenseSystem]:
    """The float64 dense system of every sequence (see :func:`~iqa_verify.properties.la_inverse.checks.analyse`)."""
    def run():
        f64 = lambda x: x.detach().to("cpu", F64) if x is not None else None  # noqa: E731
        return [analyse(Unknown.V, {n: f64(t) for n, t in p.sequence(i).items()}, ctx.case.kwargs["scale"])
                for i, _, _ in p.spans()]
    return ctx.memoized(("la-solve-v/varlen", "systems"), run)


def _varlen_backward_error(ctx: PropertyContext) -> None:
    p = _require_varlen(ctx)
    x = _packed_solution(ctx, p)
    checks: list[TensorCheck] = []
    for (i, a, b), sys_ in zip(p.spans(), _systems(ctx, p)):
        checks += backward_error_checks(f"out/v[seq {i}: {a}:{b}]", f"normal-residual[seq {i}: {a}:{b}]",
                                        x[:, a:b].cpu(), sys_, ctx.case.dtype)
    ctx.require(checks, f"packed batch ({p.describe()}): normal-equation residual of a sequence's own system too"
                        " large, so it is not that sequence's least-squares solution (state not restarted, wrong"
                        " initial state?)")


def _varlen_minimum_norm(ctx: PropertyContext) -> None:
    p = _require_varlen(ctx)
    x = _packed_solution(ctx, p)
    checks: list[TensorCheck] = []
    for (i, a, b), sys_ in zip(p.spans(), _systems(ctx, p)):
        checks += forward_error_checks(f"out/v[seq {i}: {a}:{b}]", x[:, a:b].cpu(), sys_.x_ref, sys_, ctx.case.dtype,
                                       "packed kernel against the sequence's float64 minimum-norm solution", True)
    ctx.require(checks, f"packed batch ({p.describe()}) is not the per-sequence minimum-norm least-squares solution")


def _varlen_one_by_one(ctx: PropertyContext) -> None:
    p = _require_varlen(ctx)
    x = _packed_solution(ctx, p)
    checks: list[TensorCheck] = []
    for (i, a, b), sys_ in zip(p.spans(), _systems(ctx, p)):
        xi = p.sequence(i)
        alone = _expect(ctx.call(xi, dict(ctx.case.kwargs))["v"], xi["o"], f"sequence {i} alone")
        checks += forward_error_checks(f"out/v[seq {i}: {a}:{b}]", x[:, a:b].cpu(), alone.cpu().to(F64), sys_,
                                       ctx.case.dtype, "packed call against the sequence solved alone (a plain call)",
                                       False)
    ctx.require(checks, f"the packed call ({p.describe()}) differs from its sequences solved one by one")


def _reference_grads(xi: dict[str, torch.Tensor | None], cot: torch.Tensor, scale: float, upcast: bool, baseline):
    """Gradients of <cot, v> by input name, of the float64 reference (upcast) or of the family's baseline."""
    inputs = {n: (t.detach().to("cpu", F64) if upcast else t.detach()) if t is not None else None for n, t in xi.items()}
    names = [n for n, t in inputs.items() if t is not None]
    leaves = [inputs[n].requires_grad_() for n in names]
    with torch.enable_grad():
        v = la_solve_v_dense_ref(*inputs.values(), scale=scale) if upcast else baseline(inputs, {"scale": scale})["v"]
        grads = torch.autograd.grad(v, leaves, cot.to(v.dtype).to(v.device), allow_unused=True)
    return dict(zip(names, grads))


def _varlen_gradients(ctx: PropertyContext) -> None:
    p = _require_varlen(ctx)
    case = ctx.case
    scale, dtype = case.kwargs["scale"], case.dtype
    gen = torch.Generator().manual_seed(int(case.spec.seed) + 7919)
    cot = torch.randn(tuple(p.inputs["o"].shape), generator=gen, dtype=F64)
    got = ctx.forward_backward({"v": cot.to(device=case.device, dtype=dtype)}, p.inputs, _kwargs(ctx, p), poisoned=True)
    _expect(got.outputs["v"], p.inputs["o"], f"the packed call ({p.describe()})")

    def grad(n: str) -> torch.Tensor:
        t = got.grads.get(n)
        return (t if t is not None else torch.zeros_like(p.inputs[n])).detach().cpu().to(F64)

    tol, nat_tol = tolerance(Kind.GRAD, dtype), tolerance(Kind.NATURAL_SCALE, dtype)
    checks: list[TensorCheck] = []
    skipped: list[str] = []
    siblings = 0.0
    for (i, a, b), sys_ in zip(p.spans(), _systems(ctx, p)):
        B, H = sys_.rank.shape
        if not all(sys_.smooth((bb, h), dtype) for bb in range(B) for h in range(H)):
            skipped.append(f"seq {i}")
            continue
        xi = p.sequence(i)
        ref = _reference_grads(xi, cot[:, a:b], scale, True, None)
        base = _reference_grads(xi, cot[:, a:b], scale, False, ctx.family.baseline)
        kappa = float(sys_.kappa.max())
        widen = max(1.0, kappa * kappa * tolerance(Kind.FORWARD_ERROR, dtype).atol / tol.atol)
        f = {n: t.detach().to("cpu", F64) if t is not None else None for n, t in xi.items()}
        natural = merge_natural({"g": dg_natural_scale(f["q"], f["k"], sys_.x_ref, f["g"], f["initial_state"], ref["o"],
                                                       None, scale=scale, extra=kappa)},
                                solution_rounding_natural(sys_, f, ref["o"], scale, dtype))
        for n, r in ref.items():
            siblings = max(siblings, float(r.abs().max()))
            g = grad(n)[i:i + 1] if n == "initial_state" else grad(n)[:, a:b]
            path = f"grad/dinitial_state[{i}]" if n == "initial_state" else f"grad/d{n}[seq {i}: {a}:{b}]"
            c = compare(path, g, r, tol, dtype=dtype, baseline=base.get(n), scale=widen * float(r.abs().max()),
                        natural=natural.get(n), natural_tol=nat_tol)
            checks.append(c)
    if skipped:
        checks.append(TensorCheck(path="grad/*[not smooth]", passed=True, ratio=0.0,
                                  note="not demanded: rank deficient or ill-conditioned systems (the pseudo-inverse is"
                                       " not smooth) in " + ", ".join(skipped)))
    if p.pad:
        end = p.end
        if not siblings:  # no sequence judged: the kernel's own real gradients set the scale of a leak
            siblings = max(float(grad(n)[:, :end].abs().max()) for n in _NAMES)
        for n in _NAMES:
            g = grad(n)[:, end:]
            checks.append(compare(f"grad/d{n}[:, cu[N]:] (padding)", g, torch.zeros_like(g), tol, dtype=dtype,
                                  scale=max(siblings, torch.finfo(dtype).tiny)))
    ctx.require(checks, f"packed batch ({p.describe()}) gradients differ from the per-sequence float64 reference"
                        " (at padding they must be 0; the packed run had NaN-filled torch.empty*, so NaN there means"
                        " never written)")


def varlen_solve_properties(family: str) -> tuple[Property, ...]:
    """``varlen-backward-error``, ``varlen-minimum-norm``, ``varlen-gradients`` and ``varlen-one-by-one``."""
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=fn, catches=catches)

    return (
        p("varlen-backward-error", "packed batches (cu_seqlens): each sequence's answer solves its own system"
          " (normal-equation residual at rounding level)", _varlen_backward_error,
          "state carried across a sequence boundary, every sequence from initial_state[0], wrong offsets"),
        p("varlen-minimum-norm", "packed batches: each sequence's answer is its float64 minimum-norm solution"
          " (where kappa is moderate)", _varlen_minimum_norm, "per-sequence answers that are not minimum-norm"),
        p("varlen-gradients", "packed batches: gradients equal the per-sequence reference's where smooth, zero at"
          " padding", _varlen_gradients, "padding continuing the last sequence (gradients flow from padding),"
          " states mixed in the backward"),
        p("varlen-one-by-one", "a packed batch equals its sequences solved one by one, padding changes nothing",
          _varlen_one_by_one, "pack offsets, chunk grids of the whole pack, padding leaking into sequences"),
    )

