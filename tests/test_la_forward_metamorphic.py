"""The inputs real linear-attention kernels take (issue #12): cotangent layouts, packed batches (cu_seqlens)
and the reference-free properties.

- cotangents come in every layout and keep it when cast to the kernel's dtype;
- the magnitude bounds of the reference-free properties really bound values and gradients;
- packings cover the promised lengths; bad cu_seqlens are refused naming the rule;
- the packed reference equals the per-sequence reference, with exactly zero gradients at padding;
- a correct kernel written another way (dense masked matrix) holds every new property;
- a kernel without the cu_seqlens keyword is "not varlen-capable" (n/a), neither passed nor failed.
"""

from __future__ import annotations

import pytest
import torch

from iqa_verify.contracts import check_cu_seqlens
from iqa_verify.errors import IqaVerifyError
from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.pytest_plugin import verify
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.properties.generic import CotangentLayout, cast_keeping_layout, cotangents_for
from iqa_verify.properties.la_forward.cases import Decay, LACase, build_la_inputs
from iqa_verify.properties.la_forward import RECURRENCE
from iqa_verify.properties.la_forward.bounds import magnitude_bounds
from iqa_verify.properties.recurrent_forward.packing import packed_case, packing
from iqa_verify.reference.la_forward import la_forward_recurrent_ref, la_forward_ref

CPU = torch.device("cpu")
F64 = torch.float64
NEW = ("state-handoff", "causality", "sequence-independence", "varlen-values", "varlen-gradients", "varlen-one-by-one")


class _Spec:
    def __init__(self, layout: CotangentLayout) -> None:
        self.seed, self.cotangents = 3, layout


@pytest.mark.parametrize("layout", list(CotangentLayout), ids=lambda x: x.value)
def test_cotangents_come_in_each_layout_and_keep_it_when_cast(layout: CotangentLayout) -> None:
    case = type("C", (), {"spec": _Spec(layout), "dtype": torch.bfloat16})()
    cots = cotangents_for(case, {"o": torch.zeros(2, 5, 3, 4), "final_state": torch.zeros(2, 3, 4, 6)})
    for name, c in cots.items():
        cast = cast_keeping_layout(c, torch.bfloat16, CPU)
        # the kernel is handed exactly the values the reference differentiates against
        assert cast.stride() == c.stride() and torch.equal(cast.double(), c), name
        if layout is CotangentLayout.CONTIGUOUS:
            assert c.is_contiguous()
        elif layout is CotangentLayout.EXPANDED:
            assert c.stride(0) == 0, (name, c.stride())
        else:
            assert not c.is_contiguous(), (name, c.stride())
        if layout is CotangentLayout.SLICED:
            assert c.untyped_storage().nbytes() > c.numel() * c.element_size()  # gaps in the buffer


@pytest.mark.parametrize("decay", [Decay.MILD, Decay.STRONG, Decay.UNDERFLOW, Decay.NONE], ids=lambda d: d.value)
def test_magnitude_bounds_bound_values_and_gradients(decay: Decay) -> None:
    spec = LACase(B=2, T=40, H=2, D=5, E=3, decay=decay, initial_state=True, magnitude=1, scale=0.5, seed=11)
    x = build_la_inputs(spec, F64, CPU)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, S = la_forward_ref(*leaves.values(), scale=0.5)
    cots = {"o": torch.randn(o.shape, dtype=F64), "final_state": torch.randn(S.shape, dtype=F64)}
    grads = dict(zip(leaves, torch.autograd.grad((o, S), list(leaves.values()), list(cots.values()))))
    bounds = magnitude_bounds(x, 0.5, cots)
    assert float(o.detach().abs().max()) <= bounds["o"] and float(S.detach().abs().max()) <= bounds["final_state"]
    for n, gr in grads.items():
        assert float(gr.abs().max()) <= bounds[n], (n, float(gr.abs().max()), bounds[n])


def test_packings_cover_the_promised_lengths() -> None:
    seen = {"one": False, "short": False, "ragged": False, "pad": False, "no pad": False, "many beside one long": False}
    for seed in range(24):
        for total in (1, 7, 65, 130, 317):
            lengths, pad = packing(seed, total)
            assert sum(lengths) == total and min(lengths) >= 1 and len(lengths) <= 12
            seen["one"] |= 1 in lengths
            seen["short"] |= any(1 < n < 16 for n in lengths)
            seen["ragged"] |= any(n > 64 and n % 16 for n in lengths)
            seen["pad"] |= pad > 0
            seen["no pad"] |= pad == 0
            seen["many beside one long"] |= len(lengths) >= 5 and max(lengths) >= total // 2
    assert all(seen.values()), seen


