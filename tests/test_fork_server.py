"""Kernel workers forked from a fork server (the default on Linux) behave as workers started as fresh
interpreters: same verdicts for a dying kernel, the supervisor's environment, their own process; and a kernel
that kills the fork server only fails itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from iqa_verify import supervisor
from iqa_verify.errors import IqaVerifyError
from iqa_verify.execution import ExtraCall
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import Isolated, worker_start
from tests.processes import environment_value, gone, whoami

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc: Linux only")

GOOD = "iqa_verify.kernels.la_forward_chunked:la_forward_chunked"
ZOO = "tests/bug_zoo/misbehaving.py"


def _host(impl: str = GOOD) -> supervisor._WorkerHost:
    host = supervisor._WorkerHost(impl, None)
    host.start()
    return host


def _ask(host, fn, *args):
    outcome = host.run(ExtraCall(fn, args), "a test", 60)
    assert outcome.error is None, outcome.error
    return outcome.value


def test_workers_are_forked_from_one_server_and_are_processes_of_their_own(monkeypatch) -> None:
    monkeypatch.delenv(supervisor.WORKER_START_ENV, raising=False)
    assert worker_start() == "fork"
    first = _host()
    server = supervisor._fork_server()
    starts, server_pid = server.starts, server._proc.pid
    seen = [_ask(first, whoami)]
    first.close()
    for _ in range(3):
        host = _host()
        seen.append(_ask(host, whoami))
        host.close()
        assert gone(seen[-1][0])  # closed: the worker ended and was reaped
    assert server.starts == starts, "each worker should come from the same server"
    assert len({pid for pid, _, _ in seen}) == 4
    assert {(parent, name) for _, parent, name in seen} == {(server_pid, "iqa-kernel")}
    # how much faster than fresh interpreters: benchmarks/bench_worker_start.py (never timed in a test)


def test_a_worker_sees_the_supervisors_environment_as_it_is_now(monkeypatch) -> None:
    monkeypatch.setenv("IQA_VERIFY_TEST_MARK", "before")
    host = _host()
    assert _ask(host, environment_value, "IQA_VERIFY_TEST_MARK") == "before"
    host.close()
    monkeypatch.setenv("IQA_VERIFY_TEST_MARK", "after")  # a changed environment: a server started in it
    host = _host()
    assert _ask(host, environment_value, "IQA_VERIFY_TEST_MARK") == "after"
    host.close()


def test_fresh_interpreters_on_request(monkeypatch) -> None:
    monkeypatch.setenv(supervisor.WORKER_START_ENV, "fresh")
    host = _host()
    assert isinstance(host._proc, subprocess.Popen)
    pid, parent, name = _ask(host, whoami)
    assert parent == os.getpid() and name == "iqa-kernel"
    host.close()
    monkeypatch.setenv(supervisor.WORKER_START_ENV, "spawn")
    with pytest.raises(IqaVerifyError, match="IQA_VERIFY_WORKER_START='spawn': must be fork or fresh"):
        worker_start()


@pytest.mark.parametrize("start", ["fork", "fresh"])
@pytest.mark.parametrize(("kernel", "says"), [("hard_exit", "exited with status 0"),
                                              ("invalid_read", "was killed by SIGSEGV")])
def test_a_dying_kernel_fails_the_same_way_however_its_worker_started(monkeypatch, start, kernel, says) -> None:
    monkeypatch.setenv(supervisor.WORKER_START_ENV, start)
    cfg = RunConfig(family("la-forward"), None, f"{ZOO}:{kernel}", torch.float32, torch.device("cpu"),
                    profile_named("smoke"), isolation=Isolated(example_timeout_s=60))
    verdict = check(cfg, only=["la-forward/values"])
    (result,) = [r for r in verdict.results if r.property_id == "la-forward/values"]
    assert result.status is Status.FAILED and says in result.counterexample.message, result


def test_a_kernel_that_kills_its_fork_server_fails_alone(tmp_path, monkeypatch) -> None:
    """The server is the worker's parent: a kernel can kill it. That kernel's run fails (its worker ended,
    how is lost with the server); the next worker comes from a new server."""
    monkeypatch.delenv(supervisor.WORKER_START_ENV, raising=False)
    (tmp_path / "kills.py").write_text(
        "import os, signal\n"
        "def kernel(*args, **kwargs):\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n"
        "    os._exit(5)\n")
    cfg = RunConfig(family("la-forward"), None, f"{tmp_path / 'kills.py'}:kernel", torch.float32,
                    torch.device("cpu"), profile_named("smoke"), isolation=Isolated(example_timeout_s=60))
    verdict = check(cfg, only=["la-forward/values"])
    (result,) = [r for r in verdict.results if r.property_id == "la-forward/values"]
    assert result.status is Status.FAILED, result
    assert "the kernel process ended" in result.counterexample.message, result.counterexample.message
    host = _host()
    assert _ask(host, whoami)[2] == "iqa-kernel"
    host.close()


def test_the_server_ends_with_its_supervisor(tmp_path) -> None:
    """A supervisor killed outright (no clean-up) leaves no fork server behind."""
    script = ("import sys, time\n"
              "from iqa_verify import supervisor\n"
              "from iqa_verify.supervisor import Isolated, host_for\n"
              f"host_for({GOOD!r}, Isolated())\n"
              "print(supervisor._fork_server()._proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != supervisor.WORKER_START_ENV}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    server = int(proc.stdout.readline())
    assert not gone(server)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while not gone(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(server)


def test_a_forked_supervisor_gets_a_server_of_its_own(monkeypatch) -> None:
    """User code that forks the supervisor process (multiprocessing's fork start method) must not share the
    parent's control socket: the child starts its own server and leaves the parent's alone."""
    monkeypatch.delenv(supervisor.WORKER_START_ENV, raising=False)
    host = _host()
    server = supervisor._fork_server()
    parent_server = server._proc.pid
    host.close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no torch computation here, only process plumbing
        code = 1
        try:
            child_host = _host()
            worker, parent, _ = _ask(child_host, whoami)
            child_host.close()
            supervisor.close_all()
            os.write(write, f"{parent}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_server = int(os.read(read, 64) or b"0")
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_server not in (0, parent_server)
    assert server._proc.pid == parent_server and server._proc.poll() is None  # the parent's server lives on
    host = _host()
    assert _ask(host, whoami)[1] == parent_server
    host.close()
