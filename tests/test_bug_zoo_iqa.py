"""Every planted iqa bug is caught by the ci profile, by the properties meant to catch it, and says why."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from tests.bug_zoo.iqa import BUGS



def test_zoo_has_at_least_eight_distinct_bugs() -> None:
    assert len({b.kind for b in BUGS}) >= 8 and len({b.kernel for b in BUGS}) == len(BUGS)


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_bug_is_caught(bug) -> None:
    fam = family("iqa")
    cfg = RunConfig(fam, load_kernel(bug.impl), bug.impl, getattr(torch, bug.dtype), torch.device("cpu"),
                    profile_named("ci"), seed=0)
    verdict = check(cfg, only=bug.caught_by)
    by_id = {r.property_id: r for r in verdict.results}
    messages = []
    for pid in bug.caught_by:
        r = by_id[pid]
        assert r.status is Status.FAILED, f"{bug.kernel} ({bug.kind}) not caught by {pid}: {r.status.label}"
        c = r.counterexample
        assert c is not None and c.repro.startswith("iqa-verify check ") and f"--only {pid}" in c.repro
        assert f'"seed":' in c.spec_json and c.shapes and c.regime
        messages.append(c.message.lower())
    assert any(bug.says.lower() in m for m in messages), f"no failure message of {bug.kernel} says {bug.says!r}"
