"""Plumbing of the third-party adapters (iqa_verify.adapters): argument mapping, scale, initial state,
dtypes, the parallel kernel's state embedding, the DEQ configuration mapping, the provider.

The mapping tests replace fla's functions by recording fakes, so a wrong argument is the adapter's
fault by construction; the end-to-end tests (tiny inputs, float32) need the optional packages and
skip with the reason when they are not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import iqa_verify.adapters as provider
from iqa_verify.adapters import fla as fla_adapter
from iqa_verify.errors import IqaVerifyError
from iqa_verify.iqa_claims import Exact, OneStep, Truncated
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.la_forward import la_forward_ref

HAS_FLA = all(importlib.util.find_spec(p) is not None for p in ("fla", "triton", "einops"))
HAS_DEQ = importlib.util.find_spec("torchdeq") is not None
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="optional extra 'fla' (fla-core, triton, einops) is not installed")
needs_deq = pytest.mark.skipif(not HAS_DEQ, reason="optional extra 'deq' (torchdeq) is not installed")

STATEFUL = ("chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla")


def _la_inputs(gen, B=2, T=5, H=2, D=3, E=4, dtype=torch.float64, state=True):
    q, k = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, E, generator=gen, dtype=torch.float64)
    g = -0.2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    s0 = torch.randn(B, H, D, E, generator=gen, dtype=torch.float64) if state else None
    return [t.to(dtype) if t is not None else None for t in (q, k, v, g, s0)]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = tolerance(Kind.VALUE, dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol.rtol, atol=tol.atol * float(expected.detach().abs().max()))


# -- fla: argument mapping with a recording fake ------------------------------------------------------


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("scale", [None, 0.5])
def test_fla_arguments_are_mapped(monkeypatch, gen, name, scale):
    q, k, v, g, s0 = _la_inputs(gen)
    seen = {}

    def fake(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return la_forward_ref(args[0], args[1], args[2], kwargs["g"], kwargs["initial_state"], scale=kwargs["scale"])

    monkeypatch.setattr(fla_adapter, "_op", lambda n: fake if n == name else pytest.fail(f"called {n}"))
    kernel = getattr(fla_adapter, name)
    kwargs = {} if scale is None else {"scale": scale}
    o, state = kernel(q, k, v, g, s0, **kwargs)
    # Same layout, same objects, the contract's scale (1.0 by default, never fla's None -> K**-0.5).
    assert all(a is b for a, b in zip(seen["args"], (q, k, v)))
    assert seen["kwargs"]["g"] is g and seen["kwargs"]["initial_state"] is s0
    assert seen["kwargs"]["scale"] == (1.0 if scale is None else scale)
    assert isinstance(seen["kwargs"]["scale"], float)
    assert seen["kwargs"]["output_final_state"] is True
    ro, rs = la_forward_ref(q, k, v, g, s0, scale=1.0 if scale is None else scale)
    assert torch.equal(o, ro) and torch.equal(state, rs)


@pytest.mark.parametrize("name", STATEFUL)
def test_fla_cu_seqlens_is_passed_through(monkeypatch, gen, name):
    """Packed batches (SPEC §6): the same cu_seqlens object reaches fla; without it fla sees no such keyword."""
    q, k, v, g, _ = _la_inputs(gen, B=1, T=7)
    s0 = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 3, 6], dtype=torch.int64)
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs)
        return la_forward_ref(args[0], args[1], args[2], kwargs["g"], kwargs["initial_state"], scale=kwargs["scale"],
                              cu_seqlens=kwargs.get("cu_seqlens"))

    monkeypatch.setattr(fla_adapter, "_op", lambda n: fake if n == name else pytest.fail(f"called {n}"))
    kernel = getattr(fla_adapter, name)
    o, state = kernel(q, k, v, g, s0, cu_seqlens=cu)
    assert seen[0]["cu_seqlens"] is cu and state.shape == (2, 2, 3, 4)
    kernel(q, k, v, g, None)
    assert "cu_seqlens" not in seen[1]
    with pytest.raises(IqaVerifyError, match=r"cu_seqlens=\[0, 3, 2\]: must be strictly increasing"):
        kernel(q, k, v, g, s0, cu_seqlens=torch.tensor([0, 3, 2]))


def test_fla_adapter_rejects_contract_violations(monkeypatch, gen):
    monkeypatch.setattr(fla_adapter, "_op", lambda n: pytest.fail("fla must not be called"))
    q, k, v, g, s0 = _la_inputs(gen)
    with pytest.raises(ValueError, match="initial_state"):
        fla_adapter.chunk_simple_gla(q, k, v, g, s0[:, :, :, :-1])


# -- fla parallel: the state embedding, checked with an exact attention-form fake ---------------------


def _attention_form(q, k, v, g=None, *, scale, **_):
    """o_t = scale * sum_{j<=t} exp(b_t - b_j) (q_t . k_j) v_j, no state (what fla's parallel computes)."""
    b = torch.cumsum(g, dim=1).transpose(1, 2)  # [B, H, T]
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(mask, b[..., :, None] - b[..., None, :], float("-inf")).exp()
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    return scale * torch.einsum("bhts,bshe->bthe", scores, v), None


@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_embedding_reproduces_state_and_gradients(monkeypatch, gen, with_state):
    monkeypatch.setattr(fla_adapter, "_op", lambda n: _attention_form)
    inputs = _la_inputs(gen, state=with_state)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    o, state = fla_adapter.parallel_simple_gla(*leaves, scale=2.5)
    ro, rs = la_forward_ref(*ref_leaves, scale=2.5)
    _close(o, ro, torch.float64)
    _close(state, rs, torch.float64)
    co, cs = torch.randn(ro.shape, generator=gen, dtype=torch.float64), torch.randn(rs.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad([o, state], [t for t in leaves if t is not None], [co, cs])
    ref = torch.autograd.grad([ro, rs], [t for t in ref_leaves if t is not None], [co, cs])
    for got, want in zip(grads, ref):
        _close(got, want, torch.float64)


def test_parallel_refuses_zero_scale(monkeypatch, gen):
    monkeypatch.setattr(fla_adapter, "_op", lambda n: _attention_form)
    with pytest.raises(ValueError, match="scale=0.0"):
        fla_adapter.parallel_simple_gla(*_la_inputs(gen), scale=0.0)


# -- fla end to end (interpreted without a GPU) -------------------------------------------------------


@needs_fla
@pytest.mark.parametrize("name", [*STATEFUL, "parallel_simple_gla"])
def test_fla_kernels_match_reference_float32(gen, name):
    q, k, v, g, s0 = _la_inputs(gen, T=3, dtype=torch.float32)
    copies = [t.clone() for t in (q, k, v, g, s0)]
    o, state = getattr(fla_adapter, name)(q, k, v, g, s0, scale=0.5)
    ro, rs = la_forward_ref(*(t.double() for t in (q, k, v, g, s0)), scale=0.5)
    assert o.dtype == torch.float32 and o.shape == ro.shape and state.shape == rs.shape
    _close(o, ro, torch.float32)
    _close(state, rs, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, k, v, g, s0)))  # inputs untouched


