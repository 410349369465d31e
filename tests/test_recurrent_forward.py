"""gla-forward and delta-forward take packed batches and hold the reference-free properties (issue #13).

- their magnitude bounds really bound values and gradients (every gate, key, beta and decay regime);
- the packed float64 references are the per-sequence references, with exactly zero gradients at padding, and the
  built-in kernels' packed calls equal their per-sequence calls (values and gradients, float64);
- packed arguments are checked naming the rule; far values keep the delta rule's keys unit and beta in [0, 1];
- the six new properties hold for the built-in kernels on cases chosen for them (a chunk boundary crossed, a
  split on and off it, each packing pattern, padding, an initial state, a transposed or sliced layout): float32
  for every built-in, bf16 for the chunked ones. The full ci search of every built-in in every dtype is in
  ``tests/test_builtin_kernels.py`` under ``-m slow`` (CI time).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from iqa_verify.errors import IqaVerifyError
from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.properties.delta_forward import RECURRENCE as DELTA
from iqa_verify.properties.delta_forward.bounds import magnitude_bounds as delta_bounds
from iqa_verify.properties.delta_forward.cases import Beta, DeltaCase, Decay, Keys, build_delta_inputs
from iqa_verify.properties.gla_forward import RECURRENCE as GLA
from iqa_verify.properties.gla_forward.bounds import magnitude_bounds as gla_bounds
from iqa_verify.properties.gla_forward.cases import Gate, GLACase, build_gla_inputs
from iqa_verify.properties.recurrent_forward import Far, RecurrentForward
from iqa_verify.properties.recurrent_forward.packing import packed_case
from iqa_verify.properties.recurrent_forward.runs import far_from
from iqa_verify.reference.delta_forward import delta_forward_ref
from iqa_verify.reference.gla_forward import gla_forward_matrix_ref, gla_forward_ref
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess

CPU = torch.device("cpu")
F64 = torch.float64
NEW = ("state-handoff", "causality", "sequence-independence", "varlen-values", "varlen-gradients", "varlen-one-by-one")


def _values_and_grads(fn, inputs: dict, gen: torch.Generator, **kwargs):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    o, S = fn(*[leaves.get(n) for n in inputs], **kwargs)
    cots = (torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(S.shape, generator=gen, dtype=F64))
    grads = torch.autograd.grad((o, S), list(leaves.values()), [c.to(o.dtype) for c in cots])
    return o.detach(), S.detach(), dict(zip(leaves, grads)), {"o": cots[0], "final_state": cots[1]}


@pytest.mark.parametrize("gate", list(Gate), ids=lambda g: g.value)
def test_gla_magnitude_bounds_bound_values_and_gradients(gate: Gate, gen: torch.Generator) -> None:
    spec = GLACase(B=2, T=40, H=2, D=5, E=3, gate=gate, initial_state=True, magnitude=1, scale=0.5, seed=11)
    x = build_gla_inputs(spec, F64, CPU)
    o, S, grads, cots = _values_and_grads(gla_forward_ref, x, gen, scale=0.5)
    bounds = gla_bounds(x, 0.5, cots)
    assert float(o.abs().max()) <= bounds["o"] and float(S.abs().max()) <= bounds["final_state"]
    for n, gr in grads.items():
        assert float(gr.abs().max()) <= bounds[n], (n, float(gr.abs().max()), bounds[n])


@pytest.mark.parametrize(("keys", "beta", "decay"), list(itertools.product(Keys, Beta, [Decay.NONE, Decay.MILD, Decay.UNDERFLOW])),
                         ids=lambda x: x.value)
def test_delta_magnitude_bounds_bound_values_and_gradients(keys: Keys, beta: Beta, decay: Decay, gen: torch.Generator) -> None:
    spec = DeltaCase(B=2, T=40, H=2, D=5, E=3, keys=keys, beta=beta, decay=decay, initial_state=True, magnitude=1,
                     scale=0.5, seed=12)
    x = build_delta_inputs(spec, F64, CPU)
    o, S, grads, cots = _values_and_grads(delta_forward_ref, x, gen, scale=0.5)
    bounds = delta_bounds(x, 0.5, cots)
    assert float(o.abs().max()) <= bounds["o"] and float(S.abs().max()) <= bounds["final_state"]
    for n, gr in grads.items():
        assert float(gr.abs().max()) <= bounds[n], (n, float(gr.abs().max()), bounds[n])


def test_delta_bounds_follow_an_expanding_transition() -> None:
    """Keys of norm 2 with beta = 1 make I - beta k k^T expand (eigenvalue -3): the bound grows as the state does."""
    spec = DeltaCase(B=1, T=12, H=1, D=3, E=2, beta=Beta.ONE, seed=5)
    x = build_delta_inputs(spec, F64, CPU)
    x["k"] = 2 * x["k"]
    o, S = delta_forward_ref(*x.values())
    bounds = delta_bounds(x, 1.0)
    assert float(o.abs().max()) <= bounds["o"] and float(S.abs().max()) <= bounds["final_state"]


_FORMS = {"gla-forward": (GLA, GLACase(B=1, T=60, H=2, D=3, E=2, initial_state=True, seed=5)),
          "delta-forward": (DELTA, DeltaCase(B=1, T=60, H=2, D=3, E=2, decay=Decay.MILD, initial_state=True, seed=5))}


@pytest.mark.parametrize("name", list(_FORMS))
def test_packed_reference_is_the_per_sequence_reference_with_zero_padding_gradients(name: str, gen: torch.Generator) -> None:
    form, spec = _FORMS[name]
    p = packed_case(form, spec, 60, F64, CPU)
    assert p.pad > 0 and len(p.lengths) > 2
    o, S, grads, _ = _values_and_grads(form.reference, p.inputs, gen, scale=0.5, cu_seqlens=p.cu_seqlens)
    cu = p.cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        part = {n: (t[i:i + 1] if n == "initial_state" else t[:, a:b]) for n, t in p.inputs.items()}
        o_i, S_i = form.reference(*part.values(), scale=0.5)
        assert torch.allclose(o[:, a:b], o_i, rtol=1e-12, atol=1e-12) and torch.allclose(S[i:i + 1], S_i, rtol=1e-12, atol=1e-12)
    for n, gr in grads.items():
        if n != "initial_state":
            assert torch.equal(gr[:, cu[-1]:], torch.zeros_like(gr[:, cu[-1]:])), n
    if name == "gla-forward":
        o2, S2 = gla_forward_matrix_ref(*p.inputs.values(), scale=0.5, cu_seqlens=p.cu_seqlens)
        assert torch.allclose(o, o2, rtol=1e-12, atol=1e-12) and torch.allclose(S, S2, rtol=1e-12, atol=1e-12)


_KERNELS = [(name, impl.impl) for name in _FORMS for impl in family(name).builtin_kernels]


@pytest.mark.parametrize(("name", "impl"), _KERNELS, ids=[i.rsplit(":", 1)[-1] for _, i in _KERNELS])
def test_builtin_packed_call_is_its_per_sequence_calls(name: str, impl: str, gen: torch.Generator) -> None:
    """float64, so any difference is the packing's: the packed call equals the kernel on each sequence alone."""
    form, spec = _FORMS[name]
    kernel = load_kernel(impl)
    p = packed_case(form, spec, 60, F64, CPU)
    o, S, grads, cots = _values_and_grads(kernel, p.inputs, gen, scale=0.5, cu_seqlens=p.cu_seqlens)
    cu = p.cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        part = {n: (t[i:i + 1] if n == "initial_state" else t[:, a:b]) for n, t in p.inputs.items()}
        leaves = {n: t.detach().clone().requires_grad_() for n, t in part.items()}
        o_i, S_i = kernel(*leaves.values(), scale=0.5)
        g_i = torch.autograd.grad((o_i, S_i), list(leaves.values()), (cots["o"][:, a:b], cots["final_state"][i:i + 1]))
        assert torch.allclose(o[:, a:b], o_i, rtol=1e-12, atol=1e-12) and torch.allclose(S[i:i + 1], S_i, rtol=1e-12, atol=1e-12)
        for n, gr in zip(leaves, g_i):
            got = grads[n][i:i + 1] if n == "initial_state" else grads[n][:, a:b]
            assert torch.allclose(got, gr, rtol=1e-10, atol=1e-12), (i, n)
    for n, gr in grads.items():
        if n != "initial_state":
            assert torch.equal(gr[:, cu[-1]:], torch.zeros_like(gr[:, cu[-1]:])), n


