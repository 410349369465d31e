"""The kernel worker: a separate process that loads the kernel under test and runs the calls it is sent.

Forked by the supervisor's fork server (:mod:`iqa_verify.fork_server`, which has imported torch but never
touched CUDA) or started as a fresh interpreter (``python -m iqa_verify.worker FD IMPL MAX_MEMORY
SUPERVISOR_PID``, as spawn would) by :mod:`iqa_verify.supervisor`, named ``iqa-kernel``, in a session of its
own, it ignores SIGINT (the user's Ctrl-C is the supervisor's to handle; it then ends this process), sends
what the kernel prints to
a file that is read back after each call, optionally caps its own address space, and answers each
request with a :class:`~iqa_verify.execution.CallOutcome`. It decides nothing: whatever the kernel does
to this process (exit, crash, hang) the supervisor sees from outside.

Messages are pickles over a pipe, ``(kind, payload)``: requests ``("call", packed KernelCall fields)``,
``("extra", (fn, packed args))``, ``("stop", None)``; answers ``("ready", text)``,
``("load-error", message)`` and ``("done", packed CallOutcome fields)``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import Any

from iqa_verify.pids import running

__all__ = ["main", "send", "receive"]

OUTPUT_LIMIT = 4000
"""Characters of the kernel's printed output kept per call (head and tail)."""


def send(conn: Connection, kind: str, payload: Any) -> None:
    # plain pickle: torch's multiprocessing reductions would put tensors in shared memory
    conn.send_bytes(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> tuple[str, Any]:
    return pickle.loads(conn.recv_bytes())


class _Capture:
    """File descriptors 1 and 2 point at one temporary file; :meth:`take` returns what was written since."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(mode="w+b")
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)

    def take(self) -> str:
        sys.stdout.flush()
        sys.stderr.flush()
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        self.file.truncate()
        text = data.decode(errors="replace")
        if len(text) > OUTPUT_LIMIT:
            half = OUTPUT_LIMIT // 2
            text = f"{text[:half]}\n... ({len(text) - OUTPUT_LIMIT} characters cut) ...\n{text[-half:]}"
        return text


def _limit_memory(max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


PROCESS_NAME = b"iqa-kernel"
"""The worker's process name (``ps``, ``top``, ``pgrep -x iqa-kernel``), however it was started."""


def _name_process() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: keep the interpreter's name
        pass


def main(conn: Connection, impl: str, max_memory: int | None, supervisor_pid: int) -> None:
    """Load ``impl`` and serve requests until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _name_process()
    capture = _Capture()
    import torch

    from iqa_verify import cpu_share, wire
    from iqa_verify.errors import IqaVerifyError
    from iqa_verify.execution import CallOutcome, ExtraCall, KernelCall, execute
    from iqa_verify.loading import load_kernel

    def apply_share() -> None:
        # the supervisor's share: it registered itself, this process computes while it waits
        n = cpu_share.threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    apply_share()
    _limit_memory(max_memory)
    try:
        kernel = load_kernel(impl)
    except IqaVerifyError as exc:
        send(conn, "load-error", str(exc))
        return
    send(conn, "ready", capture.take())
    while True:
        try:
            kind, payload = receive(conn)
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        apply_share()
        if kind == "call":
            request: KernelCall | ExtraCall = KernelCall(**wire.unpack(*payload))
        else:
            fn, args = payload
            request = ExtraCall(fn, tuple(wire.unpack(*args)))
        outcome: CallOutcome = execute(kernel, request, interrupts_are_kernel=True)
        outcome.output = capture.take()
        fields = {f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)}
        try:
            packed = wire.pack(fields)
            send(conn, "done", packed)
        except Exception as exc:  # an ExtraCall value that does not pickle: say so rather than die
            outcome = CallOutcome(error=None, output=outcome.output, returned=f"unsendable result: {exc}")
            send(conn, "done", wire.pack({f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)}))
        if supervisor_pid and not running(supervisor_pid):
            return


if __name__ == "__main__":
    _fd, _impl, _memory, _pid = sys.argv[1:5]
    main(Connection(int(_fd)), _impl, int(_memory) or None, int(_pid))
