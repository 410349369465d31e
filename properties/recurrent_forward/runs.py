"""Two runs of one kernel that must agree: the helpers the reference-free and packed-batch properties share.

Every kernel call goes through ``ctx.call`` or :func:`iqa_verify.properties.generic.run_forward_backward`; a
run's outputs and gradients are copied at once (a later call must not be able to change what an earlier one
returned). :func:`check_runs` judges one tensor of one run against the other under ``Kind.METAMORPHIC`` (or
``METAMORPHIC_GRAD``) in units of a magnitude bound of the family (:class:`~.form.RecurrentForward`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.family import PropertyContext, Violation
from iqa_verify.properties.generic import ForwardBackward, cotangents_for, run_forward_backward
from iqa_verify.properties.recurrent_forward.form import Far, Inputs, RecurrentForward
from iqa_verify.tolerances import Kind, tolerance

__all__ = ["case_seed", "check_runs", "copied_run", "cotangents", "expect_shapes", "far_amplitude", "far_from",
           "grad_or_zeros", "sizes"]


def sizes(inputs: Mapping[str, torch.Tensor | None]) -> tuple[int, int, int, int, int]:
    """(B, T, H, D, E) read from q [B, T, H, D] and v [B, T, H, E]."""
    B, T, H, D = inputs["q"].shape
    return B, T, H, D, inputs["v"].shape[-1]


def cotangents(ctx: PropertyContext, inputs: Mapping[str, torch.Tensor | None], states: int | None = None
               ) -> dict[str, torch.Tensor]:
    """The case's kind of cotangents (seeded, in the spec's layout) for o [B, T, H, E] and final_state
    [states, H, D, E] (``states`` defaults to B; a packed call has one state per sequence)."""
    B, T, H, D, E = sizes(inputs)
    shapes = {"o": torch.zeros(B, T, H, E), "final_state": torch.zeros(B if states is None else states, H, D, E)}
    return cotangents_for(ctx.case, shapes)


def expect_shapes(outs: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor | None], what: str,
                  states: int | None = None) -> None:
    """A Violation naming every output whose shape breaks the contract for ``inputs``."""
    B, T, H, D, E = sizes(inputs)
    want = {"o": (B, T, H, E), "final_state": (B if states is None else states, H, D, E)}
    bad = [f"out/{n}: shape {tuple(outs[n].shape)}, the contract requires {s}" for n, s in want.items()
           if tuple(outs[n].shape) != s]
    if bad:
        raise Violation(f"{what}: outputs break the contract:\n  " + "\n  ".join(bad))


def copied_run(ctx: PropertyContext, inputs: Inputs, cots: Mapping[str, torch.Tensor],
               kwargs: Mapping[str, object] | None = None, *, poisoned: bool = False) -> ForwardBackward:
    """Forward and backward of <cots, outputs> on ``inputs`` (``kwargs``: the case's by default), copied;
    ``poisoned``: with NaN-filled torch.empty* allocations."""
    res = run_forward_backward(ctx, dict(cots), inputs=inputs, kwargs=kwargs, poisoned=poisoned)
    return ForwardBackward({n: t.detach().clone() for n, t in res.outputs.items()},
                           {n: (t.detach().clone() if t is not None else None) for n, t in res.grads.items()})


def grad_or_zeros(fb: ForwardBackward, name: str, like: torch.Tensor | None) -> torch.Tensor | None:
    """The run's gradient for ``name``, or float64 zeros shaped like the input where autograd gave None."""
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


def _far_values(kind: Far, x: torch.Tensor, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    f64 = torch.float64
    if kind is Far.LOG_GATE:
        return -(20.0 + 40.0 * torch.rand(shape, generator=gen, dtype=f64))
    if kind is Far.UNIT_INTERVAL:
        return torch.rand(shape, generator=gen, dtype=f64)
    if kind is Far.UNIT_ROWS:
        rows = torch.randn(shape, generator=gen, dtype=f64)
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return far_amplitude(x, shape) * torch.randn(shape, generator=gen, dtype=f64)


def far_amplitude(x: torch.Tensor, shape: torch.Size) -> float:
    """10x the largest |entry| of ``x`` (at least 1e-3), capped where the dtype's range ends: a kernel that
    rounds its products' operands to the input dtype (tensor cores) forms q·k, the state and o from the far
    values, so with ``n = shape[1] * shape[-1]`` (the far positions times the dimension summed) the cap keeps
    ``n amp^3`` 512x inside the largest finite value. It binds in float16 only (max 65504; 2.3 at n = 10):
    unbounded far values there overflowed a tensor-core kernel's fp16 attention matrix, and ``inf * 0`` put NaN in
    gradients the properties require to be 0 (issue #14); bf16, float32 and float64 are left at 10x."""
    amp = 10.0 * max(float(x.detach().abs().max()), 1e-3) if x.numel() else 1.0
    n = max(1, shape[1] * shape[-1])
    return min(amp, (torch.finfo(x.dtype).max / n) ** (1.0 / 3.0) / 8.0)


def far_from(form: RecurrentForward, like: Inputs, start: int, gen: torch.Generator) -> Inputs:
    """``like`` with every time input replaced, at positions >= start, by values far from the case's (drawn as
    ``form.far`` says, in the order of ``form.time_inputs``); absent inputs stay None, the rest is unchanged."""
    out: Inputs = dict(like)
    for n in form.time_inputs:
        x = like[n]
        if x is None:
            continue
        new = _far_values(form.far[n], x, x[:, start:].shape, gen)
        out[n] = torch.cat([x[:, :start].detach(), new.to(device=x.device, dtype=x.dtype)], dim=1)
    return out


def case_seed(ctx: PropertyContext) -> int:
    return int(getattr(ctx.case.spec, "seed", 0))
