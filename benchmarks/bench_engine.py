"""Benchmark: the engine's own cost, side by side in one run.

Run (about 15 minutes on 2 cores; not collected by a plain ``pytest``)::

    .venv/bin/pytest benchmarks/bench_engine.py

Two comparisons, each as ``iqa-verify check IMPL --family F --profile ci --dtype float32`` in a fresh
process (start-up included, as a user pays it), the runs interleaved so that load on the machine falls
on both sides alike:

* **Engine v2 against v1** (issue #11): v1 is the engine before one-evaluation-per-case, checked out
  from git at :data:`V1_COMMIT` into a temporary worktree and run in-process (v1 had no isolation),
  against v2 run in-process too, so only the engine differs. Kernels: the built-in chunked
  ``la-forward`` kernel, a plain PyTorch loop over time (``benchmarks/kernels/plain_loop.py``), and an
  independent implicit-function-theorem ``iqa`` kernel (``benchmarks/kernels/iqa_ift.py``), on the
  properties both engines have (v2's la-forward has six more). The two benchmark kernels count their calls
  (``$IQA_BENCH_CALLS``): kernel calls per case = calls / cases judged per property (v1 runs each case once
  per property, v2 once for all).
  Targets: at least 3x faster for the plain loop and the IFT kernel; at most 3 kernel calls per case.
* **Isolation** (issue #10): v2 with the kernel in a worker process against ``--in-process``, for the
  built-in chunked kernel. Target: at most 10% slower.

Writes ``benchmarks/results/engine.md``. Timings are never asserted.
"""

from __future__ import annotations

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
RESULTS_FILE = Path(__file__).parent / "results" / "engine.md"
V1_COMMIT = "764985a"
"""The last commit before the worker process and one-evaluation-per-case (the engine of issue #11's 'today')."""

KERNELS = {
    "builtin-chunked": ("iqa_verify.kernels.la_forward_chunked:la_forward_chunked", "la-forward", False),
    "plain-loop": ("benchmarks/kernels/plain_loop.py:la_forward_loop", "la-forward", True),
    "iqa-ift": ("benchmarks/kernels/iqa_ift.py:iqa_forward_ift", "iqa", True),
}
# the properties both engines have (v2's la-forward adds six reference-free and varlen ones): same work
SAME_PROPERTIES = {
    "la-forward": ["--only", *(f"la-forward/{p}" for p in ("contract", "values", "gradients", "finite",
                                                            "inputs-unchanged", "no-uninit-reads", "deterministic"))],
    "iqa": [],
}
_MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def v1_tree():
    where = Path(tempfile.mkdtemp(prefix="iqa-engine-v1-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(where), V1_COMMIT], cwd=ROOT, check=True,
                   capture_output=True)
    yield where
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)


def _check(tree: Path, impl: str, fam: str, *extra: str) -> dict:
    """One ``check`` in a fresh process from ``tree``: seconds, exit status, kernel calls, cases judged."""
    calls = Path(tempfile.mkstemp(prefix="iqa-calls-")[1])
    env = {**os.environ, "PYTHONPATH": str(tree), "IQA_BENCH_CALLS": str(calls), "IQA_VERIFY_DB": "off"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    started = time.perf_counter()
    if impl.split(":")[0].endswith(".py"):  # a kernel file of this repository, by absolute path
        impl = str(ROOT / impl)
    # cwd = the tree: `python -m` puts the current folder first on sys.path, so it decides which engine runs
    proc = subprocess.run([sys.executable, "-m", "iqa_verify", "check", impl, "--family", fam, "--profile", "ci",
                           "--dtype", "float32", *extra], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    n_calls = len(calls.read_text().splitlines())
    calls.unlink()
    examples = [int(m) for m in re.findall(r"^\s+\w+\s+\S+\s+(\d+) examples", proc.stderr, re.M)]
    return {"seconds": seconds, "rc": proc.returncode, "calls": n_calls, "examples": examples,
            "tail": (proc.stdout + proc.stderr)[-2000:]}


@pytest.mark.parametrize("name", list(KERNELS))
def test_engine_v1_vs_v2(name: str, v1_tree: Path) -> None:
    impl, fam, counts = KERNELS[name]
    v1 = _check(v1_tree, impl, fam, *SAME_PROPERTIES[fam])
    v2 = _check(ROOT, impl, fam, "--in-process", *SAME_PROPERTIES[fam])
    assert v1["rc"] == 0 and v2["rc"] == 0, (v1["tail"], v2["tail"])
    _MEASURED[f"engine/{name}"] = {"v1": v1, "v2": v2, "counts": counts}


def test_isolation_overhead() -> None:
    impl, fam, _ = KERNELS["builtin-chunked"]
    runs = {"in-process": [], "isolated": []}
    for _ in range(3):
        runs["in-process"].append(_check(ROOT, impl, fam, "--in-process"))
        runs["isolated"].append(_check(ROOT, impl, fam))
    assert all(r["rc"] == 0 for rs in runs.values() for r in rs)
    _MEASURED["isolation"] = runs


def _calls_per_case(run: dict) -> str:
    """Kernel calls to judge every property on one case: v1 builds each case once per property (the same
    specs, a search each), v2 once for all; both divide the calls by the cases per property."""
    if not run["calls"] or not run["examples"]:
        return "n/a"
    return f"{run['calls'] / max(run['examples']):.2f}"


def teardown_module() -> None:
    if not _MEASURED:
        return
    lines = ["# Engine benchmark", "", f"Machine: {platform.machine()}, {os.cpu_count()} cores;"
             f" `iqa-verify check IMPL --profile ci --dtype float32`, a fresh process each (start-up included).", ""]
    lines += ["## Engine v2 (one evaluation per case) against v1 (a search per property), both in-process", "",
              "| kernel | v1 s | v2 s | v1 / v2 | calls per case v1 | calls per case v2 |", "|---|---|---|---|---|---|"]
    for key, m in _MEASURED.items():
        if not key.startswith("engine/"):
            continue
        v1, v2 = m["v1"], m["v2"]
        lines.append(f"| {key.split('/')[1]} | {v1['seconds']:.1f} | {v2['seconds']:.1f} |"
                     f" {v1['seconds'] / v2['seconds']:.2f}x | {_calls_per_case(v1)} | {_calls_per_case(v2)} |")
    if "isolation" in _MEASURED:
        runs = _MEASURED["isolation"]
        med = {k: sorted(r["seconds"] for r in rs)[len(rs) // 2] for k, rs in runs.items()}
        lines += ["", "## Isolation: the kernel in a worker process against --in-process (built-in chunked kernel)", "",
                  "| mode | runs (s) | median s |", "|---|---|---|"]
        for k, rs in runs.items():
            runs_text = ", ".join(f"{r['seconds']:.1f}" for r in rs)
            lines.append(f"| {k} | {runs_text} | {med[k]:.1f} |")
        lines += ["", f"isolated / in-process: **{med['isolated'] / med['in-process']:.3f}** (target <= 1.10)"]
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
