"""Reference-free properties of ``la-forward`` (SPEC.md §6): two runs of the kernel that must agree.

ids ``la-forward/<name>``:

- ``state-handoff``: running [0, P) and then [P, T) from the returned final state equals running [0, T):
  outputs, final state, and gradients (the second run's initial-state gradient is the first run's
  final-state cotangent). P alternates between a chunk boundary (a multiple of 64, or 16 for short T)
  and a point off every boundary.
- ``causality``: replacing the inputs at positions >= P (large values, strong gates) changes no output at
  positions < P; with cotangents only on outputs < P, gradients at positions < P do not change and
  gradients at positions >= P are zero.
- ``sequence-independence``: in a batch with a neighbour whose inputs are far from the others' (large
  values, strong gates), every sequence's outputs and gradients equal those of the sequence run alone.

They need no float64 reference, so they run at the spec's ``free_T`` when it is set (sequence independence
at the shorter of T and free_T) (lengths where the
reference is slow: dev and thorough draw up to 4k and 16k). None may demand bitwise equality: a correct
chunked kernel computes the two runs in different orders (chunk boundaries move, the decay form is chosen
per call). The allowance is ``Kind.METAMORPHIC`` (``METAMORPHIC_GRAD``) of the tolerance table in units of
the magnitude bounds of :func:`magnitude_bounds`.

Every kernel call goes through ``ctx.call`` or :func:`iqa_verify.properties.generic.run_forward_backward`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import Property, PropertyContext, Violation
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.generic import ForwardBackward, cotangents_for, run_forward_backward
from iqa_verify.properties.la_forward.cases import build_la_inputs

__all__ = ["check_runs", "far_from", "free_inputs", "grad_or_zeros", "magnitude_bounds", "metamorphic_properties"]

Inputs = dict[str, torch.Tensor | None]
_SEQ = ("q", "k", "v", "g")  # inputs with a time axis (dim 1)
_GRAD_NAMES = ("q", "k", "v", "g", "initial_state")


# ------------------------------------------------------------------------------------------ bounds


def magnitude_bounds(inputs: Inputs, scale: float, cots: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Bounds on |every term| the outputs (and gradients) are sums of, from the inputs' magnitudes alone.

    Per batch and head, with ``a_t = ‖k_t‖∞ ‖v_t‖∞`` and ``lambda_t = exp(g_t) <= 1``::

        m_0 = max|S_0|,  m_t = lambda_t m_{t-1} + a_t        (|S_t[d, e]| <= m_t)
        |o_t[e]| <= |scale| ‖q_t‖_1 m_t =: bound o           |S_T| <= m_T =: bound final_state

    and with the cotangents do, dS_T (the adjoint ``dS_t`` of the state)::

        n_{T+1} = max|dS_T|,  n_t = |scale| ‖q_t‖∞ ‖do_t‖∞ + lambda_{t+1} n_{t+1}   (|dS_t[d, e]| <= n_t)
        |dq_t| <= |scale| m_t ‖do_t‖_1    |dk_t| <= n_t ‖v_t‖_1    |dv_t| <= n_t ‖k_t‖_1    |dS_0| <= n_1
        |dg_t| <= D E m_{t-1} n_t  and  <= sum_s (‖q_s‖_1 |dq_s| + ‖k_s‖_1 |dk_s|) (the identity
        dg_t = sum_{s >= t} (q_s . dq_s - k_s . dk_s) standard kernels use; the larger of the two)

    Each bound is the max over batch, heads and time, as a float. Any summation order of those terms has a
    rounding error within n eps of the bound, which is what ``Kind.METAMORPHIC`` allows (64 eps).

    Every bound is then multiplied by ``1 + max|b| / 64``, ``b = cumsum(g)`` within each sequence: a kernel
    that takes ``exp(b_i - b_j)`` from a cumulative sum in its accumulation dtype (a standard algorithm,
    SPEC §5) has an exponent error of eps |b_i|, a relative error of each term that 64 eps alone would not
    admit once the cumulative log-decay passes 64 nats (strong decay over long sequences).
    """
    f64 = torch.float64
    q, k, v, g = (inputs[n].detach().to(f64) for n in _SEQ)
    B, T, H, D = q.shape
    E = v.shape[-1]
    s0 = inputs.get("initial_state")
    m = s0.detach().to(f64).abs().amax((-2, -1)) if s0 is not None else q.new_zeros(B, H)
    lam = torch.exp(g)  # [B, T, H]
    a = k.abs().amax(-1) * v.abs().amax(-1)  # [B, T, H]
    ms = []
    for t in range(T):
        m = lam[:, t] * m + a[:, t]
        ms.append(m)
    m_all = torch.stack(ms, 1)  # [B, T, H]: bound on |S_t|
    sc = abs(float(scale))
    q1, k1, v1 = q.abs().sum(-1), k.abs().sum(-1), v.abs().sum(-1)
    widen = 1.0 + float(g.cumsum(1).abs().max()) / 64.0
    out = {"o": widen * float((sc * q1 * m_all).max()), "final_state": widen * float(m_all[:, -1].max())}
    if cots is None:
        return out
    do = cots["o"].detach().to(f64)
    n = cots["final_state"].detach().to(f64).abs().amax((-2, -1))  # [B, H]
    qdo = sc * q.abs().amax(-1) * do.abs().amax(-1)  # [B, T, H]
    ns = [None] * T
    for t in range(T - 1, -1, -1):
        n = qdo[:, t] + (lam[:, t + 1] * n if t + 1 < T else n)
        ns[t] = n
    n_all = torch.stack(ns, 1)  # [B, T, H]: bound on |dS_t|
    dq = sc * m_all * do.abs().sum(-1)
    dk, dv = n_all * v1, n_all * k1
    m_prev = torch.cat([(s0.detach().to(f64).abs().amax((-2, -1)) if s0 is not None else q.new_zeros(B, H))[:, None],
                        m_all[:, :-1]], 1)
    dg_direct = D * E * m_prev * n_all
    dg_identity = (q1 * dq + k1 * dk).sum(1)  # [B, H]
    out.update(q=widen * float(dq.max()), k=widen * float(dk.max()), v=widen * float(dv.max()),
               g=widen * max(float(dg_direct.max()), float(dg_identity.max())), initial_state=widen * float(n_all[:, 0].max()))
    return out


