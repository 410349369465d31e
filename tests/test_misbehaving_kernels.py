"""The kernel under test never decides its own verdict (SPEC §7): each misbehaving kernel of
``tests/bug_zoo/misbehaving.py`` ends with exit 1 in bounded time and a message naming what it did,
through ``check``, ``gate``, ``report`` and ``pytest --iqa-impl``; the unusual but correct ones pass.

The zoo runs through the Python API (this process supervises; each kernel gets its worker): most replay
one case, three search and shrink (an exit, a crash, a hang), where every candidate after a death runs
in a fresh worker. The command line, gate, report and pytest plugin are run as a user would, in
subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import Isolated
from tests.processes import descendants, gone, kernel_workers

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO = "tests/bug_zoo/misbehaving.py"
_ENV = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
# D != E, T > 1: the pinned case every misbehaving kernel misbehaves on
CASE = json.dumps({"B": 1, "T": 3, "H": 1, "D": 2, "E": 3, "decay": "mild", "initial_state": True,
                   "layout": "contiguous", "magnitude": 0, "scale": 1.0, "seed": 0})
BOUND_S = 150  # each run must end well inside this (a hang is cut at --example-timeout)


def _cli(*argv: str, timeout: float = BOUND_S) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "iqa_verify", *argv], cwd=REPO_ROOT, env=_ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - started


# kernel, property meant to catch it, phrase its failure must contain
MISBEHAVING = [
    ("exits_zero", "la-forward/values", "kernel raised SystemExit: exit status 0"),
    ("hard_exit", "la-forward/values", "kernel process exited with status 0 during la-forward/values"),
    ("invalid_read", "la-forward/values", "killed by SIGSEGV"),
    ("hangs_on_one_shape", "la-forward/values", "no answer within 5 s"),
    ("raises_system_exit", "la-forward/gradients", "kernel raised SystemExit: exit status 3"),
    ("raises_keyboard_interrupt", "la-forward/values", "kernel raised KeyboardInterrupt"),
    ("raises_generator_exit", "la-forward/values", "kernel raised GeneratorExit"),
    ("returns_non_tensor", "la-forward/contract", "kernel returned dict"),
    ("allocation_fails", "la-forward/values", "can't allocate memory"),
    ("leaks_default_dtype", "la-forward/contract", "default dtype: torch.float32 -> torch.float64"),
    ("corrupts_input_in_backward", "la-forward/inputs-unchanged", "q: 6 of 6 elements changed by the call (during forward+backward)"),
    ("nondeterministic_1e7", "la-forward/deterministic", "two calls on the same input disagree"),
]
SEARCHED = {"hard_exit", "invalid_read", "hangs_on_one_shape"}


@pytest.mark.parametrize("kernel, prop, says", MISBEHAVING, ids=[m[0] for m in MISBEHAVING])
def test_misbehaving_kernel_fails_with_a_message_naming_what_happened(kernel, prop, says):
    """Through the Python API (the supervisor is this process): replay the case, or search and shrink."""
    cfg = RunConfig(family("la-forward"), None, f"{ZOO}:{kernel}", torch.float32, torch.device("cpu"),
                    profile_named("smoke"), isolation=Isolated(example_timeout_s=5))
    started = time.monotonic()
    verdict = check(cfg, only=[prop], case_json=None if kernel in SEARCHED else CASE)
    (result,) = [r for r in verdict.results if r.property_id == prop]
    assert result.status is Status.FAILED, result
    assert says in result.counterexample.message, result.counterexample.message
    assert result.counterexample.repro.startswith("iqa-verify check ")
    assert time.monotonic() - started < BOUND_S


def test_a_kernel_that_exits_zero_fails_from_the_command_line():
    """The headline false PASS: a kernel calling sys.exit(0) used to end `check` with status 0."""
    proc, seconds = _cli("check", f"{ZOO}:exits_zero", "--family", "la-forward", "--profile", "smoke")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "la-forward/contract FAILED" in proc.stdout and "kernel raised SystemExit: exit status 0" in proc.stdout
    assert seconds < BOUND_S


def test_a_crash_is_shrunk_and_its_repro_reproduces_it():
    proc, _ = _cli("check", f"{ZOO}:hangs_on_one_shape", "--family", "la-forward", "--only", "la-forward/values",
                   "--profile", "smoke", "--example-timeout", "5")
    case = json.loads(proc.stdout.split("--case '")[1].split("'")[0])
    assert case["D"] != case["E"], "the shrunk case must be one the kernel hangs on"
    replay, _ = _cli("check", f"{ZOO}:hangs_on_one_shape", "--family", "la-forward", "--only", "la-forward/values",
                     "--example-timeout", "5", "--case", json.dumps(case))
    assert replay.returncode == 1 and "no answer within 5 s" in replay.stdout


@pytest.mark.parametrize("kernel", ["reseeds_global_rng", "prints_a_lot"])
def test_unusual_but_correct_kernels_pass(kernel):
    cfg = RunConfig(family("la-forward"), None, f"{ZOO}:{kernel}", torch.float32, torch.device("cpu"),
                    profile_named("smoke"))
    verdict = check(cfg)
    assert verdict.passed, [r for r in verdict.results if r.status is not Status.PASSED]


def test_what_a_failing_kernel_printed_is_shown_with_its_failure(tmp_path):
    kernel = tmp_path / "noisy.py"
    kernel.write_text(
        "import sys\n"
        "from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent\n"
        "def noisy(q, k, v, g, initial_state=None, *, scale=1.0):\n"
        "    print('about to get the scale wrong')\n"
        "    print('x' * 100000, file=sys.stderr)\n"
        "    return la_forward_recurrent(q, k, v, g, initial_state, scale=2 * scale)\n")
    proc, _ = _cli("check", f"{kernel}:noisy", "--family", "la-forward", "--only", "la-forward/values", "--case", CASE)
    assert proc.returncode == 1
    assert "the kernel printed (cut short):" in proc.stdout and "| about to get the scale wrong" in proc.stdout
    assert "characters cut" in proc.stdout  # 100000 characters are not shown


def test_max_memory_caps_the_kernel_process():
    """The same kernel passes uncapped and fails, saying why, under --max-memory (Linux resource limit)."""
    impl = f"{ZOO}:allocates_4g_of_scratch"
    capped, _ = _cli("check", impl, "--family", "la-forward", "--only", "la-forward/values", "--case", CASE,
                     "--max-memory", "2G")
    assert capped.returncode == 1 and "can't allocate memory" in capped.stdout, capped.stdout + capped.stderr
    free, _ = _cli("check", impl, "--family", "la-forward", "--only", "la-forward/values", "--case", CASE)
    assert free.returncode == 0, free.stdout + free.stderr


def test_gate_fails_a_kernel_that_exits(tmp_path):
    proc, _ = _cli("gate", f"{ZOO}:exits_zero", "--family", "la-forward", "--profile", "smoke",
                   "--write-baseline", str(tmp_path / "b.json"))
    assert proc.returncode == 1 and "kernel raised SystemExit: exit status 0" in proc.stdout


def test_report_goes_on_past_a_crashing_kernel_and_says_what_happened(tmp_path):
    proc, _ = _cli("report", "--family", "la-forward", "--dtype", "float32", "--profile", "smoke", "--out",
                   str(tmp_path), "--impl", f"{ZOO}:invalid_read", f"{ZOO}:hard_exit",
                   "iqa_verify.kernels.la_forward_recurrent:la_forward_recurrent", timeout=400)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "latest" / "report.json").read_text())
    rows = {v["kernel"]: v for v in report["verdicts"]}
    assert len(rows) == 3 and report["complete"]
    assert rows["iqa_verify.kernels.la_forward_recurrent:la_forward_recurrent"]["passed"]
    text = (tmp_path / "latest" / "report.md").read_text()
    assert "killed by SIGSEGV" in text and "exited with status 0" in text


def test_pytest_plugin_items_fail_for_a_dying_kernel_and_the_session_goes_on(tmp_path):
    junit = tmp_path / "j.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--iqa-impl", f"{ZOO}:hard_exit",
         "--iqa-family", "la-forward", "--iqa-dtype", "float32", "--iqa-profile", "smoke", f"--junitxml={junit}",
         "-k", "values or contract", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=REPO_ROOT, env=_ENV, capture_output=True, text=True, timeout=BOUND_S)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 failed" in proc.stdout and "exited with status 0" in proc.stdout


def test_the_users_interrupt_stops_the_run_and_ends_the_worker(tmp_path):
    """SIGTERM (or Ctrl-C) to the supervisor: exit 130, what was verified written and marked incomplete,
    and no kernel worker left behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "iqa_verify", "check", f"{ZOO}:hangs_on_one_shape", "--family", "la-forward",
         "--only", "la-forward/values", "--report", str(tmp_path), "--example-timeout", "100"],
        cwd=REPO_ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    deadline = time.monotonic() + 240
    while not workers and time.monotonic() < deadline:  # wait for the worker (a loaded machine starts slowly)
        time.sleep(1)
        workers = kernel_workers(proc.pid)
    assert workers, "the kernel worker never started"
    time.sleep(15)  # the pinned cases reach the shape it hangs on
    started = descendants(proc.pid)  # the worker and what started it (the fork server, by default)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False
    time.sleep(1)
    assert all(gone(pid) for pid in started), [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()) for pid in started
                                               if not gone(pid)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs an NVIDIA GPU (none on this machine)")
@pytest.mark.parametrize("kernel, passes", [("reseeds_global_rng", True), ("exits_zero", False), ("hard_exit", False)])
def test_isolation_on_cuda(kernel, passes):
    """On CUDA the worker owns its own context (a fresh interpreter, or forked from a fork server that never
    initialised CUDA): tensors travel to and from it
    with their layouts, and a dying kernel leaves the supervisor's context untouched."""
    cfg = RunConfig(family("la-forward"), None, f"{ZOO}:{kernel}", torch.float32, torch.device("cuda"),
                    profile_named("smoke"), isolation=Isolated(example_timeout_s=60))
    verdict = check(cfg, only=["la-forward/values", "la-forward/gradients"])
    assert verdict.passed is passes, verdict.failed()
    torch.cuda.synchronize()  # the supervisor's own context is still usable
