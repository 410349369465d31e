"""Benchmark: the once-per-case memos of the judging code, on against off, side by side in one run.

Run (about 5 minutes on 2 cores; not collected by a plain ``pytest``)::

    .venv/bin/pytest benchmarks/bench_memos.py

Two memos of engine v2 (issue #11) share work between the properties that judge one case:

* ``la-solve-*``: the dense float64 analysis of the case's system (an SVD per batch-head, the rank-gap rule,
  the |A^-1| of Skeel's bound), ``properties/la_inverse/checks.py:_case_system``;
* ``iqa``: the float64 reference fixed point refined by Newton from the kernel's output,
  ``properties/iqa/checks.py:_ref_point``.

"Off" replaces ``PropertyContext.memoized`` by a plain call (what each property did before the memos), so only the
sharing differs. Each side runs ``check`` in-process (ci profile, float32, seed 0) on a built-in kernel; the
sides alternate, and the counts of the memoized computations (``analyse`` and ``ref_point`` calls) are
deterministic, so they compare exactly whatever the load. Verdicts and every property's worst ratio must be the
same on both sides (asserted: the memos may change nothing but the time). Writes ``benchmarks/results/memos.md``;
timings are never asserted.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import iqa_verify.properties.iqa.checks as iqa_checks
import iqa_verify.properties.la_inverse.checks as inv_checks
from iqa_verify.family import PropertyContext
from iqa_verify.loading import load_kernel
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess

RESULTS_FILE = Path(__file__).parent / "results" / "memos.md"
RUNS = {
    "la-solve-v": "iqa_verify.kernels.la_solve_v:la_solve_v",
    "la-solve-q": "iqa_verify.kernels.la_solve_q:la_solve_q",
    "iqa": "iqa_verify.iqa.kernel:iqa_forward_anderson_implicit",
}
ROUNDS = 2
_MEASURED: dict[tuple[str, str], list[dict]] = {}


def _counted(monkeypatch, counts: Counter) -> None:
    """Count the memoized computations wherever they are called from."""
    analyse, ref_point = inv_checks.analyse, iqa_checks.ref_point

    def counting_analyse(*a, **k):
        counts["analyse"] += 1
        return analyse(*a, **k)

    def counting_ref_point(*a, **k):
        counts["ref_point"] += 1
        return ref_point(*a, **k)

    monkeypatch.setattr(inv_checks, "analyse", counting_analyse)
    monkeypatch.setattr(iqa_checks, "ref_point", counting_ref_point)


def _run(fam: str, impl: str, memo: bool, monkeypatch) -> dict:
    counts: Counter = Counter()
    with monkeypatch.context() as m:
        _counted(m, counts)
        if not memo:
            m.setattr(PropertyContext, "memoized", lambda self, key, compute: compute())
        cfg = RunConfig(family(fam), load_kernel(impl), impl, torch.float32, torch.device("cpu"), profile_named("ci"),
                        seed=0, isolation=InProcess())
        t0, c0 = time.perf_counter(), time.process_time()
        verdict = check(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outcome = {r.property_id: (r.status.label, r.examples, r.worst_ratio) for r in verdict.results}
    return {"wall": wall, "cpu": cpu, "counts": dict(counts), "outcome": outcome}


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("fam", list(RUNS))
def test_memo_on_and_off(fam: str, round_: int, monkeypatch) -> None:
    torch.set_num_threads(1)
    order = (True, False) if round_ % 2 == 0 else (False, True)  # alternate which side runs first
    for memo in order:
        _MEASURED.setdefault((fam, "on" if memo else "off"), []).append(_run(fam, RUNS[fam], memo, monkeypatch))
    on, off = _MEASURED[(fam, "on")][-1], _MEASURED[(fam, "off")][-1]
    assert on["outcome"] == off["outcome"], f"{fam}: the memos changed a verdict, an example count or a ratio"


def teardown_module() -> None:
    if not _MEASURED:
        return
    lines = [
        "# Once-per-case memos: on against off",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_memos.py` on {platform.machine()},"
        f" {torch.get_num_threads()} torch thread; `check` in-process, ci profile, float32, seed 0, every property;"
        f" {ROUNDS} rounds, the sides alternating. Counts are per check (deterministic); times are the minimum over"
        " the rounds. Verdicts, example counts and worst ratios were identical on both sides (asserted).",
        "",
        "| family | kernel | memoized computation | calls off | calls on | CPU s off | CPU s on | off / on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, impl in RUNS.items():
        on, off = _MEASURED.get((fam, "on")), _MEASURED.get((fam, "off"))
        if not on or not off:
            continue
        what = "ref_point (float64 Newton)" if fam == "iqa" else "analyse (dense SVD analysis)"
        key = "ref_point" if fam == "iqa" else "analyse"
        cpu_on, cpu_off = min(r["cpu"] for r in on), min(r["cpu"] for r in off)
        lines.append(f"| {fam} | `{impl.rsplit(':', 1)[-1]}` | {what} | {off[0]['counts'].get(key, 0)} |"
                     f" {on[0]['counts'].get(key, 0)} | {cpu_off:.1f} | {cpu_on:.1f} | {cpu_off / cpu_on:.2f}x |")
    lines += ["", "Every round: " + "; ".join(
        f"{fam} {side}: " + ", ".join(f"{r['cpu']:.1f} s CPU / {r['wall']:.1f} s wall" for r in runs)
        for (fam, side), runs in sorted(_MEASURED.items())), ""]
    RESULTS_FILE.write_text("\n".join(lines))
