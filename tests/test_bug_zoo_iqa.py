"""Every planted iqa bug is caught by the ci profile, by the properties meant to catch it, and says why."""

from __future__ import annotations

import pytest

from tests.bug_zoo.iqa import BUGS
from tests.bug_zoo.planted import assert_caught


def test_zoo_has_at_least_eight_distinct_bugs() -> None:
    assert len({b.kind for b in BUGS}) >= 8 and len({b.kernel for b in BUGS}) == len(BUGS)


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_bug_is_caught(bug) -> None:
    by_id = assert_caught(bug)
    assert all('"seed":' in by_id[pid].counterexample.spec_json for pid in bug.caught_by)
