"""The built-in implicit query attention kernel (family ``iqa``, SPEC §3) and its nn.Module.

Contract (public API)::

    iqa_forward(x, w_q, w_k, w_v=None, *, scale=None) -> y
      x : [B, N, Din]   w_k : [Din, Dk]   w_q : [E, Dk]   w_v : [Din, E] or None (then V = x, E = Din)
      K = x w_k ;  V = x w_v (or x)
      y = f(y),  f(y) = softmax(scale * K (y w_q)^T, dim=-1) V      scale defaults to Dk ** -0.5
      a fixed point, reached from y_0 = V

Row i of the scores pairs key i with the queries of all tokens j (``K Q^T``, softmax over j).
The kernel adds two keyword arguments: ``solver`` (forward solver, default :data:`DEFAULT_SOLVER`,
Anderson) and ``backward`` (gradient mode, default :data:`DEFAULT_BACKWARD`, exact implicit gradient
with an Anderson adjoint solve). bf16/fp16 inputs are computed in float32 (inputs and output in the
low dtype); the output has the inputs' dtype and device; inputs are never modified. A forward solve
that does not converge raises :class:`~iqa_verify.iqa.solvers.ConvergenceError` unless
``strict=False`` (then the best iterate is returned and the :class:`IqaStats` say what happened).

Every kernel here declares itself to the ``iqa`` family as any user kernel does, with an ``iqa_info``
attribute (:class:`~iqa_verify.iqa_claims.IqaKernelInfo`: its gradient claim and its call with stats);
:func:`declare` makes such a kernel from a solver and a backward mode. The built-ins are the four exact
variants; ``iqa_forward_anderson_one_step`` and ``iqa_forward_anderson_truncated`` declare approximate
gradients (judged against the reference of that approximation, their gap reported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iqa_verify.contracts import check_iqa_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.iqa.backward import BackwardMode, BackwardStats, Implicit, OneStep, Truncated, Unrolled
from iqa_verify.iqa.solvers import Anderson, Broyden, FixedPointIteration, Solution, Solver
from iqa_verify.iqa_claims import IqaKernelInfo

__all__ = [
    "DEFAULT_BACKWARD",
    "DEFAULT_SOLVER",
    "LOW_PRECISION_TOL",
    "ImplicitQueryAttention",
    "IqaStats",
    "declare",
    "iqa_default_scale",
    "iqa_forward",
    "iqa_forward_anderson_implicit",
    "iqa_forward_anderson_one_step",
    "iqa_forward_anderson_truncated",
    "iqa_forward_broyden_implicit",
    "iqa_forward_fixed_point_implicit",
    "iqa_forward_fixed_point_unrolled",
    "iqa_forward_with_stats",
    "iqa_map",
]

DEFAULT_SOLVER: Solver = Anderson()
DEFAULT_BACKWARD: BackwardMode = Implicit(Anderson())


@dataclass
class IqaStats:
    """Statistics of one call: the forward :class:`Solution` and, filled during ``backward()``, the
    adjoint solves of an implicit backward (``backward.adjoint``)."""

    forward: Solution
    backward: BackwardStats


def iqa_default_scale(dk: int) -> float:
    """The contract's default score scale ``Dk ** -0.5``."""
    return dk**-0.5


def iqa_map(y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_q: torch.Tensor, scale: float) -> torch.Tensor:
    """One application of the map: ``softmax(scale * K (y w_q)^T, dim=-1) V``.

    y: [B, N, E]; k: [B, N, Dk]; v: [B, N, E]; w_q: [E, Dk] -> [B, N, E]."""
    q = y @ w_q
    p = torch.softmax(scale * (k @ q.transpose(-1, -2)), dim=-1)
    return p @ v


LOW_PRECISION_TOL = 1e-5
"""Solver setting: default residual tolerance for bf16/fp16 inputs (solved in float32). Their outputs carry
4e-3 / 5e-4 relative rounding, so 1e-5 keeps the solve error (and an unrolled gradient's truncation error) well below it; float32's own default (1e-6)
sits at float32 round-off, where plain iteration can stagnate just above it (seen: 1.27e-6 after 1000
steps in the seed sweep) and a correct solve would be reported as failed."""


