"""The built-in delta-forward kernels beyond the properties: the chunked WY / UT kernel against the recurrent
one in float64 (values and every gradient) over chunk sizes, ragged chunks, regimes and g None; output dtypes;
argument checks."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.kernels.delta_forward_chunked import delta_forward_chunked
from iqa_verify.kernels.delta_forward_recurrent import delta_forward_recurrent
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.delta_forward.cases import Beta, DeltaCase, Decay, Keys, build_delta_inputs

F64 = torch.float64
CPU = torch.device("cpu")


def _values_and_grads(fn, inputs: dict, cots, **kwargs) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    o, S = fn(*[leaves.get(n) for n in inputs], **kwargs)
    grads = torch.autograd.grad([o, S], list(leaves.values()), [c.to(o.dtype) for c in cots])
    return {"out/o": o.detach(), "out/final_state": S.detach()} | {f"grad/d{n}": g for n, g in zip(leaves, grads)}


@pytest.mark.parametrize(("T", "chunk_size", "spec_kwargs"), [
    (1, 64, {}),
    (37, 8, {"decay": Decay.MILD}),
    (64, 16, {"decay": Decay.STRONG, "keys": Keys.SMALL}),
    (70, 16, {"decay": Decay.UNDERFLOW, "beta": Beta.MIXED}),
    (45, 64, {"beta": Beta.ONE}),
    (33, 5, {"beta": Beta.ZERO, "decay": Decay.ZERO, "keys": Keys.SMALL}),
], ids=["T1", "ragged-mild", "strong-small-keys", "underflow-mixed-beta", "beta-one-no-decay", "beta-zero"])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_recurrent(T: int, chunk_size: int, spec_kwargs: dict, with_state: bool, gen: torch.Generator) -> None:
    spec = DeltaCase(B=2, T=T, H=2, D=5, E=3, initial_state=with_state, scale=0.5, seed=T, **spec_kwargs)
    inputs = build_delta_inputs(spec, F64, CPU)
    cots = (torch.randn(2, T, 2, 3, generator=gen, dtype=F64), torch.randn(2, 2, 5, 3, generator=gen, dtype=F64))
    want = _values_and_grads(delta_forward_recurrent, inputs, cots, scale=0.5)
    got = _values_and_grads(delta_forward_chunked, inputs, cots, scale=0.5, chunk_size=chunk_size)
    checks = [compare(p, got[p], want[p], tolerance(Kind.REFERENCE, F64), dtype=F64) for p in want]
    assert all(c.passed for c in checks), "\n".join(c.describe() for c in checks if not c.passed)


@pytest.mark.parametrize("kernel", [delta_forward_recurrent, delta_forward_chunked])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_output_dtypes(kernel, dtype: torch.dtype) -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=20, H=1, D=3, E=2, decay=Decay.MILD, initial_state=True), dtype, CPU)
    o, S = kernel(*x.values())
    assert o.dtype == dtype and S.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)


def test_double_backward_raises_instead_of_being_silently_wrong() -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=9, H=1, D=3, E=2), F64, CPU)
    q = x["q"].clone().requires_grad_()
    o, _ = delta_forward_chunked(q, *list(x.values())[1:])
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), q)


@pytest.mark.parametrize("chunk_size", [0, 2.5, True])
def test_bad_chunk_size_is_rejected(chunk_size) -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=4, H=1, D=2, E=2), F64, CPU)
    with pytest.raises(IqaVerifyError, match="chunk_size"):
        delta_forward_chunked(*x.values(), chunk_size=chunk_size)


@pytest.mark.parametrize("kernel", [delta_forward_recurrent, delta_forward_chunked])
def test_per_dimension_beta_is_rejected_naming_beta(kernel) -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=4, H=1, D=2, E=2), F64, CPU)
    with pytest.raises(IqaVerifyError, match=r"beta.shape=\(1, 4, 1, 2\)"):
        kernel(x["q"], x["k"], x["v"], x["beta"][..., None].expand(-1, -1, -1, 2))


def test_a_decay_of_minus_infinity_resets_the_state_without_nan() -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=64, H=1, D=3, E=2, decay=Decay.MILD, initial_state=True, seed=9),
                           torch.float32, CPU)
    g = x["g"].clone()
    g[0, 7, 0] = -float("inf")
    before = g.clone()
    o, S = delta_forward_chunked(x["q"], x["k"], x["v"], x["beta"], g, x["initial_state"])
    want_o, want_S = delta_forward_recurrent(*(t.double() for t in (x["q"], x["k"], x["v"], x["beta"], g, x["initial_state"])))
    assert torch.equal(g, before)
    assert compare("out/o", o, want_o, tolerance(Kind.VALUE, torch.float32), dtype=torch.float32).passed
    assert compare("out/final_state", S, want_S, tolerance(Kind.VALUE, torch.float32), dtype=torch.float32).passed
