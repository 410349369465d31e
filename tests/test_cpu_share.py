"""Each supervisor on the machine takes its share of the cores (oversubscription slows 2 cores tenfold)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from iqa_verify import cpu_share


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_share, "_DIR", tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    return tmp_path


def test_the_share_divides_the_cores_among_live_supervisors(registry) -> None:
    cpu_share.register()
    assert cpu_share.threads() == 8
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cpu_share.register(other.pid)
        assert cpu_share.threads() == 4
    finally:
        other.kill()
        other.wait()
    assert cpu_share.threads() == 8  # a dead supervisor's entry is dropped
    assert not (registry / str(other.pid)).exists()


def test_omp_num_threads_caps_the_share(registry, monkeypatch) -> None:
    cpu_share.register()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_share.threads() == 1
