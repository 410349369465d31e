"""Every planted Triton bug is caught by the properties meant to catch it (through the interpreter on CPU).

A reduced profile keeps this file fast: small shapes (the ci bounds), the family's pinned edge regimes
plus a few random cases, and a short shrink budget. Only the properties expected to catch each bug run.
The bug-free zoo kernel holds the same properties, so each failure is the planted line's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from iqa_verify.outcomes import Status
from iqa_verify.profiles import Profile, Size
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess
from iqa_verify.triton.mode import unavailable_reason
from tests.bug_zoo.planted import assert_caught

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"Triton kernels unavailable: {unavailable_reason()}")

ZOO_PROFILE = Profile("zoo", max_examples=4, size=Size.SMALL, shrink_budget_s=2.0)

if importlib.util.find_spec("triton") is not None and unavailable_reason() is None:
    from tests.bug_zoo import la_forward_triton as zoo

    BUGS = zoo.BUGS
else:  # pragma: no cover - collected but skipped
    zoo, BUGS = None, ()


def _device() -> torch.device:
    from iqa_verify.triton.mode import interpreting

    return torch.device("cpu" if interpreting() else "cuda")


def _verdict(impl: str, dtype: str, only: tuple[str, ...]):
    fam = family("la-forward")
    kernel = getattr(zoo, impl.rsplit(":", 1)[-1])
    cfg = RunConfig(fam, kernel, impl, getattr(torch, dtype), _device(), ZOO_PROFILE, seed=0, isolation=InProcess())
    return {r.property_id: r for r in check(cfg, only=only).results}


def test_zoo_has_the_four_kinds() -> None:
    assert {b.kernel for b in BUGS} == {"mask_off_by_one", "wrong_stride", "state_unwritten", "acc_in_input_dtype"}


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_triton_bug_is_caught(bug) -> None:
    assert_caught(bug, profile=ZOO_PROFILE, device=_device(), kernel=getattr(zoo, bug.kernel))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bug_free_zoo_kernel_holds(dtype: str) -> None:
    only = tuple(sorted({pid for b in BUGS if b.dtype == dtype for pid in b.caught_by}))
    by_id = _verdict(f"{zoo.__file__}:correct", dtype, only)
    for pid in only:
        assert by_id[pid].status is Status.PASSED, f"the bug-free zoo kernel fails {pid}: {by_id[pid].error or by_id[pid].counterexample}"
