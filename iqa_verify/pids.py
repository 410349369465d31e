"""Whether a process is running, seen from another process (the supervisor, its kernel workers, the fork server)."""

from __future__ import annotations

import os

__all__ = ["running"]


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an ended process nobody reaped runs nothing; whoever
    inherited it may never reap it). Another user's process counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux), or it ended just now
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