@pytest.mark.parametrize(("name", "impl"), _KERNELS, ids=[i.rsplit(":", 1)[-1] for _, i in _KERNELS])
def test_packed_arguments_are_checked_naming_the_rule(name: str, impl: str) -> None:
    form, spec = _FORMS[name]
    p = packed_case(form, spec, 20, torch.float32, CPU)
    kernel = load_kernel(impl)
    with pytest.raises(IqaVerifyError, match=r"initial_state.shape=.*\[N, H, D, E\]"):
        kernel(*{**p.inputs, "initial_state": p.inputs["initial_state"][:1]}.values(), cu_seqlens=p.cu_seqlens)
    with pytest.raises(IqaVerifyError, match="strictly increasing"):
        kernel(*p.inputs.values(), cu_seqlens=torch.tensor([0, 5, 5, 20]))
    batch = {n: (t if n == "initial_state" else torch.cat([t, t])) for n, t in p.inputs.items()}
    with pytest.raises(IqaVerifyError, match="B=2: a packed batch"):
        kernel(*batch.values(), cu_seqlens=p.cu_seqlens)


def test_far_values_keep_the_delta_rule_in_its_regime(gen: torch.Generator) -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=30, H=2, D=4, E=3, keys=Keys.SMALL, decay=Decay.MILD, seed=3), F64, CPU)
    y = far_from(DELTA, x, 10, gen)
    assert torch.equal(y["q"][:, :10], x["q"][:, :10]) and y["initial_state"] is None
    assert torch.allclose(y["k"][:, 10:].norm(dim=-1), torch.ones(1, 20, 2, dtype=F64))
    assert float(y["beta"][:, 10:].min()) >= 0 and float(y["beta"][:, 10:].max()) <= 1
    assert float(y["g"][:, 10:].max()) <= -20 and float(y["v"][:, 10:].abs().max()) > 3 * float(x["v"].abs().max())


