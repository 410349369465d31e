"""Benchmark: ``iqa-verify report`` with its runs one after another (``--jobs 1``) and several at once
(``--jobs N``, N supervisor processes), side by side in one session.

Run (about 6 minutes on 2 cores with the default families; not collected by a plain ``pytest``)::

    .venv/bin/pytest benchmarks/bench_report.py
    IQA_BENCH_REPORT_FAMILIES=all .venv/bin/pytest benchmarks/bench_report.py   # the whole report (long)

Each side is ``python -m iqa_verify report --no-third-party --profile ci --family ... --jobs J`` in a fresh
process (start-up included, as a user pays it), the two sides alternated round by round so load on the
machine falls on both alike (``IQA_BENCH_ROUNDS``, default 1). Both sides must reach the same verdicts
(kernel x family x dtype: passed or not, and the same failing properties): the speed-up is worth nothing
otherwise. Issue #11's target for the whole report is under 3 minutes. Writes
``benchmarks/results/report.md``; timings are never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = Path(__file__).parent / "results" / "report.md"
FAMILIES = os.environ.get("IQA_BENCH_REPORT_FAMILIES", "gla-forward iqa").split()
ROUNDS = int(os.environ.get("IQA_BENCH_ROUNDS", "1"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
JOBS = (1, max(2, CORES))
_MEASURED: dict[int, list[dict]] = {j: [] for j in JOBS}


def _report(jobs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"iqa-bench-report-{jobs}-"))
    families = [] if FAMILIES == ["all"] else ["--family", *FAMILIES]
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env["IQA_VERIFY_DB"] = "off"  # no examples replayed from an earlier run: both sides search afresh
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "iqa_verify", "report", "--no-third-party", "--profile", "ci",
                           "--out", str(out), "--jobs", str(jobs), *families], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((out / "latest" / "report.json").read_text())
    assert data["complete"], "the report was not complete"
    verdicts = {(v["kernel"], v["family"], v["dtype"], v["device"]):
                (v["passed"], sorted(r["property_id"] for r in v["results"] if r["status"] in ("failed", "error")))
                for v in data["verdicts"]}
    return {"seconds": seconds, "verdicts": verdicts, "exit": proc.returncode}


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_report_one_after_another_and_at_once(round_: int) -> None:
    order = JOBS if round_ % 2 == 0 else tuple(reversed(JOBS))
    for jobs in order:
        _MEASURED[jobs].append(_report(jobs))
    one, many = (_MEASURED[j][-1] for j in JOBS)
    assert one["verdicts"] == many["verdicts"], "the two sides reached different verdicts"


def teardown_module() -> None:
    if not all(_MEASURED[j] for j in JOBS):
        return
    best = {j: min(m["seconds"] for m in _MEASURED[j]) for j in JOBS}
    runs = len(_MEASURED[JOBS[0]][0]["verdicts"])
    passed = sum(p for p, _ in _MEASURED[JOBS[0]][0]["verdicts"].values())
    lines = [
        "# `iqa-verify report`: runs one after another vs several at once",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_report.py` on {platform.machine()},"
        f" {CORES} cores, torch threads per process from `iqa_verify.cpu_share`; Python {platform.python_version()}.",
        f"Command: `iqa-verify report --no-third-party --profile ci --jobs J`"
        + ("" if FAMILIES == ["all"] else f" `--family {' '.join(FAMILIES)}`")
        + f": {runs} kernel x dtype runs ({passed} pass, the same on both sides), fresh process each, {ROUNDS}"
        " round(s) alternated; minimum over rounds.",
        "",
        "| jobs | seconds | speed-up |",
        "|---|---|---|",
    ]
    for j in JOBS:
        lines.append(f"| {j} | {best[j]:.1f} | {best[JOBS[0]] / best[j]:.2f}x |")
    lines += ["", "Every round: " + "; ".join(
        f"jobs {j}: " + ", ".join(f"{m['seconds']:.1f} s" for m in _MEASURED[j]) for j in JOBS)]
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
