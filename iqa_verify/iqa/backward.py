"""Backward modes of a fixed-point layer ``y* = f(y*, θ)`` as typed objects.

Each mode's :meth:`~BackwardMode.run` takes the map ``fn: y -> f(y, θ)`` (a closure whose autograd graph
reaches the parameters θ), the start ``y0`` (which may itself depend on θ) and the forward solver, and
returns ``(y, forward Solution, BackwardStats)``. The returned ``y`` carries the forward solver's
value; only its gradient differs between modes::

    Implicit(solver)   exact (IFT):  u = g + (∂f/∂y)^T u   (solved by ``solver`` with VJPs),
                       dL/dθ = u^T ∂f/∂θ at y*
    Unrolled()         backprop through every forward iteration from y0 (the forward solver run under
                       autograd); exact in the limit (error ~ ρ^k for plain iteration with rate ρ)
    Truncated(k)       backprop through k applications of f from y* (detached):
                       dL/dθ = sum_{t<k} g^T (∂f/∂y)^t ∂f/∂θ   (truncated Neumann series)
    OneStep()          Jacobian-free: dL/dθ = g^T ∂f/∂θ at y* (Truncated(1))

``exact`` (a class attribute) says which modes give the exact implicit gradient; ``claim`` is what a
kernel using the mode declares to the ``iqa`` family (:mod:`iqa_verify.iqa_claims`: data, no
implementation). The value trick ``y = y* + (z - z.detach())`` keeps the solver's value bitwise while
routing the gradient through ``z``. An adjoint solve that fails raises
:class:`~iqa_verify.iqa.solvers.ConvergenceError` during ``backward()``: a wrong (or zero) gradient is
never returned silently. Double backward is not supported.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from iqa_verify import iqa_claims
from iqa_verify.errors import check_at_least
from iqa_verify.iqa.solvers import Anderson, FixedPointIteration, Solution, Solver

__all__ = ["BackwardMode", "BackwardStats", "Implicit", "OneStep", "Truncated", "Unrolled"]

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BackwardStats:
    """Filled during ``backward()``: the adjoint solves of an :class:`Implicit` mode (one per call)."""

    adjoint: list[Solution] = field(default_factory=list)


class BackwardMode(abc.ABC):
    """How gradients flow through the fixed point. ``exact``: gives the exact implicit gradient."""

    exact: ClassVar[bool]

    @property
    @abc.abstractmethod
    def claim(self) -> iqa_claims.GradientClaim:
        """The gradient this mode gives, as the claim a kernel declares (:class:`~iqa_verify.iqa_claims.IqaKernelInfo`)."""

    def run(self, fn: Map, y0: torch.Tensor, solver: Solver) -> tuple[torch.Tensor, Solution, BackwardStats]:
        """Solve ``y = fn(y)`` from ``y0`` with ``solver`` and attach this mode's gradient (none when
        autograd is disabled, e.g. under ``torch.no_grad()``)."""
        if not torch.is_grad_enabled():
            sol = _solve_detached(fn, y0, solver)
            return sol.y, sol, BackwardStats()
        return self._run(fn, y0, solver)

    @abc.abstractmethod
    def _run(self, fn: Map, y0: torch.Tensor, solver: Solver) -> tuple[torch.Tensor, Solution, BackwardStats]:
        """:meth:`run` with autograd enabled."""


def _solve_detached(fn: Map, y0: torch.Tensor, solver: Solver) -> Solution:
    with torch.no_grad():
        return solver.solve(fn, y0.detach())


def _attach(y_star: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Value of ``y_star``, gradient of ``z``."""
    if not z.requires_grad:
        return y_star
    return y_star + (z - z.detach())


@dataclass(frozen=True)
class Implicit(BackwardMode):
    """Exact implicit-function-theorem gradient; the adjoint ``u = g + (∂f/∂y)^T u`` is solved by
    ``solver`` (started from ``u_0 = g``) and must converge."""

    solver: Solver = field(default_factory=Anderson)
    exact: ClassVar[bool] = True

    @property
    def claim(self) -> iqa_claims.GradientClaim:
        return iqa_claims.Exact()

    def _run(self, fn, y0, solver):
        sol = _solve_detached(fn, y0, solver)
        stats = BackwardStats()
        y_star = sol.y.detach()
        with torch.enable_grad():
            z = fn(y_star)
        if not z.requires_grad:
            return y_star, sol, stats
        adjoint_solver = self.solver

        def adjoint(g: torch.Tensor) -> torch.Tensor:
            y_req = y_star.detach().requires_grad_(True)
            with torch.enable_grad():
                fy = fn(y_req)

                def adjoint_map(u: torch.Tensor) -> torch.Tensor:
                    (vjp,) = torch.autograd.grad(fy, y_req, u.to(fy.dtype), retain_graph=True)
                    return g + vjp.to(g.dtype)

                with torch.no_grad():
                    adj = adjoint_solver.solve(adjoint_map, g)
            stats.adjoint.append(adj)
            adj.raise_if_failed("implicit backward: adjoint solve u = g + (df/dy)^T u")
            return adj.y

        z.register_hook(adjoint)
        return _attach(y_star, z), sol, stats


@dataclass(frozen=True)
class Unrolled(BackwardMode):
    """Backprop through every iteration of the forward solver from ``y0`` (graph kept for all of them).
    Exact when run to convergence with plain iteration.

    The gradient of k plain iterations converges more slowly than their value: its error is ~ k ρ^k where the
    value's is ~ ρ^k, so a forward stopped at its tolerance leaves a gradient up to k times less accurate
    (seen: 1.6 % on dx in float16 after a solve to 1e-5, ρ near 1; issue #14's calibration). With plain
    iteration the backward therefore runs through as many applications of f again from the solver's answer
    (error ~ 2k ρ^{2k}); the value stays the solver's."""

    exact: ClassVar[bool] = True

    @property
    def claim(self) -> iqa_claims.GradientClaim:
        return iqa_claims.Exact()

    def _run(self, fn, y0, solver):
        with torch.enable_grad():
            sol = solver.solve(fn, y0)
            z = sol.y
            if isinstance(solver, FixedPointIteration) and z.requires_grad:  # locally contractive where it converged
                for _ in range(sol.iterations):
                    z = fn(z)
        return (_attach(sol.y.detach(), z) if z is not sol.y else z), sol, BackwardStats()


@dataclass(frozen=True)
class Truncated(BackwardMode):
    """Backprop through the last ``k`` applications of f, started from the detached fixed point."""

    k: int = 1
    exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_at_least("k", self.k, 1, "the number of backpropagated iterations")

    @property
    def claim(self) -> iqa_claims.GradientClaim:
        return iqa_claims.Truncated(self.k)

    def _run(self, fn, y0, solver):
        sol = _solve_detached(fn, y0, solver)
        y_star = sol.y.detach()
        z = y_star
        with torch.enable_grad():
            for _ in range(self.k):
                z = fn(z)
        return _attach(y_star, z), sol, BackwardStats()


@dataclass(frozen=True)
class OneStep(BackwardMode):
    """Jacobian-free gradient: the gradient of a single application of f at the detached fixed point."""

    exact: ClassVar[bool] = False

    @property
    def claim(self) -> iqa_claims.GradientClaim:
        return iqa_claims.OneStep()

    def _run(self, fn, y0, solver):
        return Truncated(1)._run(fn, y0, solver)
