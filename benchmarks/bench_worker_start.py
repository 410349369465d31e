"""Benchmark: kernel workers forked from a fork server (the default on Linux) against workers started as fresh
interpreters (``IQA_VERIFY_WORKER_START=fresh``, what every worker was before), side by side in one session.

Run (about 5 minutes on 2 cores; not collected by a plain ``pytest``)::

    .venv/bin/pytest benchmarks/bench_worker_start.py

Each case is an ``iqa-verify check`` in a fresh process (start-up included, as a user pays it), run once per
side, the sides alternated round by round (``IQA_BENCH_ROUNDS``, default 2) so load falls on both alike:

- ``dies-on-long-sequences``: ``tests/bug_zoo/misbehaving.py:invalid_read`` (SIGSEGV whenever T > 1), ci
  profile: every crash needs a new worker, shrinking included;
- ``dies-always``: ``misbehaving.py:hard_exit`` (``os._exit(0)`` on every call), smoke profile;
- ``correct``: the built-in chunked la-forward kernel, smoke profile: one worker for the whole run (the fork
  server cannot save anything there; it must not cost anything either).

Both sides must reach the same verdicts (every property's status and the message of each failure, up to the
kernel's process id): a faster start is worth nothing otherwise. Writes ``benchmarks/results/worker_start.md``;
timings are never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = Path(__file__).parent / "results" / "worker_start.md"
ROUNDS = int(os.environ.get("IQA_BENCH_ROUNDS", "2"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
ZOO = "tests/bug_zoo/misbehaving.py"
CASES = {
    "dies-on-long-sequences": [f"{ZOO}:invalid_read", "--family", "la-forward", "--profile", "ci",
                               "--only", "la-forward/values", "la-forward/gradients"],
    "dies-always": [f"{ZOO}:hard_exit", "--family", "la-forward", "--profile", "smoke"],
    "correct": ["iqa_verify.kernels.la_forward_chunked:la_forward_chunked", "--family", "la-forward",
                "--profile", "smoke"],
}
SIDES = ("fresh", "fork")
_MEASURED: dict[tuple[str, str], list[dict]] = {}


def _check(case: str, side: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"iqa-bench-start-{side}-"))
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env["IQA_VERIFY_DB"] = "off"
    env["IQA_VERIFY_WORKER_START"] = side
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "iqa_verify", "check", *CASES[case], "--report", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    (verdict,) = data["verdicts"]
    outcome = [(r["property_id"], r["status"], re.sub(r"\b\d{3,}\b", "N", (r.get("counterexample") or {}).get(
        "message", "").splitlines()[0] if r.get("counterexample") else "")) for r in verdict["results"]]
    return {"seconds": seconds, "outcome": outcome}


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("case", list(CASES))
def test_fresh_and_forked_workers(case: str, round_: int) -> None:
    for side in (SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))):
        _MEASURED.setdefault((case, side), []).append(_check(case, side))
    fresh, fork = (_MEASURED[(case, s)][-1] for s in SIDES)
    assert fresh["outcome"] == fork["outcome"], "the two sides reached different verdicts"


def teardown_module() -> None:
    if not _MEASURED:
        return
    lines = [
        "# Kernel workers: forked from a fork server vs started as fresh interpreters",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_worker_start.py` on {platform.machine()},"
        f" {CORES} core(s) available to the run; Python {platform.python_version()}. Each: `iqa-verify check ...` in"
        f" a fresh process (start-up included), {ROUNDS} round(s) with the sides alternated; minimum over rounds."
        " Both sides reached the same verdicts in every round.",
        "",
        "| case | fresh interpreters (s) | fork server (s) | speed-up |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        if (case, "fork") not in _MEASURED:
            continue
        best = {s: min(m["seconds"] for m in _MEASURED[(case, s)]) for s in SIDES}
        lines.append(f"| {case} | {best['fresh']:.1f} | {best['fork']:.1f} | {best['fresh'] / best['fork']:.2f}x |")
    lines += ["", "Every round: " + "; ".join(
        f"{c} {s}: " + ", ".join(f"{m['seconds']:.1f} s" for m in v) for (c, s), v in _MEASURED.items())]
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
