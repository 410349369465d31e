"""Finding the processes a run started (kernel workers, fork servers, supervisors) from outside, as a user would."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["descendants", "kernel_workers", "gone"]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kernel_workers(root: int) -> list[int]:
    """The kernel workers (process name ``iqa-kernel``) below ``root``, however they were started."""
    out = []
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "iqa-kernel":
                out.append(pid)
        except OSError:
            pass
    return out


def gone(pid: int) -> bool:
    """Ended (a zombie counts: it runs nothing)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def whoami(kernel) -> tuple[int, int, str]:
    """For ``ExtraCall``: the worker's pid, its parent's and its process name."""
    return os.getpid(), os.getppid(), Path("/proc/self/comm").read_text().strip()


def environment_value(kernel, name: str) -> str | None:
    """For ``ExtraCall``: a variable of the worker's environment."""
    return os.environ.get(name)
