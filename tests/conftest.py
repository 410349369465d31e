"""Shared test setup: one thread per process and seeded generators.

- ``torch.set_num_threads(1)`` for the whole session: tests run with ``-n 2`` on small machines, and
  tiny-tensor ops are orders of magnitude slower with oversubscribed threads. ``OMP_NUM_THREADS=1`` is
  set for child processes (CLI and pytester subprocess runs) for the same reason; so is ``IQA_VERIFY_DB=off``
  (no example database: a test's examples must not depend on earlier runs).
- ``gen``: a ``torch.Generator`` seeded from the test's node id, so every test gets its own fixed
  random stream and no test calls ``torch.manual_seed``.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the command line keeps failing examples in .iqa-verify/ by default; test runs must not depend on history
os.environ.setdefault("IQA_VERIFY_DB", "off")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


def seed_for(text: str) -> int:
    """A stable 63-bit seed derived from ``text`` (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's node id."""
    return torch.Generator().manual_seed(seed_for(request.node.nodeid))
