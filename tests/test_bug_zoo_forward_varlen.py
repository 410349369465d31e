"""Every planted packed-batch (cu_seqlens) bug of gla-forward and delta-forward is caught by the ci profile, by the
properties meant to catch it (the la-forward ones are in test_bug_zoo_la_forward_varlen.py)."""

from __future__ import annotations

import pytest

from tests.bug_zoo import delta_forward_varlen, gla_forward_varlen
from tests.bug_zoo.planted import assert_caught

BUGS = gla_forward_varlen.BUGS + delta_forward_varlen.BUGS


@pytest.mark.parametrize("bug", BUGS, ids=[f"{b.family}-{b.kernel}" for b in BUGS])
def test_planted_varlen_bug_is_caught(bug) -> None:
    assert_caught(bug)
