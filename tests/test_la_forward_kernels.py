"""Cross-checks of the built-in ``la_forward`` kernels: chunked against recurrent, in float64.

Both decay forms of the chunked kernel are covered: FACTORED (moderate decay, the fast path) near
its span limit, and MASKED (strong decay) as the fallback and, forced, on ordinary inputs. A few
fast checks only; the full verification against the float64 reference is done by the
property engine. Values and the autograd gradients of all five inputs are compared under
``tolerance(Kind.REFERENCE, torch.float64)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.kernels import la_forward_chunked as chunked_module
from iqa_verify.kernels.la_forward_chunked import DecayForm, decay_form, factored_span_limit, la_forward_chunked
from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent
from iqa_verify.tolerances import Kind, tolerance

NAMES = ("q", "k", "v", "g", "initial_state")
REFERENCE_TOL = tolerance(Kind.REFERENCE, torch.float64)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20240611)


def _inputs(
    gen: torch.Generator,
    *,
    T: int,
    B: int = 2,
    H: int = 3,
    D: int = 5,
    E: int = 4,
    g_range: tuple[float, float] = (-1.0, 0.0),
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H] uniform in g_range (some exact zeros); S_0: [B, H, D, E]."""
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, E, generator=gen, dtype=torch.float64)
    low, high = g_range
    g = low + (high - low) * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if high == 0.0:
        g[:, ::3] = 0.0  # no decay on some steps
    s0 = torch.randn(B, H, D, E, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, g, s0)]


