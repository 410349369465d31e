"""Benchmark: the chunked WY / UT ``delta_forward`` against the recurrent one on CPU (ratios in one run).

Run (benchmarks are not collected by a plain ``pytest``; give the path)::

    .venv/bin/pytest benchmarks/bench_delta_forward.py

Workload: T = 4096, B = 1, H = 4, D = E = 64, float32, CPU, an initial state, scale = 1, unit keys, beta
uniform in [0, 1], log-decay uniform in [-0.05, 0] (the gated delta rule). ``forward`` runs the kernel on
inputs that do not require grad; ``forward_backward`` takes the gradients of all six inputs with fixed
cotangents. The summary (``benchmarks/results/delta_forward.md``) is written at the end of the module. Times
are the minimum over the rounds (the machine is shared); timings are never asserted.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from iqa_verify.kernels.delta_forward_chunked import delta_forward_chunked
from iqa_verify.kernels.delta_forward_recurrent import delta_forward_recurrent

RESULTS_FILE = Path(__file__).parent / "results" / "delta_forward.md"
B, T, H, D, E = 1, 4096, 4, 64, 64
KERNELS = {"recurrent": delta_forward_recurrent, "chunked": delta_forward_chunked}
# (rounds, warm-up rounds): the recurrent forward+backward takes tens of seconds per round here
ROUNDS = {("recurrent", "forward"): (3, 0), ("recurrent", "forward_backward"): (1, 0),
          ("chunked", "forward"): (10, 1), ("chunked", "forward_backward"): (5, 1)}


@dataclass
class Results:
    timings: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)

    def record(self, key: tuple[str, str], benchmark) -> None:
        stats = getattr(benchmark.stats, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            self.timings[key] = (stats.min, stats.median, len(stats.data))

    def summary(self) -> str:
        lines = [
            "# delta_forward: chunked (WY / UT) vs recurrent (CPU)", "",
            f"Workload: B={B}, T={T}, H={H}, D={D}, E={E}, float32, CPU, unit keys, beta in [0, 1], g in [-0.05, 0]."
            f" torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
            "Times: minimum (median) over the rounds. Written by `benchmarks/bench_delta_forward.py`.", "",
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
def delta_results():
    results = Results()
    yield results
    if results.timings:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(results.summary())


def _inputs(requires_grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=gen) * D**-0.5
    k = torch.randn(B, T, H, D, generator=gen)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, H, E, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    g = -0.05 * torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, D, E, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, beta, g, s0)]


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward(benchmark, delta_results: Results, name: str) -> None:
    inputs = _inputs(requires_grad=False)
    rounds, warmup = ROUNDS[(name, "forward")]
    o, _ = benchmark.pedantic(KERNELS[name], args=tuple(inputs), rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert o.shape == (B, T, H, E)
    delta_results.record((name, "forward"), benchmark)


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward_backward(benchmark, delta_results: Results, name: str) -> None:
    inputs = _inputs(requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    d_o, d_final = torch.randn(B, T, H, E, generator=gen), torch.randn(B, H, D, E, generator=gen)

    def run():
        o, final = KERNELS[name](*inputs)
        return torch.autograd.grad((o, final), inputs, (d_o, d_final))

    rounds, warmup = ROUNDS[(name, "forward_backward")]
    grads = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert len(grads) == 6
    delta_results.record((name, "forward_backward"), benchmark)
