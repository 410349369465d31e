"""Benchmark: memory of implicit vs unrolled backward, and Anderson/Broyden vs plain iteration (CPU).

Run (benchmarks are not collected by a plain ``pytest``; give the path)::

    .venv/bin/pytest benchmarks/bench_iqa.py

Workload: B = 2, N = 32, Din = Dk = E = 32, float32, ``V = x W_v``, default scale.

* **Bytes saved for backward** (:func:`iqa_verify.properties.iqa.diagnostics.saved_bytes_vs_iterations`): the
  tensors autograd keeps after one forward with exactly 10 / 50 / 200 plain iterations, counted with
  ``torch.autograd.graph.saved_tensors_hooks``, for ``Implicit`` (target: flat in the iteration count)
  and ``Unrolled`` (grows linearly; target: unrolled-200 / implicit >= 20x). The inputs are rescaled to
  a local contraction rate of 0.99 so 200 float32 iterations still move the iterate.
* **Solvers** (:func:`iqa_verify.properties.iqa.diagnostics.convergence_curves`): iterations and time (pytest-benchmark,
  minimum over rounds) to reach the float32 default tolerance from ``y_0 = V`` for plain iteration,
  Anderson and Broyden, at local contraction rates ~0.9 and ~0.99 (the spectral radius of ``∂f/∂y`` at
  the consensus; :func:`~iqa_verify.properties.iqa.diagnostics.rescaled_to_rate`). Target: Anderson and Broyden
  need <= 0.5x the iterations of plain iteration at 0.9.

The summary table is written to ``benchmarks/results/iqa.md`` at the end of the module. Timings are
never asserted; the targets are reported as met / not met.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from iqa_verify.iqa.backward import Implicit, Unrolled
from iqa_verify.iqa.kernel import iqa_forward
from iqa_verify.iqa.solvers import Anderson, Broyden, FixedPointIteration
from iqa_verify.properties.iqa.diagnostics import convergence_curves, rescaled_to_rate, saved_bytes_vs_iterations

RESULTS_FILE = Path(__file__).parent / "results" / "iqa.md"
B, N, D = 2, 32, 32
ITERATIONS = (10, 50, 200)
RATES = (0.9, 0.99)
SOLVERS = {"plain": FixedPointIteration(max_iter=5000), "anderson": Anderson(max_iter=5000),
           "broyden": Broyden(max_iter=5000)}


def _inputs(rate: float) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, dtype=torch.float64, generator=gen)
    w_q, w_k, w_v = (torch.randn(D, D, dtype=torch.float64, generator=gen) * D**-0.5 for _ in range(3))
    return tuple(t.float() for t in rescaled_to_rate(x, w_q, w_k, w_v, rate=rate))


@dataclass
class Results:
    saved: dict[str, list[int]] = field(default_factory=dict)
    solvers: dict[tuple[float, str], tuple[int, bool, float | None]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            "# iqa: implicit vs unrolled memory, accelerated solvers (CPU)",
            "",
            f"Workload: B={B}, N={N}, Din=Dk=E={D}, float32, V = x W_v, default scale. torch {torch.__version__},"
            f" {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
            "Written by `benchmarks/bench_iqa.py` (see its docstring for what is measured).",
            "",
            "## Bytes saved for backward (local contraction rate 0.99)",
            "",
            "| backward | " + " | ".join(f"{k} iterations" for k in ITERATIONS) + " |",
            "|---|" + "---:|" * len(ITERATIONS),
        ]
        for mode, counts in self.saved.items():
            lines.append(f"| {mode} | " + " | ".join(f"{c:,}" for c in counts) + " |")
        if {"implicit", "unrolled"} <= set(self.saved):
            imp, unr = self.saved["implicit"], self.saved["unrolled"]
            ratio = unr[-1] / imp[-1]
            flat = len(set(imp)) == 1
            lines += ["", f"- implicit flat in the iteration count: {'yes' if flat else 'no'} (target: yes)",
                      f"- unrolled-{ITERATIONS[-1]} / implicit: {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'not met'})"]
        lines += ["", "## Solvers from y_0 = V to the float32 default tolerance (1e-6)", "",
                  "| rate | solver | iterations | converged | min time ms | iterations / plain |", "|---:|---|---:|---|---:|---:|"]
        for (rate, name), (its, conv, t) in self.solvers.items():
            plain = self.solvers.get((rate, "plain"), (None,))[0]
            rel = f"{its / plain:.2f}x" if plain else "-"
            ms = "-" if t is None else f"{t * 1e3:.2f}"
            lines.append(f"| {rate} | {name} | {its} | {conv} | {ms} | {rel} |")
        for name in ("anderson", "broyden"):
            got, plain = self.solvers.get((0.9, name)), self.solvers.get((0.9, "plain"))
            if got and plain:
                r = got[0] / plain[0]
                lines.append(f"\n- {name} at 0.9: {r:.2f}x the iterations of plain iteration"
                             f" (target <= 0.5x: {'met' if r <= 0.5 else 'not met'})")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def results() -> Results:
    r = Results()
    yield r
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(r.summary())


def test_saved_bytes(results: Results) -> None:
    x, w_q, w_k, w_v = _inputs(0.99)
    saved = saved_bytes_vs_iterations(x, w_q, w_k, w_v, None, ITERATIONS, {"implicit": Implicit(), "unrolled": Unrolled()})
    results.saved.update(saved)
    assert all(c > 0 for counts in saved.values() for c in counts)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver(benchmark, results: Results, rate: float, name: str) -> None:
    x, w_q, w_k, w_v = _inputs(rate)
    curve = convergence_curves(x, w_q, w_k, w_v, solvers={name: SOLVERS[name]})[name]
    with torch.no_grad():
        benchmark.pedantic(iqa_forward, args=(x, w_q, w_k, w_v), kwargs={"solver": SOLVERS[name]},
                           rounds=3, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark.stats, "stats", None)
    results.solvers[(rate, name)] = (curve.iterations, curve.converged, stats.min if stats is not None else None)
    assert curve.residuals and len(curve.residuals) == curve.iterations + 1
