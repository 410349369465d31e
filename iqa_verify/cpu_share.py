"""Each running iqa-verify process takes its share of the cores, not all of them.

Two torch processes that each start as many threads as there are cores slow each other down about
tenfold on a small machine (oversubscription, measured on 2 cores). Every supervisor (a ``check``, a
``report``, each pytest-xdist worker) registers itself in a directory under the temporary folder; its
share is the cores this process may run on divided by the supervisors alive, at least one thread and
never more than ``OMP_NUM_THREADS`` when that is set. The supervisor and its kernel worker take turns
(one computes while the other waits), so both use the same share. The share is looked up again before
each kernel call and each property, so a run that starts beside another one gives back threads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from iqa_verify.pids import running

__all__ = ["register", "unregister", "cores", "threads", "apply"]

_DIR = Path(tempfile.gettempdir()) / "iqa-verify-cpu-share"


def register(pid: int | None = None) -> None:
    """Count this process (or ``pid``) among the supervisors sharing the machine."""
    _DIR.mkdir(parents=True, exist_ok=True)
    (_DIR / str(pid or os.getpid())).touch()


def unregister(pid: int | None = None) -> None:
    (_DIR / str(pid or os.getpid())).unlink(missing_ok=True)


def _live() -> int:
    n = 0
    try:
        entries = list(_DIR.iterdir())
    except FileNotFoundError:
        return 1
    for entry in entries:
        if entry.name.isdigit() and running(int(entry.name)):
            n += 1
        else:
            entry.unlink(missing_ok=True)
    return max(n, 1)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads() -> int:
    """This process's share of the cores now."""
    n = cores()
    cap = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else n
    return max(1, min(cap, n // _live()))


def apply() -> int:
    """Set torch's intra-op threads to the share (only when it changed); returns it."""
    n = threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
