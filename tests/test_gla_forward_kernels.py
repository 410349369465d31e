"""The built-in gla-forward kernels beyond the properties: both gate forms of the chunked kernel against
the recurrent one in float64 (values and every gradient), ragged chunks, output dtypes, argument checks."""

from __future__ import annotations

import pytest
import torch

import iqa_verify.kernels.gla_forward_chunked as chunked_module
from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.kernels.gla_forward_chunked import GateForm, chunk_plan, gate_form, gla_forward_chunked
from iqa_verify.kernels.gla_forward_recurrent import gla_forward_recurrent
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.gla_forward.cases import Gate, GLACase, build_gla_inputs

F64 = torch.float64


def _values_and_grads(fn, inputs: dict, cots, **kwargs) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    o, S = fn(*[leaves.get(n) for n in inputs], **kwargs)
    grads = torch.autograd.grad([o, S], list(leaves.values()), [c.to(o.dtype) for c in cots])
    return {"out/o": o.detach(), "out/final_state": S.detach()} | {f"grad/d{n}": g for n, g in zip(leaves, grads)}


def _cots(spec: GLACase, gen: torch.Generator):
    return (torch.randn(spec.B, spec.T, spec.H, spec.E, generator=gen, dtype=F64),
            torch.randn(spec.B, spec.H, spec.D, spec.E, generator=gen, dtype=F64))


_MODERATE = [(1, 64, Gate.MILD), (37, 8, Gate.MILD), (45, 64, Gate.PARTIAL_ZERO), (33, 16, Gate.ZERO)]
_STRONG = [(64, 16, Gate.STRONG), (70, 16, Gate.UNDERFLOW_SOME)]  # beyond the factored form's span limit


@pytest.mark.parametrize(("form", "T", "chunk_size", "gate"),
                         [(GateForm.FACTORED, *c) for c in _MODERATE] + [(GateForm.MASKED, *c) for c in _MODERATE + _STRONG])
def test_each_gate_form_forced_matches_recurrent(form: GateForm, T: int, chunk_size: int, gate: Gate,
                                                 gen: torch.Generator, monkeypatch) -> None:
    monkeypatch.setattr(chunked_module, "gate_form", lambda g, c: form)
    spec = GLACase(B=2, T=T, H=2, D=5, E=3, gate=gate, initial_state=True, scale=0.5, seed=T)
    inputs = build_gla_inputs(spec, F64, torch.device("cpu"))
    cots = _cots(spec, gen)
    want = _values_and_grads(gla_forward_recurrent, inputs, cots, scale=0.5)
    got = _values_and_grads(gla_forward_chunked, inputs, cots, scale=0.5, chunk_size=chunk_size)
    checks = [compare(p, got[p], want[p], tolerance(Kind.REFERENCE, F64), dtype=F64) for p in want]
    assert all(c.passed for c in checks), "\n".join(c.describe() for c in checks if not c.passed)


def test_gate_form_switches_on_one_strongly_gated_dimension() -> None:
    g = torch.full((1, 64, 1, 4), -0.01)
    assert gate_form(g, 64) is GateForm.FACTORED
    g[..., 2] = -1.0  # one dimension: 64 nats over the chunk, beyond float32's limit (29.6)
    assert gate_form(g, 64) is GateForm.MASKED


def test_strong_gates_halve_the_chunk_before_falling_back_to_the_masked_form() -> None:
    g = torch.full((1, 128, 1, 4), -1.0)  # 64 nats per 64-step chunk, 16 per 16-step chunk (float32 limit 29.6)
    assert chunk_plan(g, 64) == (GateForm.FACTORED, 16)
    g[:, 5, :, 1] = -40.0  # one step beyond the limit on its own: no chunk of 16 or more is factored
    assert chunk_plan(g, 64) == (GateForm.MASKED, 16)


@pytest.mark.parametrize("kernel", [gla_forward_recurrent, gla_forward_chunked])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_output_dtypes(kernel, dtype: torch.dtype) -> None:
    inputs = build_gla_inputs(GLACase(B=1, T=20, H=1, D=3, E=2, initial_state=True), dtype, torch.device("cpu"))
    o, S = kernel(*inputs.values())
    assert o.dtype == dtype and S.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)