def iqa_forward_with_stats(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    solver: Solver = DEFAULT_SOLVER,
    backward: BackwardMode = DEFAULT_BACKWARD,
    strict: bool = True,
) -> tuple[torch.Tensor, IqaStats]:
    """:func:`iqa_forward` that also returns the :class:`IqaStats` (forward solve; adjoint after backward)."""
    sizes = check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    if not isinstance(solver, Solver):
        raise IqaVerifyError(f"solver={solver!r}: must be a Solver (FixedPointIteration, Anderson, Broyden)")
    if not isinstance(backward, BackwardMode):
        raise IqaVerifyError(f"backward={backward!r}: must be a BackwardMode (Implicit, Unrolled, Truncated, OneStep)")
    s = iqa_default_scale(sizes.Dk) if scale is None else float(scale)
    cd = state_dtype_for(x.dtype)
    if cd != x.dtype and solver.tol is None:
        solver = dataclasses.replace(solver, tol=LOW_PRECISION_TOL)
    xc, wq, wk = x.to(cd), w_q.to(cd), w_k.to(cd)
    k = xc @ wk
    v = xc @ w_v.to(cd) if w_v is not None else xc

    def fn(y: torch.Tensor) -> torch.Tensor:
        return iqa_map(y, k, v, wq, s)

    y, sol, bstats = backward.run(fn, v, solver)
    if strict:
        sol.raise_if_failed("iqa_forward: forward fixed-point solve")
    return y.to(x.dtype), IqaStats(forward=sol, backward=bstats)


def iqa_forward(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    solver: Solver = DEFAULT_SOLVER,
    backward: BackwardMode = DEFAULT_BACKWARD,
    strict: bool = True,
) -> torch.Tensor:
    """Implicit query attention: the fixed point ``y = softmax(scale K (y w_q)^T) V`` reached from ``V``.

    x: [B, N, Din]; w_q: [E, Dk]; w_k: [Din, Dk]; w_v: [Din, E] or None -> y: [B, N, E] (dtype and
    device of x). Differentiable in x, w_q, w_k, w_v with the gradient of ``backward``."""
    return iqa_forward_with_stats(x, w_q, w_k, w_v, scale=scale, solver=solver, backward=backward, strict=strict)[0]


# -- the kernels as they declare themselves to the ``iqa`` family (``iqa_info``, iqa_verify.iqa_claims) -----


def _stats_call(solver: Solver, backward: BackwardMode) -> Callable[..., tuple[torch.Tensor, IqaStats]]:
    def with_stats(x, w_q, w_k, w_v=None, *, scale=None):
        return iqa_forward_with_stats(x, w_q, w_k, w_v, scale=scale, solver=solver, backward=backward)

    return with_stats


def _info(solver: Solver, backward: BackwardMode) -> IqaKernelInfo:
    return IqaKernelInfo(backward=backward.claim, with_stats=_stats_call(solver, backward))


def declare(solver: Solver, backward: BackwardMode, name: str, doc: str) -> Callable[..., torch.Tensor]:
    """A contract kernel ``name(x, w_q, w_k, w_v=None, *, scale=None) -> y`` running :func:`iqa_forward`
    with ``solver`` and ``backward``, carrying its ``iqa_info``: the gradient claim of ``backward``
    (``backward.claim``) and the same call with stats (:func:`iqa_forward_with_stats`)."""

    def kernel(x, w_q, w_k, w_v=None, *, scale=None):
        return iqa_forward(x, w_q, w_k, w_v, scale=scale, solver=solver, backward=backward)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = doc
    kernel.iqa_info = _info(solver, backward)  # type: ignore[attr-defined]
    return kernel


