"""Benchmark: chunked against recurrent ``la_forward`` on CPU, and this machine's matmul FLOP/s.

Run (benchmarks are not collected by a plain ``pytest``; give the path)::

    .venv/bin/pytest benchmarks/bench_la_forward.py

Workload: T = 4096, B = 1, H = 4, D = E = 64, float32, CPU, an initial state, scale = 1.
``forward`` runs the kernel on inputs that do not require grad; ``forward_backward`` runs it on
inputs that all require grad and takes the gradients of all five inputs with fixed cotangents.
The summary (``benchmarks/results/la_forward.md``, written at session end by ``conftest.py``)
reports the time ratios recurrent / chunked and the chunked kernel's achieved FLOP/s against a
large square float32 matmul timed in the same run. Times are the minimum over the rounds (the
machine is shared; the minimum is the least disturbed run); medians are listed too. Timings are
never asserted.

FLOP count of the chunked kernel (what its matmuls actually perform, padding and the masked upper
triangle of the intra-chunk products included), with N = ceil(T / C) chunks of C steps::

    forward  = B * H * N * ( 2*C*C*D      # Q K^T
                            + 2*C*C*E      # (Q K^T * M) V
                            + 2*C*D*E      # Qd S_in      (the two as one [C, C+D] @ [C+D, E])
                            + 2*C*D*E )    # Kd^T V       (each chunk's state contribution)
    backward = 2 * forward                 # each product A @ B costs dA = dC B^T and dB = A^T dC
    forward_backward = 3 * forward

Both decay forms of the chunked kernel perform these matmuls. The workload's decay
(g uniform in [-0.05, 0], at most 3.2 nats per chunk) takes the FACTORED form, the fast path;
``test_forward_masked`` times the forward on strong decay (g uniform in [-2, 0], beyond
``factored_span_limit``), which takes the MASKED fallback, with the same FLOP count.
Elementwise work (decay masks, exps, reductions, the state loop) is not counted. The matmul
reference is ``2 * n^3`` FLOPs for an n x n float32 product (n = 2048).
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from iqa_verify.kernels.la_forward_chunked import DEFAULT_CHUNK_SIZE, DecayForm, decay_form, la_forward_chunked
from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent

RESULTS_FILE = Path(__file__).parent / "results" / "la_forward.md"


@dataclass(frozen=True)
class Workload:
    B: int
    T: int
    H: int
    D: int
    E: int
    chunk_size: int

    def describe(self) -> str:
        return (
            f"B={self.B}, T={self.T}, H={self.H}, D={self.D}, E={self.E}, chunk_size={self.chunk_size},"
            " float32, CPU"
        )


@dataclass(frozen=True)
class Case:
    """One timed case: ``kernel`` (recurrent, chunked, matmul) and ``mode`` (forward, forward_backward, ...)."""

    kernel: str
    mode: str


@dataclass(frozen=True)
class Timing:
    min_s: float
    median_s: float
    rounds: int
    flops: int | None  # counted FLOPs (chunked kernel and matmul only)


@dataclass
class Results:
    """Timings collected over the session; :meth:`summary` is the markdown written to ``RESULTS_FILE``."""

    timings: dict[Case, Timing] = field(default_factory=dict)

    def record(self, case: Case, benchmark, *, flops: int | None) -> None:
        stats = getattr(benchmark.stats, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            self.timings[case] = Timing(stats.min, stats.median, len(stats.data), flops)

    def summary(self, workload: Workload) -> str:
        lines = [
            "# la_forward: chunked vs recurrent (CPU)",
            "",
            f"Workload: {workload.describe()}. torch {torch.__version__}, {torch.get_num_threads()} threads,"
            f" {platform.processor() or platform.machine()}.",
            "Times: minimum (median) over the rounds. Written by `benchmarks/bench_la_forward.py`;"
            " see benchmarks/README.md for what the numbers mean.",
            "",
            "| case | min ms | median ms | rounds | GFLOP/s (counted FLOPs / min time) |",
            "|---|---:|---:|---:|---:|",
        ]
        for case, t in self.timings.items():
            gflops = "-" if t.flops is None else f"{t.flops / t.min_s / 1e9:.1f}"
            lines.append(
                f"| {case.kernel} {case.mode} | {t.min_s * 1e3:.2f} | {t.median_s * 1e3:.2f} | {t.rounds} | {gflops} |"
            )
        lines += ["", "| ratio | value |", "|---|---:|"]
        peak = next((t for c, t in self.timings.items() if c.kernel == "matmul"), None)
        for mode in ("forward", "forward_backward"):
            slow, fast = self.timings.get(Case("recurrent", mode)), self.timings.get(Case("chunked", mode))
            if slow and fast:
                lines.append(f"| {mode}: recurrent time / chunked time | {slow.min_s / fast.min_s:.1f}x |")
            if fast and peak:
                share = (fast.flops / fast.min_s) / (peak.flops / peak.min_s)
                lines.append(f"| {mode}: chunked FLOP/s / matmul FLOP/s | {share:.0%} |")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def la_results() -> Results:
    """Collects the timings; at the end of the module writes the summary to ``RESULTS_FILE``."""
    results = Results()
    yield results
    if results.timings:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(results.summary(WORKLOAD))


WORKLOAD = Workload(B=1, T=4096, H=4, D=64, E=64, chunk_size=DEFAULT_CHUNK_SIZE)
MATMUL_N = 2048
KERNELS = {"recurrent": la_forward_recurrent, "chunked": la_forward_chunked}
# (rounds, warm-up rounds) per kernel: a stable minimum while one run stays well under 3 minutes
ROUNDS = {"recurrent": (3, 0), "chunked": (15, 1)}


def chunked_forward_flops(w: Workload) -> int:
    """Matmul FLOPs of one chunked forward pass (formula in the module docstring)."""
    C = min(w.chunk_size, w.T)
    N = math.ceil(w.T / C)
    return w.B * w.H * N * (2 * C * C * w.D + 2 * C * C * w.E + 4 * C * w.D * w.E)


def _inputs(requires_grad: bool, *, max_decay: float = 0.05) -> list[torch.Tensor]:
    """q, k, v, g, S_0 of the workload; g uniform in [-max_decay, 0]."""
    gen = torch.Generator().manual_seed(0)
    w = WORKLOAD
    q = torch.randn(w.B, w.T, w.H, w.D, generator=gen) * w.D**-0.5
    k = torch.randn(w.B, w.T, w.H, w.D, generator=gen) * w.D**-0.5
    v = torch.randn(w.B, w.T, w.H, w.E, generator=gen)
    g = -max_decay * torch.rand(w.B, w.T, w.H, generator=gen)
    s0 = torch.randn(w.B, w.H, w.D, w.E, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, s0)]


def _kwargs(name: str) -> dict:
    return {"chunk_size": WORKLOAD.chunk_size} if name == "chunked" else {}


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward(benchmark, la_results: Results, name: str) -> None:
    kernel, inputs = KERNELS[name], _inputs(requires_grad=False)
    assert decay_form(inputs[3], WORKLOAD.chunk_size) is DecayForm.FACTORED

    def run():
        return kernel(*inputs, **_kwargs(name))

    rounds, warmup = ROUNDS[name]
    o, _ = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert o.shape == (WORKLOAD.B, WORKLOAD.T, WORKLOAD.H, WORKLOAD.E)
    flops = chunked_forward_flops(WORKLOAD) if name == "chunked" else None
    la_results.record(Case(name, "forward"), benchmark, flops=flops)


def test_forward_masked(benchmark, la_results: Results) -> None:
    """The chunked forward on strong decay: the MASKED fallback (listed, not used in the ratios)."""
    inputs = _inputs(requires_grad=False, max_decay=2.0)
    assert decay_form(inputs[3], WORKLOAD.chunk_size) is DecayForm.MASKED

    def run():
        return la_forward_chunked(*inputs, **_kwargs("chunked"))

    rounds, warmup = ROUNDS["chunked"]
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    case = Case("chunked", "forward (masked form, g in [-2, 0])")
    la_results.record(case, benchmark, flops=chunked_forward_flops(WORKLOAD))


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward_backward(benchmark, la_results: Results, name: str) -> None:
    kernel, inputs = KERNELS[name], _inputs(requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    d_o = torch.randn(WORKLOAD.B, WORKLOAD.T, WORKLOAD.H, WORKLOAD.E, generator=gen)
    d_final = torch.randn(WORKLOAD.B, WORKLOAD.H, WORKLOAD.D, WORKLOAD.E, generator=gen)

    def run():
        o, final = kernel(*inputs, **_kwargs(name))
        return torch.autograd.grad((o, final), inputs, (d_o, d_final))

    rounds, warmup = ROUNDS[name]
    grads = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert len(grads) == 5
    flops = 3 * chunked_forward_flops(WORKLOAD) if name == "chunked" else None
    la_results.record(Case(name, "forward_backward"), benchmark, flops=flops)


def test_matmul_peak(benchmark, la_results: Results) -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=10, iterations=1, warmup_rounds=2)
    la_results.record(Case("matmul", f"{MATMUL_N}x{MATMUL_N} float32"), benchmark, flops=2 * MATMUL_N**3)