def _outputs_and_grads(kernel, inputs: list[torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """{"out/o", "out/final_state", "grad/dq", ...}: values and the VJP with fixed cotangents."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = kernel(*leaves, scale=0.7, **kwargs)
    gen = torch.Generator().manual_seed(7)
    d_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    d_final = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    grads = torch.autograd.grad((o, final), leaves, (d_o, d_final))
    result = {"out/o": o.detach(), "out/final_state": final.detach()}
    result.update({f"grad/d{name}": grad for name, grad in zip(NAMES, grads)})
    return result


def _assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    checks = [compare(path, actual[path], expected[path], REFERENCE_TOL, dtype=torch.float64) for path in expected]
    failed = [check.describe() for check in checks if not check.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_chunked_matches_recurrent(gen: torch.Generator, T: int, chunk_size: int) -> None:
    inputs = _inputs(gen, T=T)
    expected = _outputs_and_grads(la_forward_recurrent, inputs)
    actual = _outputs_and_grads(la_forward_chunked, inputs, chunk_size=chunk_size)
    _assert_all_close(actual, expected)


def test_chunked_matches_recurrent_without_initial_state(gen: torch.Generator) -> None:
    q, k, v, g, _ = _inputs(gen, T=37)
    o_ref, s_ref = la_forward_recurrent(q, k, v, g, scale=0.7)
    o, s = la_forward_chunked(q, k, v, g, scale=0.7, chunk_size=8)
    _assert_all_close({"out/o": o, "out/final_state": s}, {"out/o": o_ref, "out/final_state": s_ref})


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_decay_stays_finite(gen: torch.Generator, chunk_size: int) -> None:
    inputs = _inputs(gen, T=100, g_range=(-60.0, -20.0))
    actual = _outputs_and_grads(la_forward_chunked, inputs, chunk_size=chunk_size)
    nonfinite = [path for path, t in actual.items() if not bool(torch.isfinite(t).all())]
    assert not nonfinite, f"non-finite values in {nonfinite}"
    _assert_all_close(actual, _outputs_and_grads(la_forward_recurrent, inputs))


def _transposed_views(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same values as non-contiguous views: stored [B, H, T, F] / [B, H, T] / [B, H, E, D], transposed back."""
    q, k, v, g, s0 = inputs
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    views.append(g.transpose(1, 2).contiguous().transpose(1, 2))
    views.append(s0.transpose(-1, -2).contiguous().transpose(-1, -2))
    return views


@pytest.mark.parametrize("kernel", [la_forward_recurrent, la_forward_chunked], ids=["recurrent", "chunked"])
def test_non_contiguous_inputs_give_the_same_results(gen: torch.Generator, kernel) -> None:
    inputs = _inputs(gen, T=21)
    views = _transposed_views(inputs)
    assert not any(view.is_contiguous() for view in views)
    _assert_all_close(_outputs_and_grads(kernel, views), _outputs_and_grads(kernel, inputs))


@pytest.mark.parametrize("kernel", [la_forward_recurrent, la_forward_chunked], ids=["recurrent", "chunked"])
def test_inputs_are_not_modified(gen: torch.Generator, kernel) -> None:
    inputs = [x.requires_grad_() for x in _transposed_views(_inputs(gen, T=19))]
    before = [x.detach().clone() for x in inputs]
    o, final = kernel(*inputs, scale=0.5)
    torch.autograd.grad((o, final), inputs, (torch.ones_like(o), torch.ones_like(final)))
    changed = [name for name, x, x0 in zip(NAMES, inputs, before) if not torch.equal(x.detach(), x0)]
    assert not changed, f"inputs modified: {changed}"


@pytest.mark.parametrize("kernel", [la_forward_recurrent, la_forward_chunked], ids=["recurrent", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtypes(gen: torch.Generator, kernel, dtype: torch.dtype) -> None:
    inputs = _inputs(gen, T=33, dtype=dtype)
    o, final = kernel(*inputs, scale=0.7)
    assert (o.dtype, o.device) == (dtype, inputs[0].device)
    assert final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert tuple(o.shape) == tuple(inputs[2].shape)


def test_bf16_chunked_is_as_accurate_as_the_float32_accumulation_baseline(gen: torch.Generator) -> None:
    """Chunked bf16 against the float64 result, allowed a multiple of the recurrent bf16 kernel's error (SPEC §5)."""
    inputs = _inputs(gen, T=300, g_range=(-0.05, 0.0))
    o_ref, s_ref = la_forward_recurrent(*inputs, scale=0.7)
    low = [x.to(torch.bfloat16) for x in inputs]
    o_base, s_base = la_forward_recurrent(*low, scale=0.7)
    o, s = la_forward_chunked(*low, scale=0.7)
    tol = tolerance(Kind.VALUE, torch.bfloat16)
    checks = [
        compare("out/o", o, o_ref, tol, dtype=torch.bfloat16, baseline=o_base),
        compare("out/final_state", s, s_ref, tol, dtype=torch.bfloat16, baseline=s_base),
    ]
    failed = [check.describe() for check in checks if not check.passed]
    assert not failed, "\n".join(failed)


def test_double_backward_raises_instead_of_being_silently_wrong(gen: torch.Generator) -> None:
    leaves = [x.requires_grad_() for x in _inputs(gen, T=9)]
    o, _ = la_forward_chunked(*leaves, chunk_size=4)
    (dq,) = torch.autograd.grad(o.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), leaves[1])


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64", None], ids=repr)
def test_bad_chunk_size_is_rejected(gen: torch.Generator, chunk_size) -> None:
    with pytest.raises(IqaVerifyError, match="chunk_size="):
        la_forward_chunked(*_inputs(gen, T=4), chunk_size=chunk_size)


def test_bad_inputs_are_rejected_by_the_contract_check(gen: torch.Generator) -> None:
    q, k, v, g, s0 = _inputs(gen, T=4)
    for kernel in (la_forward_recurrent, la_forward_chunked):
        with pytest.raises(IqaVerifyError, match="g.shape="):
            kernel(q, k, v, g[:, :-1], s0)


def _chunk_log_decays(gen: torch.Generator, *, B: int, T: int, H: int, chunk: int, span: float) -> torch.Tensor:
    """g: [B, T, H] (T a multiple of ``chunk``), uneven steps whose sum over every chunk is exactly -span."""
    w = 0.5 + torch.rand(B, T // chunk, chunk, H, generator=gen, dtype=torch.float64)
    w[:, :, ::5] = 0.0  # some steps without decay
    return (-span * w / w.sum(2, keepdim=True)).reshape(B, T, H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_form_switches_at_the_span_limit(gen: torch.Generator, dtype: torch.dtype) -> None:
    limit = factored_span_limit(dtype)
    assert limit == pytest.approx(math.log(torch.finfo(dtype).max) / 3)
    g = _chunk_log_decays(gen, B=2, T=32, H=3, chunk=8, span=0.97 * limit).to(dtype)
    assert decay_form(g, 8) is DecayForm.FACTORED
    one_chunk_too_strong = g.clone()
    one_chunk_too_strong[1, 16:24, 2] *= 1.05 / 0.97
    assert decay_form(one_chunk_too_strong, 8) is DecayForm.MASKED
    assert decay_form(one_chunk_too_strong, 4) is DecayForm.FACTORED  # shorter chunks, smaller spans
    with_inf = g.clone()
    with_inf[0, 3, 0] = -math.inf
    assert decay_form(with_inf, 8) is DecayForm.MASKED


def test_factored_form_near_its_span_limit_matches_recurrent_float64(gen: torch.Generator) -> None:
    """Row factors up to exp(0.97 * 236) ~ 1e99 on Q and down to 1e-99 on K: still exact in float64."""
    q, k, v, _, s0 = _inputs(gen, T=64)
    g = _chunk_log_decays(gen, B=2, T=64, H=3, chunk=16, span=0.97 * factored_span_limit(torch.float64))
    assert decay_form(g, 16) is DecayForm.FACTORED
    inputs = [q, k, v, g, s0]
    actual = _outputs_and_grads(la_forward_chunked, inputs, chunk_size=16)
    _assert_all_close(actual, _outputs_and_grads(la_forward_recurrent, inputs))


def test_factored_form_near_its_span_limit_is_as_accurate_as_recurrent_float32(gen: torch.Generator) -> None:
    """float32 against the float64 result, allowed a multiple of the float32 recurrent kernel's error (SPEC §5)."""
    q, k, v, _, s0 = _inputs(gen, T=64)
    g = _chunk_log_decays(gen, B=2, T=64, H=3, chunk=16, span=0.97 * factored_span_limit(torch.float32))
    inputs = [q, k, v, g, s0]
    low = [x.to(torch.float32) for x in inputs]
    assert decay_form(low[3], 16) is DecayForm.FACTORED
    expected = _outputs_and_grads(la_forward_recurrent, inputs)
    baseline = _outputs_and_grads(la_forward_recurrent, low)
    actual = _outputs_and_grads(la_forward_chunked, low, chunk_size=16)
    nonfinite = [path for path, t in actual.items() if not bool(torch.isfinite(t).all())]
    assert not nonfinite, f"non-finite values in {nonfinite}"
    checks = [
        compare(
            path,
            actual[path],
            expected[path],
            tolerance(Kind.VALUE if path.startswith("out/") else Kind.GRAD, torch.float32),
            dtype=torch.float32,
            baseline=baseline[path],
        )
        for path in expected
    ]
    failed = [check.describe() for check in checks if not check.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("form", list(DecayForm), ids=lambda form: form.name)
@pytest.mark.parametrize("T", [1, 17, 100])
def test_each_decay_form_forced_matches_recurrent(gen: torch.Generator, monkeypatch, form: DecayForm, T: int) -> None:
    inputs = _inputs(gen, T=T)
    monkeypatch.setattr(chunked_module, "decay_form", lambda g, chunk_size: form)
    actual = _outputs_and_grads(la_forward_chunked, inputs, chunk_size=16)
    _assert_all_close(actual, _outputs_and_grads(la_forward_recurrent, inputs))


def test_one_strongly_decaying_chunk_among_weak_ones(gen: torch.Generator) -> None:
    """One chunk at g = -60 per step sends the call to the masked form; values and gradients stay exact and finite."""
    inputs = _inputs(gen, T=64, g_range=(-0.1, 0.0))
    inputs[3][:, 20:30] = -60.0
    assert decay_form(inputs[3], 16) is DecayForm.MASKED
    actual = _outputs_and_grads(la_forward_chunked, inputs, chunk_size=16)
    nonfinite = [path for path, t in actual.items() if not bool(torch.isfinite(t).all())]
    assert not nonfinite, f"non-finite values in {nonfinite}"
    _assert_all_close(actual, _outputs_and_grads(la_forward_recurrent, inputs))
