"""Measurements of implicit query attention as plain data, for benchmarks and report plots.

These measure the built-in solvers and backward modes (:mod:`iqa_verify.iqa`, kernel code) beside the
float64 references; nothing here judges a kernel, and no property imports this module (the family loads
it on demand for the report's charts).

* :func:`rescaled_to_rate`: inputs whose map has a given local contraction rate at the consensus.
  At the consensus the softmax is uniform whatever the weights, so ``J = ∂f/∂y`` there is exactly
  proportional to ``c^2`` when w_q and w_k are both scaled by c: ``rho(J) = c^2 rho_0``.
* :func:`convergence_curves`: residual per iteration of each solver (``Solution.residual_trace``).
* :func:`gradient_gap_vs_unroll_depth`: ``‖g_unrolled(k) - g_implicit‖ / ‖g_implicit‖`` (float64) for
  backprop through k plain iterations from V; shrinks like ``rho^k`` (times a polynomial in k), rho the
  spectral radius of ``J`` at the fixed point.
* :func:`saved_bytes_vs_iterations`: bytes autograd saves for backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``) by a backward mode after exactly k forward iterations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from iqa_verify.iqa.backward import BackwardMode
from iqa_verify.iqa.kernel import iqa_forward_with_stats
from iqa_verify.iqa.solvers import FixedPointIteration, Solver
from iqa_verify.reference.iqa import (
    consensus_fixed_point,
    iqa_implicit_grad_ref,
    iqa_jacobian_y_ref,
    iqa_solve_ref,
    iqa_unrolled_grad_ref,
)

__all__ = [
    "ConvergenceCurve",
    "convergence_curves",
    "gradient_gap_vs_unroll_depth",
    "rescaled_to_rate",
    "saved_bytes_vs_iterations",
    "spectral_radius",
]

F64 = torch.float64


def spectral_radius(y, x, w_q, w_k, w_v=None, *, scale=None) -> torch.Tensor:
    """``max |eig(∂f/∂y)|`` at ``y`` per batch element: [B] (float64)."""
    jac = iqa_jacobian_y_ref(y, x, w_q, w_k, w_v, scale=scale)
    return torch.linalg.eigvals(jac).abs().max(dim=-1).values


def rescaled_to_rate(x, w_q, w_k, w_v=None, *, scale=None, rate: float = 0.9):
    """``(x, c w_q, c w_k, w_v)`` with ``max_b rho(∂f/∂y at the consensus) = rate`` (see the module docstring)."""
    rho0 = float(spectral_radius(consensus_fixed_point(x, w_v), x, w_q, w_k, w_v, scale=scale).max())
    c = (rate / rho0) ** 0.5
    return x, w_q * c, w_k * c, w_v


@dataclass(frozen=True)
class ConvergenceCurve:
    """solver: its repr; iterations; converged: all batch elements; residuals: worst relative residual
    per iteration (``iterations + 1`` floats); seconds: wall time of the solve."""

    solver: str
    iterations: int
    converged: bool
    residuals: list[float]
    seconds: float


def convergence_curves(x, w_q, w_k, w_v=None, *, scale=None, solvers: Mapping[str, Solver]) -> dict[str, ConvergenceCurve]:
    """Forward solve of each solver from ``y_0 = V`` (no gradient), with its residual trace and time."""
    import time

    out = {}
    for name, solver in solvers.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            _, stats = iqa_forward_with_stats(x, w_q, w_k, w_v, scale=scale, solver=solver, strict=False)
            seconds = time.perf_counter() - t0
        sol = stats.forward
        out[name] = ConvergenceCurve(repr(solver), sol.iterations, bool(sol.converged.all()), list(sol.residual_trace), seconds)
    return out


def gradient_gap_vs_unroll_depth(x, w_q, w_k, w_v, scale, g, depths: Sequence[int]) -> dict[str, object]:
    """Relative gap between unrolled and implicit gradients (all inputs together) per depth, float64.

    Returns ``{"depths": [...], "gaps": [...], "rho": spectral radius at the fixed point reached from V}``."""
    args = [t.to(F64) if t is not None else None for t in (x, w_q, w_k, w_v)]
    sol = iqa_solve_ref(*args, scale=scale)
    implicit = [t for t in iqa_implicit_grad_ref(sol.y, *args, scale, g) if t is not None]
    ref = torch.cat([t.reshape(-1) for t in implicit])
    gaps = []
    for k in depths:
        unrolled = [t for t in iqa_unrolled_grad_ref(*args, scale, g, k) if t is not None]
        gaps.append(float((torch.cat([t.reshape(-1) for t in unrolled]) - ref).norm() / ref.norm()))
    rho = float(spectral_radius(sol.y, *args, scale=scale).max())
    return {"depths": list(depths), "gaps": gaps, "rho": rho}


def saved_bytes_vs_iterations(x, w_q, w_k, w_v, scale, iterations: Sequence[int],
                              modes: Mapping[str, BackwardMode]) -> dict[str, list[int]]:
    """Bytes of the tensors autograd saves for backward during one forward with exactly k plain
    iterations (``tol`` far below reach, ``strict=False``), per backward mode and k."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w_q, w_k, w_v)]
    out: dict[str, list[int]] = {}
    for name, mode in modes.items():
        counts = []
        for k in iterations:
            total = 0

            def pack(t: torch.Tensor) -> torch.Tensor:
                nonlocal total
                total += t.numel() * t.element_size()
                return t

            solver = FixedPointIteration(max_iter=k, tol=1e-300)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y, _ = iqa_forward_with_stats(*leaves, scale=scale, solver=solver, backward=mode, strict=False)
            del y
            counts.append(total)
        out[name] = counts
    return out


