"""Every planted inverse-form bug is caught by the ci profile, by the properties meant to catch it."""

from __future__ import annotations

import pytest

from tests.bug_zoo.la_inverse import BUGS
from tests.bug_zoo.planted import assert_caught


@pytest.mark.parametrize("family_name", ["la-solve-v", "la-solve-k", "la-solve-q"])
def test_zoo_has_at_least_four_bugs_per_family(family_name: str) -> None:
    assert len({b.kind for b in BUGS if b.family == family_name}) >= 4


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_bug_is_caught(bug) -> None:
    assert_caught(bug)
