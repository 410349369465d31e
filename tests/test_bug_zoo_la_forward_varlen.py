"""Every planted packed-batch (cu_seqlens) bug is caught by the ci profile, by the properties meant to catch it."""

from __future__ import annotations

import pytest

from tests.bug_zoo.la_forward_varlen import BUGS
from tests.bug_zoo.planted import assert_caught


@pytest.mark.parametrize("bug", BUGS, ids=[b.kernel for b in BUGS])
def test_planted_varlen_bug_is_caught(bug) -> None:
    assert_caught(bug)
