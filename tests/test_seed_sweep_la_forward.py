"""Evidence run (slow, by hand: ``pytest -m slow``): the built-in la-forward kernels hold every property
under ten seeds in float32 and bfloat16 (ci profile). Output recorded in reports/evidence/."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.loading import load_kernel
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check

FAMILY = family("la-forward")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", [k.impl for k in FAMILY.builtin_kernels], ids=lambda s: s.rsplit(":", 1)[-1])
def test_builtin_holds_under_seed(impl: str, dtype: torch.dtype, seed: int) -> None:
    cfg = RunConfig(FAMILY, load_kernel(impl), impl, dtype, torch.device("cpu"), profile_named("ci"), seed)
    verdict = check(cfg)
    failures = [f"{r.property_id}: {r.counterexample.message if r.counterexample else r.error}" for r in verdict.failed()]
    assert verdict.passed, "\n".join(failures)
