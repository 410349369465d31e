"""Every planted packed-batch (cu_seqlens) la-solve-v bug is caught by the ci profile, by the properties meant to
catch it; and the properties are n/a (not failed) for a kernel without the keyword."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess
from tests.bug_zoo.la_inverse import v_decay_forgotten
from tests.bug_zoo.la_inverse_varlen import BUGS
from tests.bug_zoo.planted import assert_caught


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_varlen_bug_is_caught(bug) -> None:
    assert_caught(bug)


def test_kernel_without_cu_seqlens_is_not_applicable() -> None:
    fam = family("la-solve-v")
    ids = tuple(p.id for p in fam.properties if "/varlen-" in p.id)
    assert len(ids) == 4
    cfg = RunConfig(fam, v_decay_forgotten, "tests/bug_zoo/la_inverse.py:v_decay_forgotten", torch.float32,
                    torch.device("cpu"), profile_named("ci"), seed=0, isolation=InProcess())
    for r in check(cfg, only=ids).results:
        if r.property_id in ids:
            assert r.status is Status.NOT_APPLICABLE, (r.property_id, r.status.label)
            assert "not varlen-capable" in r.note