def test_a_form_names_the_time_input_without_a_far_kind() -> None:
    with pytest.raises(IqaVerifyError, match=r"missing \['beta'\]"):
        RecurrentForward(time_inputs=("q", "k", "v", "beta"), far={"q": Far.SCALED, "k": Far.SCALED, "v": Far.SCALED},
                         build=build_delta_inputs, bounds=delta_bounds, reference=delta_forward_ref,
                         baseline=delta_forward_ref)


# Cases for the new properties: T across the 64-step chunk boundary; seeds odd and even (the split on and off a
# chunk boundary), seed % 3 each packing pattern, seed % 4 != 0 padding.
_CASES = {
    "gla-forward": (
        '{"B":2,"T":97,"H":2,"D":5,"E":3,"gate":"mild","initial_state":true,"layout":"transposed","scale":0.5,"seed":7}',
        '{"B":1,"T":70,"H":1,"D":3,"E":4,"gate":"underflow-some","initial_state":false,"layout":"sliced","seed":2}',
        '{"B":1,"T":66,"H":2,"D":2,"E":2,"gate":"strong","initial_state":true,"seed":9}',
    ),
    "delta-forward": (
        '{"B":2,"T":97,"H":2,"D":5,"E":3,"keys":"unit","beta":"mixed","decay":"mild","initial_state":true,'
        '"layout":"transposed","scale":0.5,"seed":7}',
        '{"B":1,"T":70,"H":1,"D":3,"E":4,"keys":"small","beta":"uniform","decay":"none","layout":"sliced","seed":2}',
        '{"B":1,"T":66,"H":2,"D":2,"E":2,"keys":"unit","beta":"one","decay":"underflow","initial_state":true,"seed":9}',
    ),
}
_HOLDS = [(name, impl, "float32") for name, impl in _KERNELS] + [
    (name, impl, "bfloat16") for name, impl in _KERNELS if impl.endswith("_chunked")]


@pytest.mark.parametrize(("name", "impl", "dtype"), _HOLDS, ids=[f"{i.rsplit(':', 1)[-1]}-{d}" for _, i, d in _HOLDS])
def test_builtin_kernels_hold_the_new_properties(name: str, impl: str, dtype: str) -> None:
    fam = family(name)
    cfg = RunConfig(fam, load_kernel(impl), impl, getattr(torch, dtype), CPU, profile_named("ci"), seed=0,
                    isolation=InProcess())
    ids = [f"{name}/{n}" for n in NEW]
    for case in _CASES[name]:
        results = [r for r in check(cfg, only=ids, case_json=case).results if r.property_id in ids]
        bad = [f"{r.property_id}: {r.status.label}\n{r.counterexample.message if r.counterexample else r.error}"
               for r in results if r.status is not Status.PASSED]
        assert len(results) == len(NEW) and not bad, "\n".join(bad)
