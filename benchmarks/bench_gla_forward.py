"""Benchmark: chunked against recurrent ``gla_forward`` on CPU (side-by-side ratios in one run).

Run (benchmarks are not collected by a plain ``pytest``; give the path)::

    .venv/bin/pytest benchmarks/bench_gla_forward.py

Workload: T = 4096, B = 1, H = 4, D = E = 64, float32, CPU, an initial state, scale = 1, gates uniform in
[-0.05, 0] per key dimension (at most 3.2 nats per 64-step chunk: the FACTORED form). ``forward`` runs the
kernel on inputs that do not require grad; ``forward_backward`` takes the gradients of all five inputs with
fixed cotangents. ``test_forward_strong`` times the chunked forward on strong gates (uniform in [-2, 0]: the
FACTORED form on 16-step chunks) and very strong ones (uniform in [-40, 0]: the MASKED fallback, O(C^2 D)
elementwise work per 16-step chunk): listed, not in the ratios. The summary (``benchmarks/results/gla_forward.md``) is written at the end of the module. Times are
the minimum over the rounds (the machine is shared); timings are never asserted.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from iqa_verify.kernels.gla_forward_chunked import GateForm, chunk_plan, gate_form, gla_forward_chunked
from iqa_verify.kernels.gla_forward_recurrent import gla_forward_recurrent

RESULTS_FILE = Path(__file__).parent / "results" / "gla_forward.md"
B, T, H, D, E = 1, 4096, 4, 64, 64
KERNELS = {"recurrent": gla_forward_recurrent, "chunked": gla_forward_chunked}
# (rounds, warm-up rounds): the recurrent forward+backward takes tens of seconds per round here
ROUNDS = {("recurrent", "forward"): (3, 0), ("recurrent", "forward_backward"): (1, 0),
          ("chunked", "forward"): (10, 1), ("chunked", "forward_backward"): (5, 1), ("chunked", "forward (strong)"): (3, 0)}


@dataclass
class Results:
    timings: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)

    def record(self, key: tuple[str, str], benchmark) -> None:
        stats = getattr(benchmark.stats, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            self.timings[key] = (stats.min, stats.median, len(stats.data))

    def summary(self) -> str:
        lines = [
            "# gla_forward: chunked vs recurrent (CPU)", "",
            f"Workload: B={B}, T={T}, H={H}, D={D}, E={E}, float32, CPU, gates in [-0.05, 0] per key dimension."
            f" torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
            "Times: minimum (median) over the rounds. Written by `benchmarks/bench_gla_forward.py`.", "",
            "| case | min ms | median ms | rounds |", "|---|---:|---:|---:|",
        ]
        lines += [f"| {k} {m} | {t[0] * 1e3:.2f} | {t[1] * 1e3:.2f} | {t[2]} |" for (k, m), t in self.timings.items()]
        lines += ["", "| ratio | value |", "|---|---:|"]
        for mode in ("forward", "forward_backward"):
            slow, fast = self.timings.get(("recurrent", mode)), self.timings.get(("chunked", mode))
            if slow and fast:
                lines.append(f"| {mode}: recurrent time / chunked time | {slow[0] / fast[0]:.1f}x |")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def gla_results():
    results = Results()
    yield results
    if results.timings:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(results.summary())


def _inputs(requires_grad: bool, *, max_gate: float = 0.05) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=gen) * D**-0.5
    k = torch.randn(B, T, H, D, generator=gen) * D**-0.5
    v = torch.randn(B, T, H, E, generator=gen)
    g = -max_gate * torch.rand(B, T, H, D, generator=gen)
    s0 = torch.randn(B, H, D, E, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, s0)]


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward(benchmark, gla_results: Results, name: str) -> None:
    inputs = _inputs(requires_grad=False)
    assert gate_form(inputs[3], 64) is GateForm.FACTORED
    rounds, warmup = ROUNDS[(name, "forward")]
    o, _ = benchmark.pedantic(KERNELS[name], args=tuple(inputs), rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert o.shape == (B, T, H, E)
    gla_results.record((name, "forward"), benchmark)


@pytest.mark.parametrize(("label", "max_gate", "plan"), [
    ("strong gates, g in [-2, 0]: factored form on 16-step chunks", 2.0, (GateForm.FACTORED, 16)),
    ("very strong gates, g in [-40, 0]: masked form on 16-step chunks", 40.0, (GateForm.MASKED, 16)),
], ids=["strong", "masked"])
def test_forward_strong(benchmark, gla_results: Results, label: str, max_gate: float, plan) -> None:
    """The chunked forward where gates are too strong for 64-step factored chunks (listed, not in the ratios)."""
    inputs = _inputs(requires_grad=False, max_gate=max_gate)
    assert chunk_plan(inputs[3], 64) == plan
    rounds, warmup = ROUNDS[("chunked", "forward (strong)")]
    benchmark.pedantic(gla_forward_chunked, args=tuple(inputs), rounds=rounds, iterations=1, warmup_rounds=warmup)
    gla_results.record(("chunked", f"forward ({label})"), benchmark)


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward_backward(benchmark, gla_results: Results, name: str) -> None:
    inputs = _inputs(requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    d_o, d_final = torch.randn(B, T, H, E, generator=gen), torch.randn(B, H, D, E, generator=gen)

    def run():
        o, final = KERNELS[name](*inputs)
        return torch.autograd.grad((o, final), inputs, (d_o, d_final))

    rounds, warmup = ROUNDS[(name, "forward_backward")]
    grads = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert len(grads) == 5
    gla_results.record((name, "forward_backward"), benchmark)