iqa_forward.iqa_info = _info(DEFAULT_SOLVER, DEFAULT_BACKWARD)  # type: ignore[attr-defined]

iqa_forward_anderson_implicit = declare(
    Anderson(), Implicit(Anderson()), "iqa_forward_anderson_implicit",
    "Built-in variant: Anderson forward, implicit backward with an Anderson adjoint.",
)
iqa_forward_broyden_implicit = declare(
    Broyden(), Implicit(Broyden()), "iqa_forward_broyden_implicit",
    "Built-in variant: Broyden forward, implicit backward with a Broyden adjoint.",
)
iqa_forward_fixed_point_implicit = declare(
    FixedPointIteration(max_iter=1000), Implicit(Anderson()), "iqa_forward_fixed_point_implicit",
    "Built-in variant: plain iteration forward (up to 1000 steps), implicit backward (Anderson adjoint).",
)
iqa_forward_fixed_point_unrolled = declare(
    FixedPointIteration(max_iter=1000), Unrolled(), "iqa_forward_fixed_point_unrolled",
    "Built-in variant: plain iteration to convergence (up to 1000 steps), backprop through all of them.",
)
iqa_forward_anderson_one_step = declare(
    Anderson(), OneStep(), "iqa_forward_anderson_one_step",
    "Anderson forward; declared one-step (Jacobian-free) gradient g^T ∂f/∂θ at y* (an approximation).",
)
iqa_forward_anderson_truncated = declare(
    Anderson(), Truncated(5), "iqa_forward_anderson_truncated",
    "Anderson forward; declared truncated backprop through 5 applications of f at y* (an approximation).",
)


class ImplicitQueryAttention(nn.Module):
    """Implicit query attention layer (the notes' ``Omega_Q``, ``W_K``, optional ``Omega_V``).

    Parameters in the contract's orientation: ``W_K: [Din, Dk]``, ``Omega_Q: [E, Dk]``,
    ``Omega_V: [Din, E]`` (only with ``value_projection=True``; otherwise ``V = x`` and ``E = Din``).
    Initialised like ``nn.Linear`` (uniform in ``±1/sqrt(fan_in)``). ``scale=None`` is ``Dk ** -0.5``
    (the notes' ``V = x`` variant uses ``scale=1.0``). After each call, ``last_stats`` holds the
    :class:`IqaStats`.
    """

    def __init__(
        self,
        embed_dim: int,
        key_dim: int | None = None,
        value_dim: int | None = None,
        *,
        value_projection: bool = True,
        scale: float | None = None,
        solver: Solver = DEFAULT_SOLVER,
        backward: BackwardMode = DEFAULT_BACKWARD,
        strict: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_at_least("embed_dim", embed_dim, 1, "input dimension")
        dk = embed_dim if key_dim is None else key_dim
        check_at_least("key_dim", dk, 1, "key dimension")
        if not value_projection and value_dim not in (None, embed_dim):
            raise IqaVerifyError(f"value_dim={value_dim}: must equal embed_dim={embed_dim} without a value projection")
        e = embed_dim if value_dim is None else value_dim
        check_at_least("value_dim", e, 1, "value dimension")
        kw = {"device": device, "dtype": dtype}
        self.W_K = nn.Parameter(torch.empty(embed_dim, dk, **kw))
        self.Omega_Q = nn.Parameter(torch.empty(e, dk, **kw))
        self.Omega_V = nn.Parameter(torch.empty(embed_dim, e, **kw)) if value_projection else None
        self.scale, self.solver, self.backward_mode, self.strict = scale, solver, backward, strict
        self.last_stats: IqaStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.W_K, self.Omega_Q, self.Omega_V):
            if p is not None:
                bound = p.shape[0] ** -0.5
                nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, Din] -> y: [B, N, E]."""
        y, self.last_stats = iqa_forward_with_stats(
            x, self.Omega_Q, self.W_K, self.Omega_V,
            scale=self.scale, solver=self.solver, backward=self.backward_mode, strict=self.strict,
        )
        return y
