"""The report's runs, several at once (``report --jobs N``): each in its own supervisor process, the same
verdicts as one after another, in the runs' order; a supervisor that dies fails its own run only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from iqa_verify.outcomes import Status
from iqa_verify.report_runs import ReportRun, execute, run_all
from iqa_verify.supervisor import InProcess, Isolated
from tests.processes import descendants, gone, kernel_workers

CHUNKED = "iqa_verify.kernels.gla_forward_chunked:gla_forward_chunked"
REPO_ROOT = Path(__file__).resolve().parent.parent
HANGS = "tests/bug_zoo/misbehaving.py:hangs_on_one_shape"


def _run(impl: str, dtype: str, out: Path, isolation=None) -> ReportRun:
    return ReportRun("gla-forward", impl, False, dtype, "cpu", "smoke", 0, out, None, isolation or Isolated(), None)


def _quiet(*_) -> None:
    pass


def _summary(verdicts):
    return [(v.kernel, v.dtype, [(r.property_id, r.status, r.examples) for r in v.results]) for v in verdicts]


def test_runs_at_once_give_the_verdicts_of_runs_one_after_another(tmp_path) -> None:
    runs = [_run(CHUNKED, "float64", tmp_path), _run(CHUNKED, "bfloat16", tmp_path)]
    seen: list[int] = []
    parallel, complete = run_all(runs, 2, on_start=_quiet, on_verdict=lambda i, v: seen.append(i), sequential=execute)
    assert complete and sorted(seen) == [0, 1]
    sequential, complete = run_all(runs, 1, on_start=_quiet, on_verdict=_quiet, sequential=execute)
    assert complete
    assert [v.dtype for v in parallel] == ["float64", "bfloat16"]  # the runs' order, not the finishing order
    assert _summary(parallel) == _summary(sequential)
    assert all(v.passed for v in parallel), [v.failed() for v in parallel]


def test_a_supervisor_that_dies_fails_its_own_run_and_the_others_go_on(tmp_path) -> None:
    """In-process kernels run inside the supervisor: one that ends the process takes its supervisor down. The
    run it was on fails saying so; the other supervisor verifies the rest; no verdict is lost."""
    (tmp_path / "dies.py").write_text("import os\ndef kernel(*args, **kwargs):\n    os._exit(7)\n")
    runs = [_run(f"{tmp_path / 'dies.py'}:kernel", "float32", tmp_path, InProcess()),
            _run(CHUNKED, "float32", tmp_path)]
    verdicts, complete = run_all(runs, 2, on_start=_quiet, on_verdict=_quiet, sequential=execute)
    assert complete and [v.kernel for v in verdicts] == [r.impl for r in runs]
    (result,) = verdicts[0].results
    assert result.status is Status.FAILED and "supervisor process exited" in result.error, result
    assert "7" in result.error  # its exit code
    assert verdicts[1].passed


def test_the_users_interrupt_ends_every_supervisor_and_worker_and_keeps_what_finished(tmp_path) -> None:
    """SIGTERM (or Ctrl-C) to ``report --jobs 2``: exit 130, a report marked incomplete with the runs that
    were under way (incomplete), and no supervisor or kernel worker left behind."""
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "iqa_verify", "report", "--family", "la-forward", "--dtype", "float32", "float64",
         "--profile", "smoke", "--out", str(tmp_path), "--jobs", "2", "--example-timeout", "100", "--impl", HANGS],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    deadline = time.monotonic() + 240
    while len(workers) < 2 and time.monotonic() < deadline:  # both supervisors have their worker
        time.sleep(1)
        workers = kernel_workers(proc.pid)
    assert len(workers) == 2, "the kernel workers never started"
    time.sleep(10)  # the pinned cases reach the shape it hangs on
    started = descendants(proc.pid)  # supervisors, their fork servers, the workers
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    report = json.loads((tmp_path / "latest" / "report.json").read_text())
    assert report["complete"] is False
    assert sorted(v["dtype"] for v in report["verdicts"]) == ["float32", "float64"]
    assert not any(v["complete"] for v in report["verdicts"])
    time.sleep(1)
    assert all(gone(pid) for pid in started), [pid for pid in started if not gone(pid)]