def test_double_backward_raises_instead_of_being_silently_wrong() -> None:
    inputs = build_gla_inputs(GLACase(B=1, T=9, H=1, D=3, E=2), F64, torch.device("cpu"))
    q = inputs["q"].clone().requires_grad_()
    o, _ = gla_forward_chunked(q, *list(inputs.values())[1:])
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), q)


@pytest.mark.parametrize("chunk_size", [0, 2.5, True])
def test_bad_chunk_size_is_rejected(chunk_size) -> None:
    inputs = build_gla_inputs(GLACase(B=1, T=4, H=1, D=2, E=2), F64, torch.device("cpu"))
    with pytest.raises(IqaVerifyError, match="chunk_size"):
        gla_forward_chunked(*inputs.values(), chunk_size=chunk_size)


@pytest.mark.parametrize("kernel", [gla_forward_recurrent, gla_forward_chunked])
def test_scalar_gate_is_rejected_naming_g(kernel) -> None:
    inputs = build_gla_inputs(GLACase(B=1, T=4, H=1, D=2, E=2), F64, torch.device("cpu"))
    with pytest.raises(IqaVerifyError, match=r"g.shape=\(1, 4, 1\)"):
        kernel(inputs["q"], inputs["k"], inputs["v"], inputs["g"][..., 0])


def test_factored_form_near_its_span_limit_is_as_accurate_as_recurrent_float32(gen: torch.Generator) -> None:
    """Gates of 29 nats per 16 steps (limit 29.6 in float32): Q is scaled by up to e^29 and K down to e^-29."""
    B, T, H, D, E = 1, 96, 2, 4, 3
    x = {"q": torch.randn(B, T, H, D, generator=gen, dtype=F64), "k": torch.randn(B, T, H, D, generator=gen, dtype=F64),
         "v": torch.randn(B, T, H, E, generator=gen, dtype=F64),
         "g": -(29.0 / 16) * (0.9 + 0.1 * torch.rand(B, T, H, D, generator=gen, dtype=F64)),
         "initial_state": torch.randn(B, H, D, E, generator=gen, dtype=F64)}
    assert chunk_plan(x["g"].float(), 64) == (GateForm.FACTORED, 16)
    cots = (torch.randn(B, T, H, E, generator=gen, dtype=F64), torch.randn(B, H, D, E, generator=gen, dtype=F64))
    want = _values_and_grads(gla_forward_recurrent, x, cots)
    x32 = {n: t.float() for n, t in x.items()}
    base = _values_and_grads(gla_forward_recurrent, x32, cots)
    got = _values_and_grads(gla_forward_chunked, x32, cots)
    kinds = {p: Kind.VALUE if p.startswith("out/") else Kind.GRAD for p in want}
    checks = [compare(p, got[p], want[p], tolerance(kinds[p], torch.float32), dtype=torch.float32, baseline=base[p])
              for p in want]
    assert all(c.passed for c in checks), "\n".join(c.describe() for c in checks if not c.passed)


def test_a_gate_of_minus_infinity_resets_the_state_without_nan() -> None:
    """g = -inf in one dimension (a full reset of that state row): finite, equal to the reference, g untouched."""
    x = build_gla_inputs(GLACase(B=1, T=64, H=1, D=3, E=2, initial_state=True, seed=9), torch.float32, torch.device("cpu"))
    g = x["g"].clone()
    g[0, 7, 0, 1] = -float("inf")
    before = g.clone()
    o, S = gla_forward_chunked(x["q"], x["k"], x["v"], g, x["initial_state"])
    want_o, want_S = gla_forward_recurrent(x["q"].double(), x["k"].double(), x["v"].double(), g.double(),
                                           x["initial_state"].double())
    assert torch.equal(g, before)
    assert compare("out/o", o, want_o, tolerance(Kind.VALUE, torch.float32), dtype=torch.float32).passed
    assert compare("out/final_state", S, want_S, tolerance(Kind.VALUE, torch.float32), dtype=torch.float32).passed
