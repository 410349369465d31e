"""Fixed-point solvers as small typed objects: plain (optionally damped) iteration, Anderson, Broyden.

Every solver finds ``y = fn(y)`` for a generic ``fn: Tensor -> Tensor`` (the IQA map in the forward,
the adjoint map ``u -> g + (∂f/∂y)^T u`` in the backward) started from ``y0``. Tensors are
``[B, ...]``: dim 0 is the batch, each batch element is solved (and judged) on its own.

Statistics (:class:`Solution`), per batch element ``b`` and iterate ``y_t``::

    r_t[b] = ‖fn(y_t)[b] - y_t[b]‖_F / max(‖y_t[b]‖_F, ‖y_0[b]‖_F, tiny)          [B]

(for plain undamped iteration ``fn(y_t) = y_{t+1}``, so this is ``‖y_{t+1} - y_t‖ / ‖y_t‖``; the
``‖y_0‖`` floor keeps the ratio meaningful when the fixed point is near 0). ``residual_history`` is
``[iterations + 1, B]`` (``r_0`` first), ``residual_trace`` its worst element per step as a list of
floats (what a convergence plot shows), ``residual`` the ``[B]`` residual of the returned iterate.

Semantics shared by all solvers:

* A batch element stops (is frozen) once ``r_t <= tol`` (converged) or its residual is non-finite,
  grew past ``DIVERGENCE_FACTOR * r_0``, or its iterate grew past ``DIVERGENCE_FACTOR * max(‖y_0‖,
  ‖fn(y_0)‖)`` (diverged). The loop ends when all are frozen or after
  ``max_iter`` updates; ``iterations`` is the number of updates performed (``fn`` is evaluated
  ``iterations + 1`` times).
* The returned ``y`` is, per batch element, the iterate with the smallest residual seen (a finite one
  whenever a finite iterate existed; never NaN where ``y0`` was finite).
* Non-convergence is reported, never silent: :class:`Outcome` (worst over the batch) carries the
  human message; :meth:`Solution.raise_if_failed` turns it into a :class:`ConvergenceError`.
* Any floating dtype: ``fn`` is called with tensors of ``y0``'s dtype; the solver state (iterates,
  histories, mixing coefficients) is kept in ``state_dtype_for(y0.dtype)`` (float32 for bf16/fp16).
* Differentiable: only out-of-place ops, so a solve run under autograd can be backpropagated
  through (the ``Unrolled`` backward mode relies on this).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from iqa_verify.contracts import state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "DIVERGENCE_FACTOR",
    "Anderson",
    "Broyden",
    "ConvergenceError",
    "FixedPointIteration",
    "Outcome",
    "Solution",
    "SolverState",
    "Solver",
    "default_tol",
]

#: Solver settings (not comparison tolerances): default relative-residual target per dtype of ``y0``
#: (about the unit roundoff of the dtype ``fn`` computes in: an fp16/bf16 ``fn`` cannot get much below it).
DEFAULT_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
#: Default cap on the number of updates.
DEFAULT_MAX_ITER = 200
#: A residual above this multiple of the initial residual, or an iterate norm above this multiple of
#: ``max(‖y_0‖, ‖fn(y_0)‖)``, counts as divergence.
DIVERGENCE_FACTOR = 1e4

Map = Callable[[torch.Tensor], torch.Tensor]


def default_tol(dtype: torch.dtype) -> float:
    """The default ``tol`` for ``y0`` of ``dtype`` (float32's for a dtype not in :data:`DEFAULT_TOL`)."""
    return DEFAULT_TOL.get(dtype, DEFAULT_TOL[torch.float32])


class Outcome(enum.Enum):
    """How a solve ended; each member carries the message a user reads."""

    CONVERGED = "converged"
    MAX_ITER = "maximum steps reached: raise max_iter or use Anderson/Broyden"
    DIVERGED = (
        f"diverged: the residual or the iterate grew past {DIVERGENCE_FACTOR:g} x its initial size or became"
        " non-finite (the best finite iterate is returned); try damping < 1 or another solver"
    )

    @property
    def message(self) -> str:
        return self.value


class ConvergenceError(RuntimeError):
    """A solve that had to converge did not; carries the :class:`Solution`."""

    def __init__(self, what: str, solution: "Solution") -> None:
        self.solution = solution
        super().__init__(f"{what}: {solution.describe()}")


@dataclass
class Solution:
    """Result of a solve. Shapes: ``y`` like ``y0``; ``residual``, ``converged`` ``[B]``;
    ``residual_history`` ``[iterations + 1, B]``; formulas in the module docstring."""

    y: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: torch.Tensor
    outcome: Outcome
    residual_history: torch.Tensor
    solver: "Solver | None" = None
    residual_trace: list[float] = field(default_factory=list)

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    def describe(self) -> str:
        name = type(self.solver).__name__ if self.solver is not None else "solver"
        done = int(self.converged.sum())
        return (
            f"{name} {self.outcome.message} after {self.iterations} iterations;"
            f" worst relative residual {self.max_residual:.3e}; {done}/{self.converged.numel()} batch elements converged"
        )

    def raise_if_failed(self, what: str = "fixed-point solve") -> "Solution":
        if self.outcome is not Outcome.CONVERGED:
            raise ConvergenceError(what, self)
        return self


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


@dataclass
class SolverState:
    """A solve in progress, in the solver's state dtype, per batch element (``n`` = elements of one
    iterate): ``y``, ``fy = fn(y)`` [B, n]; ``memory`` the solver's own (Anderson's past iterates,
    Broyden's low-rank factors); ``best_y`` [B, n] and ``best_r`` [B] the iterate with the smallest
    residual seen; ``converged``, ``diverged`` [B] bool; ``history`` the residuals ``r_0 .. r_t`` ([B]
    each, formula in the module docstring); ``iterations`` updates so far; ``tol`` the target; ``scale0``
    [B] = ‖y_0‖, ``r0`` and ``blowup`` [B] the divergence thresholds' bases."""

    y: torch.Tensor
    fy: torch.Tensor
    memory: object
    best_y: torch.Tensor
    best_r: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    history: list[torch.Tensor]
    iterations: int
    tol: float
    scale0: torch.Tensor
    r0: torch.Tensor | None = None
    blowup: torch.Tensor | None = None

    @property
    def frozen(self) -> torch.Tensor:
        return self.converged | self.diverged


@dataclass(frozen=True)
class Solver(abc.ABC):
    """Base of the solvers: ``max_iter`` updates at most, stop at relative residual ``tol``
    (``None``: :data:`DEFAULT_TOL` of ``y0``'s dtype).

    A solver is :meth:`init` / :meth:`step` / :meth:`terminate` over a :class:`SolverState`; :meth:`solve`
    is the one loop they all share, and a subclass only says how it proposes the next iterate
    (:meth:`update`, with its own ``memory`` from :meth:`init_memory`)."""

    max_iter: int = DEFAULT_MAX_ITER
    tol: float | None = None

    def __post_init__(self) -> None:
        check_at_least("max_iter", self.max_iter, 0, "the number of solver iterations")
        if self.tol is not None and not self.tol > 0:
            raise IqaVerifyError(f"tol={self.tol}: the residual tolerance must be > 0")

    # -- the one loop ---------------------------------------------------------------------------------
    def solve(self, fn: Map, y0: torch.Tensor) -> Solution:
        """Solve ``y = fn(y)`` from ``y0: [B, ...]``; see the module docstring for the statistics."""
        if y0.ndim < 1 or y0.shape[0] < 1:
            raise IqaVerifyError(f"y0.shape={tuple(y0.shape)}: must be [B, ...] with B >= 1")
        in_dtype = y0.dtype
        sd = state_dtype_for(in_dtype)
        shape = y0.shape

        def fn_state(y_flat: torch.Tensor) -> torch.Tensor:
            return fn(y_flat.reshape(shape).to(in_dtype)).to(sd).reshape(shape[0], -1)

        state = self.init(fn_state, y0.to(sd).reshape(shape[0], -1),
                          self.tol if self.tol is not None else default_tol(in_dtype))
        while not self.terminate(state):
            state = self.step(fn_state, state)
        return self._solution(state, shape, in_dtype)

    def init(self, fn: Map, y0: torch.Tensor, tol: float) -> SolverState:
        """The state at ``y0`` [B, n] (``fn`` evaluated once, the residual ``r_0`` observed)."""
        none = torch.zeros(y0.shape[0], dtype=torch.bool, device=y0.device)
        state = SolverState(y=y0, fy=fn(y0), memory=self.init_memory(y0), best_y=y0,
                            best_r=torch.full((y0.shape[0],), float("inf"), dtype=y0.dtype, device=y0.device),
                            converged=none, diverged=none.clone(), history=[], iterations=0, tol=tol,
                            scale0=_norms(y0.detach()))
        return self._observe(state)

    def step(self, fn: Map, state: SolverState) -> SolverState:
        """One update of the elements not yet frozen, then its residual observed."""
        frozen = state.frozen[:, None]
        y_new, state.memory = self.update(state.y, state.fy, state.memory, fn)
        state.y = torch.where(frozen, state.y, y_new)
        state.fy = torch.where(frozen, state.fy, fn(state.y))
        state.iterations += 1
        return self._observe(state)

    def terminate(self, state: SolverState) -> bool:
        """Every batch element converged or diverged, or ``max_iter`` updates done."""
        return bool(state.frozen.all()) or state.iterations >= self.max_iter

    # -- what a solver says -----------------------------------------------------------------------------
    def init_memory(self, y: torch.Tensor) -> object:
        return None

    @abc.abstractmethod
    def update(self, y: torch.Tensor, fy: torch.Tensor, memory: object, fn: Map) -> tuple[torch.Tensor, object]:
        """The next iterate from ``y: [B, n]`` with ``fy = fn(y)``, and the solver's memory after it."""

    # -- shared bookkeeping -------------------------------------------------------------------------------
    @staticmethod
    def _observe(state: SolverState) -> SolverState:
        y, fy = state.y, state.fy
        tiny = torch.finfo(y.dtype).tiny
        with torch.no_grad():
            denom = torch.maximum(torch.maximum(_norms(y), state.scale0), torch.full_like(state.scale0, tiny))
            r = _norms(fy - y) / denom
            r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))
        frozen = state.frozen
        # frozen elements keep their last residual (their iterate does not move)
        r = torch.where(frozen, state.history[-1], r) if state.history else r
        state.history.append(r)
        if state.r0 is None:
            state.r0 = r
            state.blowup = DIVERGENCE_FACTOR * torch.maximum(state.scale0, _norms(fy.detach()))
        better = (r < state.best_r) & ~frozen
        state.best_y = torch.where(better[:, None], y, state.best_y)
        state.best_r = torch.where(better, r, state.best_r)
        state.converged = state.converged | (~frozen & (r <= state.tol))
        state.diverged = state.diverged | (~frozen & ~state.converged & (
            (r > DIVERGENCE_FACTOR * state.r0) | torch.isinf(r) | (_norms(y.detach()) > state.blowup)))
        return state

    def _solution(self, state: SolverState, shape: torch.Size, in_dtype: torch.dtype) -> Solution:
        if bool(state.diverged.any()):
            outcome = Outcome.DIVERGED
        elif bool(state.converged.all()):
            outcome = Outcome.CONVERGED
        else:
            outcome = Outcome.MAX_ITER
        hist = torch.stack(state.history)
        return Solution(
            y=state.best_y.reshape(shape).to(in_dtype),
            iterations=state.iterations,
            residual=state.best_r,
            converged=state.converged,
            outcome=outcome,
            residual_history=hist,
            solver=self,
            residual_trace=[float(v) for v in hist.max(dim=1).values],
        )


