"""A fork server for kernel workers: a fresh worker in milliseconds instead of seconds.

A new interpreter spends about 3 s importing torch before it can load a kernel, and a supervisor pays that
each time it replaces a worker (a kernel that crashes on every case, shrinking a crash, a session of many
kernels). The fork server is a process of its own, started once per supervisor process as ``python -m
iqa_verify.fork_server`` in the supervisor's folder and environment, in a session of its own. It imports
torch and the worker's modules, then only forks: each child runs :func:`iqa_verify.worker.main`, exactly what
a worker started as a fresh interpreter runs (own session, printed output captured, memory cap, the kernel
loaded after the fork: the server never imports kernel code).

A fork is as clean as a fresh interpreter after ``import torch`` because the server never runs a tensor
operation, never initialises CUDA and forks only while it has a single thread (it checks before each fork
and refuses otherwise; the supervisor then starts fresh interpreters).

The server reaps its children and writes each one's exit code to the status pipe the supervisor sent with
the request; :class:`ForkedProcess` reads it and offers the part of ``subprocess.Popen`` the supervisor uses.
The server ends when the supervisor closes its end of the control socket (or dies).

Messages on the control socket (``SOCK_SEQPACKET``, one pickle per message): the server sends
``("ready", threads)``; a request is ``("fork", (impl, max_memory, supervisor_pid))`` with two file
descriptors (the worker's end of its socket pair, the status pipe's write end), answered by
``("forked", pid)`` or ``("refused", why)``.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from iqa_verify.pids import running

__all__ = ["ForkServer", "ForkedProcess", "serve"]

MESSAGE_LIMIT = 1 << 16


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


# -- the server -------------------------------------------------------------------------------------------


def _preload() -> None:
    """What every worker imports before it loads a kernel (nothing of the kernel's own)."""
    import torch  # noqa: F401
    # torch.autograd.grad imports this (and sympy) on its first call with grad_outputs: 0.6-0.8 s that every
    # worker would pay again on its first backward; importing it starts no thread
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    import iqa_verify.worker  # noqa: F401
    from iqa_verify import cpu_share, execution, loading, wire  # noqa: F401


def _child(ctl: socket.socket, wake: tuple[int, int], status_fds: dict[int, int], conn_fd: int, status_fd: int,
           request: tuple[str, int | None, int]) -> None:
    """In the forked child: drop everything of the server, become a worker, never return."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        for fd in (*wake, status_fd, *status_fds.values()):
            os.close(fd)
        os.setsid()
        from multiprocessing.connection import Connection

        from iqa_verify.worker import main

        impl, max_memory, supervisor_pid = request
        main(Connection(conn_fd), impl, max_memory, supervisor_pid)
    except SystemExit as exc:  # as an interpreter would end on it
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker itself broke: say so where its output goes
        traceback.print_exc()
        code = 1
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _reap(status_fds: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_fds.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass
            os.close(fd)


def serve(ctl: socket.socket) -> None:
    """The server's loop: fork a worker per request until the control socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C is the supervisor's
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    status_fds: dict[int, int] = {}
    _preload()
    ctl.send(pickle.dumps(("ready", _threads())))
    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        _reap(status_fds)
        if ctl not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(ctl, MESSAGE_LIMIT, 2)
        except (ConnectionError, OSError):
            return
        if not data:
            return  # the supervisor closed the socket or died
        kind, request = pickle.loads(data)
        if kind != "fork" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            ctl.send(pickle.dumps(("refused", f"bad request {kind!r} with {len(fds)} descriptors")))
            continue
        conn_fd, status_fd = fds
        threads = _threads()
        if threads != 1:
            os.close(conn_fd)
            os.close(status_fd)
            ctl.send(pickle.dumps(("refused", f"the fork server has {threads} threads (a fork would not be clean)")))
            continue
        pid = os.fork()
        if pid == 0:
            _child(ctl, (wake_r, wake_w), status_fds, conn_fd, status_fd, request)
        os.close(conn_fd)
        status_fds[pid] = status_fd  # before any reaping, so an instant death is still reported
        ctl.send(pickle.dumps(("forked", pid)))


# -- the supervisor's side -------------------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the server, seen as ``subprocess.Popen`` is: ``pid``, ``returncode``, ``poll``,
    ``wait``, ``kill``. ``lost`` is True when the server ended before it could report the exit status."""

    def __init__(self, pid: int, status_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False
        self._fd: int | None = status_fd

    def _read(self, timeout: float) -> None:
        if self.returncode is not None or self._fd is None:
            return
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return
        data = os.read(self._fd, 64)
        if data:
            self.returncode = int(data)
        elif not running(self.pid):  # the server is gone and the worker too: its status went with the server
            self.returncode, self.lost = -signal.SIGKILL, True
        else:
            return  # server gone, worker alive: poll the pid from now on
        os.close(self._fd)
        self._fd = None

    def poll(self) -> int | None:
        self._read(0)
        if self.returncode is None and self._fd is None and not running(self.pid):
            self.returncode, self.lost = -signal.SIGKILL, True
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            self._read(left)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class _Unclean(OSError):
    """The server has more than one thread after its imports: no fork from it can be clean, now or later."""


class ForkServer:
    """The supervisor's handle on its fork server: started lazily by :meth:`fork`, for the process, folder
    and environment it was started in (a change of any starts a new one: a supervisor forked by its user's
    code gets a server of its own instead of sharing its parent's socket)."""

    READY_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._where: tuple[int, str, dict[str, str]] | None = None
        self.starts = 0
        self.broken: str | None = None
        """Why the server cannot be used in this process (then workers start as fresh interpreters)."""

    def _here(self) -> tuple[int, str, dict[str, str]]:
        return os.getpid(), os.getcwd(), dict(os.environ)

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "iqa_verify.fork_server", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        child.close()
        self._ctl = parent
        self._where = self._here()
        self.starts += 1
        answer = self._answer(self.READY_TIMEOUT_S)
        if answer is None or answer[0] != "ready":
            self.close()
            raise OSError(f"the fork server did not start ({answer!r})")
        if answer[1] != 1:
            self.close()
            raise _Unclean(f"the fork server has {answer[1]} threads after importing torch (a fork would not be clean)")

    def _answer(self, timeout: float) -> tuple[str, Any] | None:
        assert self._ctl is not None
        ready, _, _ = select.select([self._ctl], [], [], timeout)
        if not ready:
            return None
        try:
            data = self._ctl.recv(MESSAGE_LIMIT)
        except OSError:
            return None
        return pickle.loads(data) if data else None

    def _usable(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._where == self._here()

    def fork(self, conn_fd: int, impl: str, max_memory: int | None) -> ForkedProcess | None:
        """A worker serving ``conn_fd`` (the child's end of its socket pair; the caller closes its copy), or
        None when the server cannot fork one (the caller then starts a fresh interpreter)."""
        if self.broken:
            return None
        for attempt in range(2):  # a server that died (or a folder or environment that changed): one restart
            try:
                if not self._usable():
                    self.close()
                    self._start()
                return self._request(conn_fd, impl, max_memory)
            except OSError as exc:
                self.close()
                if attempt or isinstance(exc, _Unclean):
                    self.broken = str(exc)
                    return None
        return None

    def _request(self, conn_fd: int, impl: str, max_memory: int | None) -> ForkedProcess:
        assert self._ctl is not None
        status_r, status_w = os.pipe()
        try:
            message = pickle.dumps(("fork", (impl, max_memory, os.getpid())))
            socket.send_fds(self._ctl, [message], [conn_fd, status_w])
        except OSError:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        answer = self._answer(30.0)
        if answer is None or answer[0] != "forked":
            os.close(status_r)
            raise OSError(f"the fork server did not fork a worker ({answer!r})")
        return ForkedProcess(answer[1], status_r)

    def close(self) -> None:
        ctl, proc = self._ctl, self._proc
        self._ctl = self._proc = None
        if self._where is not None and self._where[0] != os.getpid():
            return  # inherited through a fork of the supervisor: the parent's server, not ours to end
        if ctl is not None:
            ctl.close()  # the server sees EOF and exits
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
