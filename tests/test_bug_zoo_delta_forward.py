"""Every planted delta-forward bug is caught by the ci profile, by the properties meant to catch it."""

from __future__ import annotations

import pytest

from tests.bug_zoo.delta_forward import BUGS
from tests.bug_zoo.planted import assert_caught


def test_zoo_has_at_least_eight_distinct_bugs() -> None:
    assert len({b.kind for b in BUGS}) >= 8


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_bug_is_caught(bug) -> None:
    assert_caught(bug)