def _check_damping(damping: float) -> None:
    if not 0 < damping <= 1:
        raise IqaVerifyError(f"damping={damping}: must be in (0, 1]")


@dataclass(frozen=True)
class FixedPointIteration(Solver):
    """Plain iteration ``y_{t+1} = (1 - β) y_t + β fn(y_t)`` with damping ``β`` in (0, 1].

    Converges linearly at rate ``1 - β (1 - ρ)`` for a contraction of rate ``ρ``."""

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_damping(self.damping)

    def update(self, y, fy, memory, fn):
        if self.damping == 1.0:
            return fy, memory
        return (1.0 - self.damping) * y + self.damping * fy, memory


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration (type II, Walker & Ni) with ``memory`` past iterates, per batch element.

    With iterates ``y_i``, images ``f_i = fn(y_i)`` and residuals ``r_i = f_i - y_i`` of the last m steps::

        alpha = argmin ‖sum_i alpha_i r_i‖  s.t. sum_i alpha_i = 1
              = z / (1^T z),   (R R^T + λ I) z = 1,   λ = regularization * trace(R R^T) / m
        y_{t+1} = β sum_i alpha_i f_i + (1 - β) sum_i alpha_i y_i

    A singular or non-finite mixing system falls back to the plain damped step."""

    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("memory", self.memory, 1, "Anderson memory")
        _check_damping(self.damping)
        if not self.regularization >= 0:
            raise IqaVerifyError(f"regularization={self.regularization}: must be >= 0")

    def init_memory(self, y):
        return ([], [])

    def update(self, y, fy, memory, fn):
        ys, fs = memory
        ys, fs = (ys + [y])[-self.memory :], (fs + [fy])[-self.memory :]
        Y, F = torch.stack(ys, dim=1), torch.stack(fs, dim=1)  # [B, m, n]
        R = F - Y
        H = R @ R.transpose(1, 2)  # [B, m, m]
        m = H.shape[-1]
        eye = torch.eye(m, dtype=H.dtype, device=H.device)
        trace = torch.diagonal(H, dim1=1, dim2=2).sum(-1)
        lam = self.regularization * trace / m + torch.finfo(H.dtype).tiny
        rhs = torch.ones(H.shape[0], m, 1, dtype=H.dtype, device=H.device)
        z, info = torch.linalg.solve_ex(H + lam[:, None, None] * eye, rhs)
        z = z[..., 0]
        total = z.sum(-1, keepdim=True)
        alpha = z / total
        last = torch.zeros_like(alpha)
        last[:, -1] = 1.0
        ok = (info == 0) & torch.isfinite(alpha).all(-1) & (total.abs()[:, 0] > 0)
        alpha = torch.where(ok[:, None], alpha, last)
        mixed_f = (alpha[:, :, None] * F).sum(1)
        mixed_y = (alpha[:, :, None] * Y).sum(1)
        y_new = self.damping * mixed_f + (1.0 - self.damping) * mixed_y if self.damping != 1.0 else mixed_f
        return y_new, (ys, fs)


@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's ("good") method on the root ``g(y) = fn(y) - y = 0``, limited memory, per batch element.

    The inverse Jacobian estimate is ``H = -I + U V^T`` (rank <= ``memory``; ``-I`` makes the first
    step a plain iteration step). With ``s = y_{t+1} - y_t`` and ``d = g_{t+1} - g_t``::

        y_{t+1} = y_t - H g_t
        H <- H + (s - H d) (s^T H) / (s^T H d)          (Sherman-Morrison; skipped when s^T H d ~ 0)

    When the memory is full the estimate restarts from ``-I``."""

    memory: int = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("memory", self.memory, 1, "Broyden memory")

    def init_memory(self, y):
        return {"us": [], "vs": [], "prev": None}

    @staticmethod
    def _apply(us: list, vs: list, t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        out = -t
        for u, v in zip(us, vs):
            a, b = (v, u) if transpose else (u, v)
            out = out + a * (b * t).sum(-1, keepdim=True)
        return out

    def update(self, y, fy, memory, fn):
        us, vs, prev = memory["us"], memory["vs"], memory["prev"]
        g = fy - y
        if prev is not None:
            y_old, g_old = prev
            s, d = y - y_old, g - g_old
            hd = self._apply(us, vs, d)
            v = self._apply(us, vs, s, transpose=True)  # H^T s
            denom = (v * d).sum(-1, keepdim=True)
            small = denom.abs() <= torch.finfo(y.dtype).eps * _norms(v)[:, None] * _norms(d)[:, None]
            safe = torch.where(small, torch.ones_like(denom), denom)
            u = torch.where(small, torch.zeros_like(s), (s - hd) / safe)
            us, vs = us + [u], vs + [v]
            if len(us) > self.memory:
                us, vs = [], []
        y_new = y - self._apply(us, vs, g)
        return y_new, {"us": us, "vs": vs, "prev": (y, g)}
