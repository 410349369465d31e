"""Benchmark: the step-by-step recurrent built-ins (and the float64 references of gla/delta) before and after
their loops were reduced to the recurrence alone.

Run (about 5 minutes on one core; not collected by a plain ``pytest``)::

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/bench_recurrent_builtins.py

The built-in recurrent kernels of la-forward, gla-forward and delta-forward are the most-called kernels of the
suite's own CI (the reference-free and packed properties call them about 20 times a case, at lengths up to
1100). At :data:`BEFORE_COMMIT` each step built its outer product, decay and output with a dozen small tensor
ops (and autograd nodes); now the per-step terms are computed for all steps at once, the loop holds one fused
multiply-add per step on ``unbind`` views, and the outputs come from the stacked states in one einsum.

The float64 references of gla-forward and delta-forward (recurrences too, called for every case by values,
gradients, varlen-values and varlen-gradients) were rewritten the same way in their own code (bitwise the same
results); they are timed here as the kernels are.

Side by side in one run, the "before" kernel read from git at :data:`BEFORE_COMMIT` (its file imports only
``iqa_verify.contracts``, unchanged since), both loaded by path, alternating which goes first:

* **kernel**: one forward + backward of every input at T = 317 and T = 1100 (the ci profile's pinned lengths),
  B = 1, H = 2, D = E = 4, float32, minimum of :data:`REPEATS`;
* **check**: ``check`` of the kernel on all its family's properties (ci profile, float32, seed 0, in-process:
  only the kernel differs; both sides judged by today's references), with the verdicts compared (they must
  agree).

Writes ``benchmarks/results/recurrent_builtins.md``. Timings are never asserted.
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from iqa_verify.loading import load_kernel
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = Path(__file__).parent / "results" / "recurrent_builtins.md"
BEFORE_COMMIT = "a455f8f"
"""The last commit with the per-step-ops recurrent kernels."""
KERNELS = {
    "la-forward": "iqa_verify/kernels/la_forward_recurrent.py:la_forward_recurrent",
    "gla-forward": "iqa_verify/kernels/gla_forward_recurrent.py:gla_forward_recurrent",
    "delta-forward": "iqa_verify/kernels/delta_forward_recurrent.py:delta_forward_recurrent",
}
REFERENCES = {
    "gla-forward": "reference/gla_forward.py:gla_forward_ref",
    "delta-forward": "reference/delta_forward.py:delta_forward_ref",
}
SIDES = ("before", "after")
REPEATS = 3
_MEASURED: dict[tuple[str, str, str], float] = {}
_VERDICTS: dict[tuple[str, str], list] = {}


@pytest.fixture(scope="module")
def before_dir() -> Path:
    where = Path(tempfile.mkdtemp(prefix="iqa-bench-recurrent-"))
    for spec in (*KERNELS.values(), *REFERENCES.values()):
        path = spec.split(":")[0]
        text = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        (where / Path(path).name).write_text(text)
    return where


def _impl(side: str, fam: str, before_dir: Path, table: dict[str, str] = KERNELS) -> str:
    path, fn = table[fam].split(":")
    return f"{before_dir / Path(path).name}:{fn}" if side == "before" else f"{ROOT / path}:{fn}"


def _inputs(fam: str, T: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(T)
    B, H, D, E = 1, 2, 4, 4
    q, k = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, E, generator=gen)
    s0 = torch.randn(B, H, D, E, generator=gen)
    if fam == "gla-forward":
        return [q, k, v, -torch.rand(B, T, H, D, generator=gen), s0]
    g = -torch.rand(B, T, H, generator=gen)
    if fam == "delta-forward":
        k = torch.nn.functional.normalize(k, dim=-1)
        return [q, k, v, torch.rand(B, T, H, generator=gen), g, s0]
    return [q, k, v, g, s0]


def _time_kernel(fn, fam: str, T: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        leaves = [x.clone().requires_grad_() for x in _inputs(fam, T)]
        started = time.perf_counter()
        o, state = fn(*leaves, scale=0.5)
        torch.autograd.grad((o, state), leaves, (torch.ones_like(o), torch.ones_like(state)))
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("fam", list(KERNELS))
def test_kernel_and_check(fam: str, before_dir: Path) -> None:
    order = SIDES if len(_MEASURED) % 2 == 0 else tuple(reversed(SIDES))
    for T in (317, 1100):
        for side in order:
            _MEASURED[(fam, side, f"kernel T={T}")] = _time_kernel(load_kernel(_impl(side, fam, before_dir)), fam, T)
            if fam in REFERENCES:
                ref = load_kernel(_impl(side, fam, before_dir, REFERENCES))
                _MEASURED[(fam, side, f"reference T={T}")] = _time_kernel(ref, fam, T)
    for side in order:
        impl = _impl(side, fam, before_dir)
        cfg = RunConfig(family(fam), load_kernel(impl), impl, torch.float32, torch.device("cpu"), profile_named("ci"),
                        seed=0, isolation=InProcess())
        started = time.perf_counter()
        verdict = check(cfg)
        _MEASURED[(fam, side, "check")] = time.perf_counter() - started
        _VERDICTS[(fam, side)] = [(r.property_id, r.status.name, r.examples) for r in verdict.results]
    assert _VERDICTS[(fam, "before")] == _VERDICTS[(fam, "after")], "the two kernels reached different verdicts"


def teardown_module() -> None:
    if not _MEASURED:
        return
    lines = [
        "# Recurrent built-ins: per-step ops (before) vs one fused multiply-add per step (after)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_recurrent_builtins.py` on {platform.machine()},"
        f" torch threads {torch.get_num_threads()}; Python {platform.python_version()}. Before: the kernels at"
        f" `{BEFORE_COMMIT}`; both sides in one process, alternating. Kernel: forward + backward of every input,"
        f" B=1, H=2, D=E=4, float32, minimum of {REPEATS}. Check: all the family's properties, ci profile, float32,"
        " seed 0, in-process; both sides reached the same verdicts with the same example counts.",
        "",
        "| family | what | before (s) | after (s) | speed-up |",
        "|---|---|---|---|---|",
    ]
    for fam in KERNELS:
        for what in ("kernel T=317", "kernel T=1100", "reference T=317", "reference T=1100", "check"):
            if (fam, "after", what) not in _MEASURED:
                continue
            b, a = _MEASURED[(fam, "before", what)], _MEASURED[(fam, "after", what)]
            lines.append(f"| {fam} | {what} | {b:.3f} | {a:.3f} | {b / a:.2f}x |")
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
