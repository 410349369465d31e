"""Benchmark: ``compare`` (every tensor every property judges) in torch ops before, numpy after, side by side.

Run (under a minute; not collected by a plain ``pytest``)::

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/bench_comparison.py

``compare`` runs about 75 times per case of a recurrent family (every output and gradient of every run the
properties judge), on tensors of a few hundred elements, where the cost is per-operation overhead. At
:data:`BEFORE_COMMIT` it made some 40 small torch calls; now the same arithmetic runs on numpy copies.

Two things, in one process, the "before" module read from git at :data:`BEFORE_COMMIT`:

* **same results**: both on :data:`CASES` random comparisons (NaN, infinities, values beyond the dtype's range,
  zero references, baselines, scalar and elementwise scales, natural scales; every dtype and tolerance kind):
  every field of the two :class:`~iqa_verify.comparison.TensorCheck` must be identical (NaN equal to NaN);
* **time per call** on a typical gradient ([1, 40, 2, 4], with a baseline), minimum of 5 rounds of 2000 calls.

Writes ``benchmarks/results/comparison.md``. Timings are never asserted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from iqa_verify import comparison
from iqa_verify.tolerances import Kind, tolerance

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = Path(__file__).parent / "results" / "comparison.md"
BEFORE_COMMIT = "67ce797"
"""The last commit with the torch-ops ``compare``."""
CASES = 4000


def _before_module():
    text = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:iqa_verify/comparison.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="iqa-bench-compare-")) / "comparison_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("comparison_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comparison_before"] = module
    spec.loader.exec_module(module)
    return module


def _random(rng: random.Random, shape, gen, special: bool = True) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** rng.uniform(-30, 5)
    if special and rng.random() < 0.5:
        flat = x.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice(
                [math.nan, math.inf, -math.inf, 0.0, 1e300, -1e300, 65504.0, 7e4, 3e38, 1e-320])
    return x


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or float(a) == float(b)
    return a == b


def _arguments(i: int, rng: random.Random):
    gen = torch.Generator().manual_seed(i)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
    expected = _random(rng, shape, gen) if rng.random() >= 0.1 else torch.zeros(shape, dtype=torch.float64)
    actual = (expected + _random(rng, shape, gen, False) * rng.choice([0, 1e-8, 1e-3, 1])).to(dtype)
    if rng.random() < 0.3:
        actual = _random(rng, shape, gen).to(dtype)
    tol = tolerance(rng.choice([Kind.VALUE, Kind.GRAD, Kind.METAMORPHIC, Kind.METAMORPHIC_GRAD, Kind.RESIDUAL]), dtype)
    kw: dict = {}
    if rng.random() < 0.4:
        kw["baseline"] = (expected + _random(rng, shape, gen, False) * 1e-6).to(dtype)
    r = rng.random()
    if r < 0.25:
        kw["scale"] = rng.choice([0.0, 1e-30, 3.5, float(expected.abs().nan_to_num(0).max())])
    elif r < 0.4:
        kw["scale"] = _random(rng, shape, gen, rng.random() < 0.3).abs()
    if rng.random() < 0.3:
        kw["natural"] = _random(rng, shape, gen, rng.random() < 0.3).abs()
        kw["natural_tol"] = tolerance(Kind.NATURAL_SCALE, dtype)
    return actual, expected, tol, dtype, kw


def _per_call(fn) -> float:
    a = torch.randn(1, 40, 2, 4, generator=torch.Generator().manual_seed(0))
    r, b = a.double() + 1e-7, a.clone()
    tol = tolerance(Kind.GRAD, torch.float32)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(2000):
            fn("grad/dk", a, r, tol, dtype=torch.float32, baseline=b)
        best = min(best, (time.perf_counter() - started) / 2000)
    return best


def test_same_results_and_time_per_call() -> None:
    before = _before_module()
    rng = random.Random(0)
    differing = []
    for i in range(CASES):
        actual, expected, tol, dtype, kw = _arguments(i, rng)
        old = before.compare("p", actual, expected, tol, dtype=dtype, **kw)
        new = comparison.compare("p", actual, expected, tol, dtype=dtype, **kw)
        differing += [(i, f.name) for f in dataclasses.fields(old)
                      if f.name != "tolerance" and not _same(getattr(old, f.name), getattr(new, f.name))]
    assert not differing, differing[:10]
    times = {"before": _per_call(before.compare), "after": _per_call(comparison.compare)}
    RESULTS_FILE.write_text("\n".join([
        "# compare(): torch ops (before) vs numpy (after)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_comparison.py` on {platform.machine()},"
        f" torch threads {torch.get_num_threads()}; Python {platform.python_version()}. Before: `{BEFORE_COMMIT}`.",
        "",
        f"Same results: every TensorCheck field identical on {CASES} random comparisons (NaN, infinities, values beyond"
        " the dtype's range, zero references, baselines, scalar/elementwise/natural scales, every dtype).",
        "",
        "| | before (us/call) | after (us/call) | speed-up |",
        "|---|---|---|---|",
        f"| [1, 40, 2, 4] gradient with a baseline | {times['before'] * 1e6:.0f} | {times['after'] * 1e6:.0f} |"
        f" {times['before'] / times['after']:.2f}x |",
        "",
    ]))
