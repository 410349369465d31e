"""Every planted inverse-form bug is caught by the ci profile, by the properties meant to catch it."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from tests.bug_zoo.la_inverse import BUGS


@pytest.mark.parametrize("family_name", ["la-solve-v", "la-solve-k", "la-solve-q"])
def test_zoo_has_at_least_four_bugs_per_family(family_name: str) -> None:
    assert len({b.kind for b in BUGS if b.family == family_name}) >= 4


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_bug_is_caught(bug) -> None:
    fam = family(bug.family)
    cfg = RunConfig(fam, load_kernel(bug.impl), bug.impl, getattr(torch, bug.dtype), torch.device("cpu"),
                    profile_named("ci"), seed=0)
    verdict = check(cfg, only=bug.caught_by)
    by_id = {r.property_id: r for r in verdict.results}
    for pid in bug.caught_by:
        r = by_id[pid]
        assert r.status is Status.FAILED, f"{bug.kernel} ({bug.kind}) not caught by {pid}: {r.status.label}"
        c = r.counterexample
        assert c is not None and c.repro.startswith("iqa-verify check ") and f"--only {pid}" in c.repro
        assert c.message