def report_diagnostics(profile=None) -> list:
    """The family's report charts: convergence curves per solver at contraction 0.9 and 0.99, the
    gradient gap vs unroll depth, and bytes saved for backward vs iterations (implicit vs unrolled)."""
    from iqa_verify.diagnostics import Chart, Series
    from iqa_verify.iqa.backward import Implicit, Unrolled
    from iqa_verify.iqa.solvers import Anderson, Broyden

    gen = torch.Generator().manual_seed(0)
    B, N, D = 2, 8, 8
    x = torch.randn(B, N, D, dtype=F64, generator=gen)
    w_q, w_k, w_v = (torch.randn(D, D, dtype=F64, generator=gen) * D**-0.5 for _ in range(3))
    charts = []
    for rate in (0.9, 0.99):
        args = rescaled_to_rate(x, w_q, w_k, w_v, rate=rate)
        solvers = {"fixed-point": FixedPointIteration(max_iter=2000, tol=1e-10),
                   "anderson": Anderson(max_iter=2000, tol=1e-10), "broyden": Broyden(max_iter=2000, tol=1e-10)}
        curves = convergence_curves(*args, solvers=solvers)
        series = tuple(Series(f"{n} ({c.iterations} it.)", tuple(range(len(c.residuals))), tuple(max(r, 1e-300) for r in c.residuals))
                       for n, c in curves.items())
        charts.append(Chart(f"convergence at contraction {rate}", "iteration", "‖y_{t+1} − y_t‖ / ‖y_t‖", series,
                            logy=True, note=f"B={B}, N={N}, D={D}, float64, from y_0 = V; w_q, w_k rescaled so that"
                                            f" rho(∂f/∂y) = {rate} at the consensus"))
    args = rescaled_to_rate(x, w_q, w_k, w_v, rate=0.9)
    g = torch.randn(B, N, D, dtype=F64, generator=gen)
    gap = gradient_gap_vs_unroll_depth(*args, None, g, depths=list(range(1, 80, 4)))
    charts.append(Chart("gradient gap vs unroll depth", "unrolled iterations k", "‖g_unrolled(k) − g_implicit‖ / ‖g_implicit‖",
                        (Series("unrolled from V", tuple(gap["depths"]), tuple(max(v, 1e-300) for v in gap["gaps"])),
                         Series(f"rho^k (rho = {gap['rho']:.3f})", tuple(gap["depths"]),
                                tuple(gap["rho"] ** k for k in gap["depths"]))),
                        logy=True, note="float64; the gap shrinks geometrically at the contraction rate"))
    iters = [10, 50, 200]
    saved = saved_bytes_vs_iterations(*(t.float() if t is not None else None for t in args), None, iters,
                                      {"implicit": Implicit(), "unrolled": Unrolled()})
    charts.append(Chart("bytes saved for backward vs iterations", "forward iterations", "bytes",
                        tuple(Series(n, tuple(iters), tuple(float(b) for b in v)) for n, v in saved.items()),
                        logy=True, note="counted with torch.autograd.graph.saved_tensors_hooks (float32)"))
    return charts