def test_packed_case_shapes_and_padding() -> None:
    spec = LACase(B=3, T=50, H=2, D=4, E=3, initial_state=True, seed=5)
    p = packed_case(RECURRENCE, spec, 50, torch.float32, CPU)
    N = len(p.lengths)
    assert p.inputs["q"].shape == (1, 50 + p.pad, 2, 4) and p.inputs["initial_state"].shape == (N, 2, 4, 3)
    assert p.cu_seqlens.dtype == torch.int64 and p.cu_seqlens.tolist()[-1] == 50 and p.pad > 0


@pytest.mark.parametrize(("cu", "rule"), [
    ([0, 3, 2], "strictly increasing"),
    ([1, 3], "start at 0"),
    ([0, 3, 9], "<= T=8"),
    ([0], "at least one sequence"),
    ([0, 0, 4], "strictly increasing"),
], ids=["decreasing", "not-from-0", "past-T", "empty", "empty-sequence"])
def test_bad_cu_seqlens_are_refused_naming_the_rule(cu: list[int], rule: str) -> None:
    with pytest.raises(IqaVerifyError, match=rf"cu_seqlens=\[.*\]: .*{rule}"):
        check_cu_seqlens(torch.tensor(cu, dtype=torch.int64), 1, 8, CPU)


def test_cu_seqlens_must_be_int64_and_batch_one() -> None:
    with pytest.raises(IqaVerifyError, match="cu_seqlens.dtype"):
        check_cu_seqlens(torch.tensor([0, 3], dtype=torch.int32), 1, 8, CPU)
    with pytest.raises(IqaVerifyError, match="B=2: a packed batch"):
        check_cu_seqlens(torch.tensor([0, 3], dtype=torch.int64), 2, 8, CPU)


def test_packed_reference_is_the_per_sequence_reference_with_zero_padding_gradients() -> None:
    spec = LACase(B=1, T=30, H=2, D=3, E=2, initial_state=True, seed=4)
    p = packed_case(RECURRENCE, spec, 30, F64, CPU)
    leaves = {n: t.clone().requires_grad_() for n, t in p.inputs.items()}
    o, S = la_forward_ref(*leaves.values(), scale=0.5, cu_seqlens=p.cu_seqlens)
    o2, S2 = la_forward_recurrent_ref(*p.inputs.values(), scale=0.5, cu_seqlens=p.cu_seqlens)
    assert torch.allclose(o, o2, rtol=1e-12, atol=1e-12) and torch.allclose(S, S2, rtol=1e-12, atol=1e-12)
    cu = p.cu_seqlens.tolist()
    a, b = cu[1], cu[2]
    alone, S_alone = la_forward_ref(*(p.inputs[n][:, a:b] for n in ("q", "k", "v", "g")), p.inputs["initial_state"][1:2],
                                    scale=0.5)
    assert torch.allclose(o[:, a:b], alone, rtol=1e-12, atol=1e-12) and torch.allclose(S[1:2], S_alone, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((o, S), list(leaves.values()), (torch.randn_like(o), torch.randn_like(S)))
    for gr in grads[:4]:
        assert torch.equal(gr[:, cu[-1]:], torch.zeros_like(gr[:, cu[-1]:]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NEW)
def test_a_correct_kernel_written_another_way_holds_the_new_properties(name: str, dtype: str) -> None:
    verify("tests/dense_la_forward.py:la_forward_dense", "la-forward", f"la-forward/{name}", dtype)


def test_a_kernel_without_cu_seqlens_is_not_varlen_capable() -> None:
    impl = "tests/bug_zoo/la_forward.py:scale_ignored"
    cfg = RunConfig(family("la-forward"), load_kernel(impl), impl, torch.float32, CPU, profile_named("ci"))
    ids = [f"la-forward/{n}" for n in NEW if n.startswith("varlen")]
    results = check(cfg, only=ids).results
    judged = [r for r in results if r.property_id in ids]
    assert judged and all(r.status is Status.NOT_APPLICABLE and "not varlen-capable" in r.note for r in judged)