@needs_fla
def test_fla_bfloat16_keeps_output_dtype_and_float32_state(gen):
    q, k, v, g, s0 = _la_inputs(gen, T=3, dtype=torch.bfloat16)
    o, state = fla_adapter.chunk_simple_gla(q, k, v, g, s0, scale=0.5)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    ro, rs = la_forward_ref(*(t.double() for t in (q, k, v, g, s0)), scale=0.5)
    _close(o, ro, torch.bfloat16)  # the interpreter's bf16 arithmetic is on values, not raw storage


# -- torchdeq -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, OneStep(), id="defaults-phantom-1"),
        pytest.param({"grad": 3}, Truncated(3), id="phantom-3"),
        pytest.param({"ift": True}, Exact(), id="ift-exact"),
        pytest.param({"hook_ift": True}, Exact(), id="hook-ift-exact"),
        pytest.param({"tau": 0.5}, Exact(), id="damped-phantom-undeclared"),
        pytest.param({"n_states": 2}, Exact(), id="several-states-undeclared"),
    ],
)
def test_deq_configuration_declares_its_gradient(kwargs, expected):
    from iqa_verify.adapters.torchdeq import declared_backward

    got = declared_backward(kwargs)
    assert type(got) is type(expected) and repr(got) == repr(expected)


def _iqa_inputs(gen):
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    w_q, w_k = (0.3 * torch.randn(3, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    w_v = 0.5 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
    return x, w_q, w_k, w_v


@needs_deq
def test_torchdeq_anderson_ift_matches_implicit_reference(gen):
    from iqa_verify.adapters.torchdeq import make_torchdeq_iqa
    from iqa_verify.reference.iqa import iqa_forward_ref

    kernel = make_torchdeq_iqa("tight", f_solver="anderson", b_solver="anderson", ift=True, f_tol=1e-6, b_tol=1e-8,
                               f_max_iter=100, b_max_iter=100)
    inputs = _iqa_inputs(gen)
    leaves = [t.float().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    y, ry = kernel(*leaves, scale=0.7), iqa_forward_ref(*ref_leaves, scale=0.7)
    assert y.dtype == torch.float32
    _close(y, ry, torch.float32)
    cot = torch.randn(ry.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, cot.float())
    want = torch.autograd.grad(ry, ref_leaves, cot)
    tol = tolerance(Kind.GRAD, torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol.rtol, atol=tol.atol * float(max(w.abs().max() for w in want)))


@needs_deq
def test_torchdeq_kernel_declares_and_keeps_dtype(gen):
    from iqa_verify.adapters import torchdeq as deq_adapter

    kernel = deq_adapter.torchdeq_default
    assert isinstance(kernel.iqa_info.backward, OneStep)
    assert deq_adapter.torchdeq_anderson_ift.iqa_info.exact
    x, w_q, w_k, w_v = (t.bfloat16() for t in _iqa_inputs(gen))
    assert kernel(x, w_q, w_k, None).shape == (2, 4, 3)
    assert kernel(x, w_q, w_k, w_v).dtype == torch.bfloat16


# -- provider -----------------------------------------------------------------------------------------


def test_provider_lists_adapters_and_says_what_is_missing(monkeypatch):
    kernels = provider.optional_kernels()
    impls = {k.kernel.impl: k for k in kernels}
    assert "iqa_verify.adapters.fla:chunk_simple_gla" in impls
    assert {k.family for k in kernels} == {"la-forward", "gla-forward", "delta-forward", "iqa"}
    assert all((k.missing is None) == (HAS_DEQ if k.family == "iqa" else HAS_FLA) for k in kernels)
    monkeypatch.setattr(provider.importlib.util, "find_spec", lambda name: None)
    assert all(k.missing and "not installed" in k.missing for k in provider.optional_kernels())
