"""What a planted bug is, and the one way the zoo tests run one: ``iqa-verify check --only`` the
properties meant to catch it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import PropertyResult, Status
from iqa_verify.profiles import Profile, profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess

__all__ = ["PlantedBug", "assert_caught"]


@dataclass(frozen=True)
class PlantedBug:
    """module_file: the zoo module defining ``kernel``; family; dtype: where the bug shows; caught_by: the
    property ids that must fail; kind: what is wrong; says: a phrase (lower case) one failure message must
    contain, or empty."""

    module_file: str
    family: str
    kernel: str
    dtype: str
    caught_by: tuple[str, ...]
    kind: str
    says: str = ""

    @property
    def impl(self) -> str:
        return f"{self.module_file}:{self.kernel}"


def assert_caught(bug: PlantedBug, *, profile: Profile | None = None, device: torch.device = torch.device("cpu"),
                  kernel=None) -> dict[str, PropertyResult]:
    """Run the properties in ``bug.caught_by`` (ci profile unless given) and assert each fails with a shrunk
    counterexample and a repro line, and that a message says ``bug.says``; returns the results by id."""
    cfg = RunConfig(family(bug.family), kernel or load_kernel(bug.impl), bug.impl, getattr(torch, bug.dtype), device,
                    profile or profile_named("ci"), seed=0, isolation=InProcess())
    by_id = {r.property_id: r for r in check(cfg, only=bug.caught_by).results}
    for pid in bug.caught_by:
        r = by_id[pid]
        assert r.status is Status.FAILED, f"{bug.kernel} ({bug.kind}) not caught by {pid}: {r.status.label}"
        c = r.counterexample
        assert c is not None and c.repro.startswith("iqa-verify check ") and f"--only {pid}" in c.repro
        assert c.message and c.shapes and c.regime
    if bug.says:
        messages = [by_id[pid].counterexample.message.lower() for pid in bug.caught_by]
        assert any(bug.says.lower() in m for m in messages), f"no failure message of {bug.kernel} says {bug.says!r}"
    return by_id
