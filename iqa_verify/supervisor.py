"""Where the kernel under test runs: in a worker process the supervisor watches, or (for debugging) here.

The supervisor builds cases, computes references and judges; the kernel runs in a worker
(:mod:`iqa_verify.worker`) that only executes calls and returns tensors. Anything the kernel does to its
process ends in a :class:`KernelDied` the runner turns into a failing verdict naming what happened:

- exited (with any status, 0 too): "the kernel process exited with status 0 during la-forward/values";
- killed by a signal: "the kernel process was killed by SIGSEGV during ...";
- no answer within the example timeout: the worker is killed, "no answer within 60 s: ...".

A dead or unusable worker is replaced by a fresh one on the next call, so the remaining examples and
properties go on. :class:`Isolation` says which way to run: :class:`Isolated` (the default of every
command) or :class:`InProcess` (``--in-process``: pdb works, but the kernel can end or hang the run
and decide its own verdict, so it is not for gating).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from iqa_verify import cpu_share, wire
from iqa_verify.errors import IqaVerifyError
from iqa_verify.execution import CallOutcome, ExtraCall, KernelCall, execute
from iqa_verify.fork_server import ForkedProcess, ForkServer

__all__ = ["Isolation", "Isolated", "InProcess", "KernelDied", "KernelHost", "host_for", "load", "close_all",
           "parse_memory", "worker_start"]

WORKER_START_ENV = "IQA_VERIFY_WORKER_START"


def worker_start() -> str:
    """How kernel workers start: ``fork`` (from this process's fork server; the default on Linux) or
    ``fresh`` (a new interpreter each; the default elsewhere), from $IQA_VERIFY_WORKER_START."""
    value = os.environ.get(WORKER_START_ENV, "").strip().lower()
    if value in ("", "default"):
        return "fork" if sys.platform.startswith("linux") else "fresh"
    if value not in ("fork", "fresh"):
        raise IqaVerifyError(f"{WORKER_START_ENV}={value!r}: must be fork or fresh")
    return value


_FORK_SERVER: ForkServer | None = None


def _fork_server() -> ForkServer:
    global _FORK_SERVER
    if _FORK_SERVER is None:
        _FORK_SERVER = ForkServer()
    return _FORK_SERVER


@dataclass(frozen=True)
class Isolated:
    """Run the kernel in a worker process. example_timeout_s: seconds one call (forward and backward
    together) may take before the worker is killed (None: the profile's default); max_memory: bytes of
    address space the worker may map (Linux resource limit; None: no cap)."""

    example_timeout_s: float | None = None
    max_memory: int | None = None


@dataclass(frozen=True)
class InProcess:
    """Run the kernel in this process (debugging with pdb). Not safe for gating: see the module doc."""


Isolation = Isolated | InProcess


class KernelDied(Exception):
    """The worker exited, was killed or stopped answering during a call; ``message`` says which."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


def parse_memory(text: str) -> int:
    """``4G``, ``512M``, ``1.5G`` or a number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            value = int(float(t[:-1]) * units[t[-1]])
        else:
            value = int(t)
    except ValueError:
        raise IqaVerifyError(f"max_memory={text!r}: must be a size such as 4G, 512M or a number of bytes") from None
    if value < 64 * 2**20:
        raise IqaVerifyError(f"max_memory={text!r}: must be at least 64M (torch alone maps more)")
    return value


class KernelHost:
    """Runs requests against one kernel; :meth:`run` returns a CallOutcome or raises KernelDied."""

    impl: str

    def run(self, request: KernelCall | ExtraCall, during: str, timeout_s: float) -> CallOutcome:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _InProcessHost(KernelHost):
    def __init__(self, impl: str, kernel: Callable[..., Any]) -> None:
        self.impl, self.kernel = impl, kernel

    def run(self, request: KernelCall | ExtraCall, during: str, timeout_s: float) -> CallOutcome:
        if isinstance(request, KernelCall):  # the kernel gets its own copies (layouts kept), as in a worker
            fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
            request = KernelCall(**wire.unpack(*wire.pack(fields)))
        return execute(self.kernel, request, interrupts_are_kernel=False)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class _WorkerHost(KernelHost):
    """One kernel in a worker process, started on the first call and replaced after it dies."""

    def __init__(self, impl: str, max_memory: int | None) -> None:
        self.impl, self.max_memory = impl, max_memory
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self.startup_output = ""
        self.starts = 0
        self._busy = False

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and wait until the kernel is loaded (IqaVerifyError when it cannot be).

        Forked by this process's fork server (:mod:`iqa_verify.fork_server`: torch already imported, so
        milliseconds), or a fresh interpreter (``python -m iqa_verify.worker``, as spawn does, but without
        re-running the caller's ``__main__``); either way in this process's folder and environment, talking
        over a socket pair. See :func:`worker_start`."""
        from iqa_verify.worker import receive

        parent, child = socket.socketpair()
        proc: subprocess.Popen | ForkedProcess | None = None
        if worker_start() == "fork":
            proc = _fork_server().fork(child.fileno(), self.impl, self.max_memory)
        if proc is None:
            # the environment as it is (PYTHONPATH included), not this process's sys.path: folders the supervisor
            # added for its own imports (a kernel file's folder, say) could shadow packages in the worker
            proc = subprocess.Popen(
                [sys.executable, "-m", "iqa_verify.worker", str(child.fileno()), self.impl,
                 str(self.max_memory or 0), str(os.getpid())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
            )
        child.close()
        self._proc, self._conn = proc, Connection(parent.detach())
        self._busy = False
        self.starts += 1
        try:
            kind, payload = receive(self._conn)
        except (EOFError, OSError):
            what = self._exit_text()
            self._end()
            raise IqaVerifyError(f"IMPL={self.impl!r}: the kernel process ended while loading it ({what})") from None
        if kind == "load-error":
            self._end()
            raise IqaVerifyError(payload)
        self.startup_output = payload

    def _exit_text(self) -> str:
        proc = self._proc
        if proc is None:
            return "not started"
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            return "still running"
        if getattr(proc, "lost", False):
            return "ended (how is unknown: its fork server ended first, with the exit status)"
        return f"exited with status {code}" if code >= 0 else f"was killed by {_signal_name(-code)}"

    def _end(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def close(self) -> None:
        from iqa_verify.worker import send

        if self._conn is not None:
            try:
                send(self._conn, "stop", None)
            except OSError:
                pass
            if self._proc is not None:
                try:
                    self._proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
        self._end()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- calls --------------------------------------------------------------------------------------
    def run(self, request: KernelCall | ExtraCall, during: str, timeout_s: float) -> CallOutcome:
        if not self.alive:
            self._end()
            self.start()
        try:
            return self._exchange(request, during, timeout_s)
        except BaseException:
            if self._busy:  # interrupted while the kernel runs: its answer must never meet the next request
                self._end()
            raise

    def _exchange(self, request: KernelCall | ExtraCall, during: str, timeout_s: float) -> CallOutcome:
        from iqa_verify.worker import receive, send

        assert self._conn is not None
        self._busy = True
        if isinstance(request, KernelCall):
            fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
            send(self._conn, "call", wire.pack(fields))
        else:
            send(self._conn, "extra", (request.fn, wire.pack(list(request.args))))
        if not self._conn.poll(timeout_s):
            self._end()
            raise KernelDied(f"no answer within {timeout_s:g} s during {during}: the kernel hung (a deadlock or an"
                             " endless loop) or is slower than --example-timeout; the kernel process was killed",
                             "timeout")
        try:
            kind, payload = receive(self._conn)
        except (EOFError, OSError):
            what = self._exit_text()
            self._end()
            kind_ = "exit" if "exited" in what else ("signal" if "killed" in what else "lost")
            hint = {"exit": " (a kernel must return its outputs, never end the process)",
                    "signal": " (an invalid memory access, an abort or the out-of-memory killer)"}.get(kind_, "")
            raise KernelDied(f"the kernel process {what} during {during}{hint}", kind_) from None
        self._busy = False
        outcome = CallOutcome(**wire.unpack(*payload))
        if outcome.error is not None and outcome.error.unusable:
            self._end()  # out of memory or a CUDA error: the next call gets a fresh worker
        return outcome


_POOL: dict[tuple[str, int | None], _WorkerHost] = {}
POOL_SIZE = 3
"""Workers kept alive per supervisor process (the least recently used beyond this are ended)."""


def host_for(impl: str, isolation: Isolation, kernel: Callable[..., Any] | None = None) -> KernelHost:
    """The host that runs ``impl``: a worker kept for this process (reused across examples, properties
    and runs of the same kernel), or the kernel itself in this process."""
    if isinstance(isolation, InProcess):
        if kernel is None:
            from iqa_verify.loading import load_kernel

            kernel = load_kernel(impl)
        return _InProcessHost(impl, kernel)
    cpu_share.register()
    key = (impl, isolation.max_memory)
    host = _POOL.pop(key, None) or _WorkerHost(impl, isolation.max_memory)
    _POOL[key] = host  # most recently used last
    while len(_POOL) > POOL_SIZE:
        _POOL.pop(next(iter(_POOL))).close()
    if not host.alive:
        host._end()
        host.start()
    return host


def load(impl: str, isolation: Isolation) -> Callable[..., Any] | None:
    """Make ``impl`` ready to run as ``isolation`` says, so that an IMPL that cannot load is an
    IqaVerifyError before a run starts: in-process, load it and return it; isolated, start its worker (the
    kernel loads there) and return None."""
    kernel = None
    if isinstance(isolation, InProcess):
        from iqa_verify.loading import load_kernel

        kernel = load_kernel(impl)
    host_for(impl, isolation, kernel)
    return kernel


def close_all() -> None:
    """End every worker (on exit, and when the user interrupts a run)."""
    while _POOL:
        _, host = _POOL.popitem()
        host.close()
    if _FORK_SERVER is not None:
        _FORK_SERVER.close()
    cpu_share.unregister()


atexit.register(close_all)