# ------------------------------------------------------------------------------------------ helpers


def free_inputs(ctx: PropertyContext) -> Inputs:
    """The case's inputs, or the same spec's inputs at length ``free_T`` when it is set."""
    spec = ctx.case.spec
    if getattr(spec, "free_T", 0) and spec.free_T != spec.T:
        return build_la_inputs(replace(spec, T=spec.free_T), ctx.case.dtype, ctx.case.device)
    return dict(ctx.case.inputs)


def _cots(ctx: PropertyContext, inputs: Inputs) -> dict[str, torch.Tensor]:
    B, T, H, D = inputs["q"].shape
    E = inputs["v"].shape[-1]
    shapes = {"o": torch.zeros(B, T, H, E), "final_state": torch.zeros(B, H, D, E)}
    return cotangents_for(ctx.case, shapes)


def _expect_shapes(outs: dict[str, torch.Tensor], inputs: Inputs, what: str) -> None:
    B, T, H, D = inputs["q"].shape
    E = inputs["v"].shape[-1]
    want = {"o": (B, T, H, E), "final_state": (B, H, D, E)}
    bad = [f"out/{n}: shape {tuple(outs[n].shape)}, the contract requires {s}" for n, s in want.items()
           if tuple(outs[n].shape) != s]
    if bad:
        raise Violation(f"{what}: outputs break the contract:\n  " + "\n  ".join(bad))


