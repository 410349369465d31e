"""Plumbing of the fla GLA / gated delta-rule adapters (iqa_verify.adapters.fla_gated): argument mapping,
scale, g = None as zeros, the provider's entries. fla's functions are replaced by recording fakes, so a
wrong argument is the adapter's fault by construction (end-to-end runs: tests/test_third_party_ci.py)."""

from __future__ import annotations


import pytest
import torch

import iqa_verify.adapters as provider
from iqa_verify.errors import IqaVerifyError
from iqa_verify.adapters import fla_gated


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def fake(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            v = args[2]
            return torch.zeros_like(v), torch.zeros(v.shape[0], v.shape[2], args[0].shape[-1], v.shape[-1])

        return fake


@pytest.fixture
def fla(monkeypatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(fla_gated, "_fla_ops", lambda name: rec)
    return rec


def _inputs(gen, D=3, E=2):
    q, k = (torch.randn(2, 5, 2, D, generator=gen) for _ in range(2))
    return q, k, torch.randn(2, 5, 2, E, generator=gen), torch.randn(2, 2, D, E, generator=gen)


def test_gla_adapters_pass_the_gate_per_dimension_and_the_scale(fla: _Recorder, gen: torch.Generator) -> None:
    q, k, v, s0 = _inputs(gen)
    g = -torch.rand(2, 5, 2, 3, generator=gen)
    fla_gated.chunk_gla(q, k, v, g, s0, scale=0.25)
    fla_gated.fused_recurrent_gla(q, k, v, g, None, scale=2)
    (n1, a1, kw1), (n2, a2, kw2) = fla.calls
    assert n1 == "chunk_gla" and a1[3] is g and kw1 == {"scale": 0.25, "initial_state": s0, "output_final_state": True}
    assert n2 == "fused_recurrent_gla" and kw2["gk"] is g and kw2["scale"] == 2.0 and isinstance(kw2["scale"], float)
    assert kw2["initial_state"] is None and kw2["output_final_state"] is True


@pytest.mark.parametrize("name", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_delta_adapters_pass_beta_and_g_none_as_zeros(fla: _Recorder, name: str, gen: torch.Generator) -> None:
    q, k, v, s0 = _inputs(gen)
    beta = torch.rand(2, 5, 2, generator=gen)
    g = -torch.rand(2, 5, 2, generator=gen)
    getattr(fla_gated, name)(q, k, v, beta, g, s0, scale=0.5)
    getattr(fla_gated, name)(q, k, v, beta, None, None)
    (_, args, kw), (_, args0, kw0) = fla.calls
    passed = lambda a, k_: (a[3], a[4]) if name.startswith("chunk") else (k_["g"], k_["beta"])  # noqa: E731
    assert passed(args, kw)[0] is g and passed(args, kw)[1] is beta
    assert torch.equal(passed(args0, kw0)[0], torch.zeros_like(beta))
    assert kw["use_qk_l2norm_in_kernel"] is False and kw["scale"] == 0.5 and kw["initial_state"] is s0
    assert kw0["scale"] == 1.0 and kw0["initial_state"] is None and kw0["output_final_state"] is True


def test_provider_lists_the_four_kernels_under_their_families() -> None:
    listed = {(o.family, o.kernel.impl.rsplit(":", 1)[-1]) for o in provider.optional_kernels() if "fla_gated" in o.kernel.impl}
    assert listed == {("gla-forward", "chunk_gla"), ("gla-forward", "fused_recurrent_gla"),
                      ("delta-forward", "chunk_gated_delta_rule"), ("delta-forward", "fused_recurrent_gated_delta_rule")}
    assert all(o.third_party for o in provider.optional_kernels() if "fla_gated" in o.kernel.impl)


@pytest.mark.parametrize("name", ["chunk_gla", "fused_recurrent_gla", "chunk_gated_delta_rule",
                                  "fused_recurrent_gated_delta_rule"])
def test_adapters_pass_cu_seqlens_through(fla: _Recorder, name: str, gen: torch.Generator) -> None:
    q, k = (torch.randn(1, 9, 2, 3, generator=gen) for _ in range(2))
    v, s0 = torch.randn(1, 9, 2, 2, generator=gen), torch.randn(3, 2, 3, 2, generator=gen)
    cu = torch.tensor([0, 2, 7, 8])
    gate = -torch.rand(1, 9, 2, 3, generator=gen) if "gla" in name else -torch.rand(1, 9, 2, generator=gen)
    args = (q, k, v, gate) if "gla" in name else (q, k, v, torch.rand(1, 9, 2, generator=gen), gate)
    getattr(fla_gated, name)(*args, s0, cu_seqlens=cu)
    (_, _, kw), = fla.calls
    assert kw["cu_seqlens"] is cu and kw["initial_state"] is s0
    with pytest.raises(IqaVerifyError, match=r"initial_state.shape=.*\[N, H, D, E\]"):
        getattr(fla_gated, name)(*args, s0[:2], cu_seqlens=cu)
