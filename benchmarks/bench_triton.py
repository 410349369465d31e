"""Timings of the suite's Triton kernels against the PyTorch ones (and fla's ``chunk_simple_gla`` if installed).

One command on a GPU machine::

    .venv/bin/python benchmarks/bench_triton.py [--dtype bfloat16] [--reps 50]

prints a table: kernel, shape, forward ms, forward+backward ms (median of ``--reps`` timed runs after
warm-up, ``triton.testing.do_bench``), and the speed-up against the PyTorch chunked kernel of the same
family. Without CUDA it prints why it skips and exits 0: interpreter timings on CPU are not
performance numbers (every Triton op runs as a NumPy call per program).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHAPES_LA = [(4, 2048, 8, 64, 64), (2, 8192, 16, 128, 128)]  # B, T, H, D, E
SHAPES_SOLVE = [(2, 2048, 8, 64, 64)]
SHAPES_IQA_MAP = [(8, 512, 64, 64), (4, 2048, 128, 64)]  # B, N, E, Dk


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    fwd_ms: float
    fwdbwd_ms: float | None
    speedup: str = ""


def skip_reason() -> str | None:
    """Why the benchmark cannot produce performance numbers here (None: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'iqa-verify[triton]')"
    if not torch.cuda.is_available():
        return "CUDA is not available: Triton would run in its CPU interpreter, whose timings are not performance numbers"
    if os.environ.get("IQA_TRITON_INTERPRET", "auto") == "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return "IQA_TRITON_INTERPRET=1 / TRITON_INTERPRET=1 forces the interpreter: unset it to benchmark compiled kernels"
    return None


def _time(fn: Callable[[], object], reps: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, rep=reps, return_mode="median"))


def _fwdbwd(fn: Callable[..., object], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])
        for x in leaves:
            x.grad = None

    return run


def bench_la_forward(dtype: torch.dtype, reps: int) -> list[Row]:
    from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
    from iqa_verify.triton.la_forward import la_forward_triton

    kernels: dict[str, Callable] = {"pytorch la_forward_chunked": la_forward_chunked, "triton la_forward_triton": la_forward_triton}
    if importlib.util.find_spec("fla") is not None:
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_kernel(q, k, v, g, s0, *, scale):
            return chunk_simple_gla(q, k, v, g, scale=scale, initial_state=s0, output_final_state=True)

        kernels["fla chunk_simple_gla"] = fla_kernel
    rows = []
    for B, T, H, D, E in SHAPES_LA:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k = (torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
        v = torch.randn(B, T, H, E, device="cuda", generator=gen).to(dtype)
        g = (-0.05 * torch.rand(B, T, H, device="cuda", generator=gen)).to(dtype)
        s0 = torch.randn(B, H, D, E, device="cuda", generator=gen).to(dtype)
        leaves = [x.requires_grad_() for x in (q, k, v, g, s0)]
        base = None
        for name, fn in kernels.items():
            call = lambda fn=fn: fn(q, k, v, g, s0, scale=D**-0.5)  # noqa: E731
            with torch.no_grad():
                fwd = _time(call, reps)
            both = _time(_fwdbwd(call, leaves), reps)
            base = base or both
            rows.append(Row(name, f"B={B} T={T} H={H} D={D} E={E}", fwd, both, f"{base / both:.2f}x"))
    return rows


def bench_la_solve_v(reps: int) -> list[Row]:
    from iqa_verify.kernels.la_solve_v import la_solve_v
    from iqa_verify.triton.la_solve_v import la_solve_v_triton

    rows = []
    for B, T, H, D, E in SHAPES_SOLVE:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, T, H, D, device="cuda", generator=gen)
        k = 2 * q / (q * q).sum(-1, keepdim=True) + 0.1 * torch.randn(B, T, H, D, device="cuda", generator=gen)
        o = torch.randn(B, T, H, E, device="cuda", generator=gen)
        g = -0.05 * torch.rand(B, T, H, device="cuda", generator=gen)
        base = None
        for name, fn in {"pytorch la_solve_v": la_solve_v, "triton la_solve_v_triton": la_solve_v_triton}.items():
            with torch.no_grad():
                fwd = _time(lambda fn=fn: fn(q, k, o, g, scale=0.5), reps)
            base = base or fwd
            rows.append(Row(name, f"B={B} T={T} H={H} D={D} E={E} float32", fwd, None, f"{base / fwd:.2f}x"))
    return rows


def bench_iqa_map(reps: int) -> list[Row]:
    from iqa_verify.iqa.kernel import iqa_map
    from iqa_verify.triton.iqa_map import iqa_map_triton

    rows = []
    for B, N, E, Dk in SHAPES_IQA_MAP:
        gen = torch.Generator(device="cuda").manual_seed(0)
        y, v = (torch.randn(B, N, E, device="cuda", generator=gen) for _ in range(2))
        k = torch.randn(B, N, Dk, device="cuda", generator=gen)
        w = 0.1 * torch.randn(E, Dk, device="cuda", generator=gen)
        leaves = [x.requires_grad_() for x in (y, k, v, w)]
        base = None
        for name, fn in {"pytorch iqa_map": iqa_map, "triton iqa_map_triton": iqa_map_triton}.items():
            call = lambda fn=fn: fn(y, k, v, w, Dk**-0.5)  # noqa: E731
            with torch.no_grad():
                fwd = _time(call, reps)
            both = _time(_fwdbwd(call, leaves), reps)
            base = base or both
            rows.append(Row(name, f"B={B} N={N} E={E} Dk={Dk} float32", fwd, both, f"{base / both:.2f}x"))
    return rows


def print_table(rows: list[Row]) -> None:
    header = ("kernel", "shape", "fwd ms", "fwd+bwd ms", "vs pytorch")
    cells = [(r.kernel, r.shape, f"{r.fwd_ms:.3f}", "-" if r.fwdbwd_ms is None else f"{r.fwdbwd_ms:.3f}", r.speedup) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in [header, tuple("-" * w for w in widths), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="la-forward dtype")
    p.add_argument("--reps", type=int, default=100, help="milliseconds of timed repetitions per measurement")
    args = p.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"bench_triton: skipped: {reason}")
        return 0
    rows = bench_la_forward(getattr(torch, args.dtype), args.reps) + bench_la_solve_v(args.reps) + bench_iqa_map(args.reps)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