def _time(x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if x is None else x[:, start:stop]


def _slice_inputs(inputs: Inputs, start: int, stop: int, initial_state: torch.Tensor | None) -> Inputs:
    out: Inputs = {n: _time(inputs[n], start, stop) for n in _SEQ}
    out["initial_state"] = initial_state
    return out


def _run(ctx: PropertyContext, inputs: Inputs, cots: dict[str, torch.Tensor], what: str) -> ForwardBackward:
    res = run_forward_backward(ctx, cots, inputs=inputs)
    _expect_shapes(res.outputs, inputs, what)
    # keep copies: a later call must not be able to change what an earlier one returned
    return ForwardBackward({n: t.detach().clone() for n, t in res.outputs.items()},
                           {n: (t.detach().clone() if t is not None else None) for n, t in res.grads.items()})


def grad_or_zeros(fb: ForwardBackward, name: str, like: torch.Tensor | None) -> torch.Tensor | None:
    g = fb.grads.get(name)
    if g is None and like is not None:
        return torch.zeros_like(like, dtype=torch.float64)
    return g


def check_runs(path: str, got: torch.Tensor, want: torch.Tensor, kind: Kind, dtype: torch.dtype, bound: float,
               against: str) -> TensorCheck:
    """compare() with the magnitude bound as the atol scale; ``against`` names the run in the "reference" slot.

    The bound is floored so that the allowance is at least two ulps of the dtype's subnormal range: fp16
    results below 6.1e-5 are spaced 6e-8 apart whatever their size, and the two runs round each result (and
    a handed-over state) separately."""
    tol = tolerance(kind, dtype)
    finfo = torch.finfo(dtype)
    bound = max(bound, 2 * finfo.tiny * finfo.eps / tol.atol)
    check = compare(path, got, want.detach().to(torch.float64), tol, dtype=dtype, scale=bound)
    return replace(check, note=f"'reference' here is {against}; atol scale = the magnitude bound {bound:.3e}"
                   + (f"; {check.note}" if check.note else ""))


def _state_dtype_input(state: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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


def far_from(like: Inputs, start: int, gen: torch.Generator) -> Inputs:
    """Inputs far from the case's at time positions >= start: entries 10x the largest |entry| of q, k, v and
    strong gates g ~ -U(20, 60) (the state forgets within a step, exp(-60) is far below float32's eps)."""
    out: Inputs = {}
    for n in _SEQ:
        x = like[n]
        tail = x[:, start:]
        f64 = torch.float64
        if n == "g":
            new = -(20.0 + 40.0 * torch.rand(tail.shape, generator=gen, dtype=f64))
        else:
            amp = 10.0 * max(float(x.detach().abs().max()), 1e-3)
            new = amp * torch.randn(tail.shape, generator=gen, dtype=f64)
        out[n] = torch.cat([x[:, :start].detach(), new.to(device=x.device, dtype=x.dtype)], dim=1)
    out["initial_state"] = like["initial_state"]
    return out


def _gen(ctx: PropertyContext, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(getattr(ctx.case.spec, "seed", 0)) * 31 + salt)


# ------------------------------------------------------------------------------------------ properties


def _state_handoff(ctx: PropertyContext) -> None:
    x = free_inputs(ctx)
    T = x["q"].shape[1]
    on_boundary = int(getattr(ctx.case.spec, "seed", 0)) % 2 == 0
    P = _split_point(T, on_boundary)
    if P is None:
        return  # one step cannot be split; judged on every longer case
    cots = _cots(ctx, x)
    full = _run(ctx, x, cots, "one call on [0, T)")
    dtype = ctx.case.dtype
    with torch.no_grad():
        first_fwd = ctx.call(_slice_inputs(x, 0, P, x["initial_state"]))
    _expect_shapes(first_fwd, _slice_inputs(x, 0, P, None), f"the call on [0, {P})")
    handed = _state_dtype_input(first_fwd["final_state"], x["q"])
    second = _run(ctx, _slice_inputs(x, P, T, handed),
                  {"o": cots["o"][:, P:], "final_state": cots["final_state"]}, f"the call on [{P}, {T})")
    d_handed = grad_or_zeros(second, "initial_state", handed)
    first = _run(ctx, _slice_inputs(x, 0, P, x["initial_state"]),
                 {"o": cots["o"][:, :P], "final_state": d_handed.detach()}, f"the call on [0, {P})")
    bounds = magnitude_bounds(x, ctx.case.kwargs.get("scale", 1.0), cots)
    one_call = f"one call on [0, {T})"
    where = f"split at P={P} ({'on' if on_boundary else 'off'} a chunk boundary) of T={T}"
    checks = [
        check_runs("out/o", torch.cat([first.outputs["o"], second.outputs["o"]], 1), full.outputs["o"], Kind.METAMORPHIC, dtype, bounds["o"], one_call),
        check_runs("out/final_state", second.outputs["final_state"], full.outputs["final_state"], Kind.METAMORPHIC, dtype,
               bounds["final_state"], one_call),
    ]
    for n in _SEQ:
        got = torch.cat([grad_or_zeros(first, n, x[n][:, :P]), grad_or_zeros(second, n, x[n][:, P:])], 1)
        checks.append(check_runs(f"grad/d{n}", got, grad_or_zeros(full, n, x[n]), Kind.METAMORPHIC_GRAD, dtype, bounds[n], one_call))
    if x["initial_state"] is not None:
        checks.append(check_runs("grad/dinitial_state", grad_or_zeros(first, "initial_state", x["initial_state"]),
                             grad_or_zeros(full, "initial_state", x["initial_state"]), Kind.METAMORPHIC_GRAD, dtype,
                             bounds["initial_state"], one_call))
    ctx.require(checks, f"running [0, P) then [P, T) from the returned state differs from one call ({where})")


def _causality(ctx: PropertyContext) -> None:
    x = free_inputs(ctx)
    T = x["q"].shape[1]
    P = _split_point(T, on_boundary=False)
    if P is None:
        return
    y = far_from(x, P, _gen(ctx, 1))
    cots = _cots(ctx, x)
    # cotangents on outputs before P only: then nothing at or after P may receive a gradient
    do = cots["o"].clone()
    do[:, P:] = 0
    past = {"o": do, "final_state": torch.zeros_like(cots["final_state"])}
    a = _run(ctx, x, past, "the case's inputs")
    b = _run(ctx, y, past, f"inputs at positions >= {P} replaced")
    dtype, scale = ctx.case.dtype, ctx.case.kwargs.get("scale", 1.0)
    ba, bb = magnitude_bounds(x, scale, past), magnitude_bounds(y, scale, past)
    bound = {n: max(ba[n], bb[n]) for n in ba}
    orig, zero = "the run on the case's own inputs", "zero (nothing at or after P may receive gradient)"
    checks = [check_runs("out/o[:, :P]", b.outputs["o"][:, :P], a.outputs["o"][:, :P], Kind.METAMORPHIC, dtype, bound["o"], orig)]
    for n in _SEQ:
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


def _with_far_neighbour(x: Inputs, gen: torch.Generator) -> Inputs:
    """x with one more sequence appended to the batch: sequence 0's shapes, every entry far from the others."""
    far = far_from({n: (t[:1] if t is not None else None) for n, t in x.items()}, 0, gen)
    out: Inputs = {n: torch.cat([x[n].detach(), far[n]], 0) for n in _SEQ}
    s0 = x["initial_state"]
    if s0 is not None:
        amp = 10.0 * max(float(s0.detach().abs().max()), 1e-3)
        extra = (amp * torch.randn(s0[:1].shape, generator=gen, dtype=torch.float64)).to(s0.device, s0.dtype)
        out["initial_state"] = torch.cat([s0.detach(), extra], 0)
    else:
        out["initial_state"] = None
    return out


def _sequence_independence(ctx: PropertyContext) -> None:
    """Three runs whatever B: the case's batch with a far neighbour appended, the far neighbour alone, and the
    case's batch alone; each sequence of the first is judged against the run without the others' kind of
    neighbour. At the shorter of T and free_T: the neighbour's effect shows at any length."""
    spec = ctx.case.spec
    short = min(spec.T, spec.free_T) if getattr(spec, "free_T", 0) else spec.T
    x = dict(ctx.case.inputs) if short == spec.T else build_la_inputs(replace(spec, T=short), ctx.case.dtype, ctx.case.device)
    xb = _with_far_neighbour(x, _gen(ctx, 2))
    B = xb["q"].shape[0]
    cots = _cots(ctx, xb)
    together = _run(ctx, xb, cots, f"a batch of {B}")
    dtype, scale = ctx.case.dtype, ctx.case.kwargs.get("scale", 1.0)
    checks = []
    for rows, tag, what in ((slice(B - 1, B), f"[{B - 1}] (far neighbour)", "the far neighbour run alone"),
                            (slice(0, B - 1), f"[:{B - 1}]", "the case's batch run without the far neighbour")):
        xs = {n: (t[rows] if t is not None else None) for n, t in xb.items()}
        cs = {n: c[rows] for n, c in cots.items()}
        alone = _run(ctx, xs, cs, what)
        bound = magnitude_bounds(xs, scale, cs)
        for n in ("o", "final_state"):
            checks.append(check_runs(f"out/{n}{tag}", together.outputs[n][rows], alone.outputs[n], Kind.METAMORPHIC, dtype,
                                 bound[n], what))
        for n in _GRAD_NAMES:
            if xs[n] is None:
                continue
            checks.append(check_runs(f"grad/d{n}{tag}", grad_or_zeros(together, n, xb[n])[rows], grad_or_zeros(alone, n, xs[n]),
                                 Kind.METAMORPHIC_GRAD, dtype, bound[n], what))
    ctx.require(checks, f"a sequence's results depend on its neighbours: in a batch of {B} (the last one far from the"
                        " others: 10x the values, strong gates) they differ from the runs without that neighbour")


def metamorphic_properties(family: str) -> tuple[Property, ...]:
    def p(name: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{family}/{name}", title=title, check=fn, catches=catches)

    return (
        p("state-handoff", "[0, P) then [P, T) from the returned state equals one call, values and gradients",
          _state_handoff, "prefill-to-decode hand-off, chunk offsets and ragged chunks at lengths past the reference's"),
        p("causality", "inputs at positions >= P change no output or gradient before P", _causality,
          "later gates or keys changing earlier outputs (a decay form chosen from part of a chunk), backward leaks"),
        p("sequence-independence", "each sequence of a batch equals the sequence run alone, beside a far neighbour",
          _sequence_independence, "batch-wide decisions and statistics, sequences mixed through shared scratch"),
    )
