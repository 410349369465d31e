"""What the ``iqa`` family knows about a kernel beyond its contract: its stats and its gradient claim.

A plain contract kernel ``iqa_forward(x, w_q, w_k, w_v=None, *, scale=None) -> y`` is judged from its
output alone. A kernel may say more by carrying an attribute ``iqa_info`` (an :class:`IqaKernelInfo`):

* ``with_stats``: the same call returning ``(y, stats)``, where ``stats.forward`` describes the forward
  solve: ``y`` (the solver's iterate in its compute dtype, [B, N, E]), ``converged`` ([B] bool) and the
  stated tolerance (``tol``, or ``solver.tol``, or the solver default for the iterate's dtype) of the
  relative residual ``‖f(y) - y‖_F / max(‖y‖_F, ‖V‖_F)``. ``iqa/convergence-honesty`` recomputes it.
* ``backward``: the :class:`~iqa_verify.iqa.backward.BackwardMode` the kernel implements. Exact modes
  (implicit, unrolled to convergence) are judged against the implicit gradient; approximate ones
  (``Truncated(k)``, ``OneStep()``) against the float64 reference of *that approximation*, and their
  distance to the implicit gradient is reported by ``iqa/gradient-gap`` without failing.

The built-in kernels of :mod:`iqa_verify.iqa.kernel` carry no attribute; :func:`kernel_info` knows
them by identity. :func:`declare` makes a declared kernel from a solver and a backward mode; the
approximate built-ins below are made that way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iqa_verify.iqa import kernel as iqa_kernel
from iqa_verify.iqa.backward import BackwardMode, Implicit, OneStep, Truncated, Unrolled
from iqa_verify.iqa.solvers import Anderson, Broyden, FixedPointIteration, Solver

__all__ = [
    "IqaKernelInfo",
    "declare",
    "iqa_forward_anderson_one_step",
    "iqa_forward_anderson_truncated",
    "kernel_info",
]


@dataclass(frozen=True)
class IqaKernelInfo:
    """backward: the gradient mode the kernel implements (None: claims the exact implicit gradient);
    with_stats: the contract call returning ``(y, stats)`` (None: no stats)."""

    backward: BackwardMode | None = None
    with_stats: Callable[..., tuple[Any, Any]] | None = None

    @property
    def exact(self) -> bool:
        return self.backward is None or bool(self.backward.exact)

    def describe_backward(self) -> str:
        return "exact implicit gradient" if self.backward is None else repr(self.backward)


def _stats_call(solver: Solver, backward: BackwardMode) -> Callable[..., tuple[Any, Any]]:
    def with_stats(x, w_q, w_k, w_v=None, *, scale=None):
        return iqa_kernel.iqa_forward_with_stats(x, w_q, w_k, w_v, scale=scale, solver=solver, backward=backward)

    return with_stats


def _info(solver: Solver, backward: BackwardMode) -> IqaKernelInfo:
    return IqaKernelInfo(backward=backward, with_stats=_stats_call(solver, backward))


_KNOWN: dict[Callable[..., Any], IqaKernelInfo] = {
    iqa_kernel.iqa_forward: _info(iqa_kernel.DEFAULT_SOLVER, iqa_kernel.DEFAULT_BACKWARD),
    iqa_kernel.iqa_forward_anderson_implicit: _info(Anderson(), Implicit(Anderson())),
    iqa_kernel.iqa_forward_broyden_implicit: _info(Broyden(), Implicit(Broyden())),
    iqa_kernel.iqa_forward_fixed_point_implicit: _info(FixedPointIteration(max_iter=1000), Implicit(Anderson())),
    iqa_kernel.iqa_forward_fixed_point_unrolled: _info(FixedPointIteration(max_iter=1000), Unrolled()),
}


def kernel_info(kernel: Callable[..., Any]) -> IqaKernelInfo:
    """The kernel's ``iqa_info`` attribute, else what is known about a built-in, else a plain contract
    kernel (claims the exact gradient, no stats)."""
    info = getattr(kernel, "iqa_info", None)
    if isinstance(info, IqaKernelInfo):
        return info
    return _KNOWN.get(kernel, IqaKernelInfo())


def declare(solver: Solver, backward: BackwardMode, name: str, doc: str) -> Callable[..., Any]:
    """A contract kernel running :func:`~iqa_verify.iqa.kernel.iqa_forward` with ``solver`` and
    ``backward``, carrying its :class:`IqaKernelInfo`."""

    def kernel(x, w_q, w_k, w_v=None, *, scale=None):
        return iqa_kernel.iqa_forward(x, w_q, w_k, w_v, scale=scale, solver=solver, backward=backward)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = doc
    kernel.iqa_info = _info(solver, backward)  # type: ignore[attr-defined]
    return kernel


iqa_forward_anderson_one_step = declare(
    Anderson(), OneStep(), "iqa_forward_anderson_one_step",
    "Anderson forward; declared one-step (Jacobian-free) gradient g^T ∂f/∂θ at y* (an approximation).",
)
iqa_forward_anderson_truncated = declare(
    Anderson(), Truncated(5), "iqa_forward_anderson_truncated",
    "Anderson forward; declared truncated backprop through 5 applications of f at y* (an approximation).",
)


# -- calls made beside the kernel, in the kernel's process (ExtraCall functions: data in, data out) --------


def claims(kernel: Callable[..., Any]) -> IqaKernelInfo:
    """What the kernel says of itself, as data: its backward mode (``with_stats`` dropped; see
    :func:`has_stats` and :func:`forward_stats`)."""
    return IqaKernelInfo(backward=kernel_info(kernel).backward)


def has_stats(kernel: Callable[..., Any]) -> bool:
    return kernel_info(kernel).with_stats is not None


def forward_stats(kernel: Callable[..., Any], inputs: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kernel's ``with_stats`` call on ``inputs``: its iterate ``y``, ``converged`` [B] and the stated
    tolerance (``tol``, else ``solver.tol``, else the solver default for the iterate's dtype), and the outcome's name."""
    import torch

    from iqa_verify.iqa.solvers import default_tol

    with torch.no_grad():
        _, stats = kernel_info(kernel).with_stats(*inputs.values(), **kwargs)
    fwd = stats.forward
    y = fwd.y.detach()
    tol = getattr(fwd, "tol", None)
    if tol is None:
        tol = getattr(getattr(fwd, "solver", None), "tol", None)
    outcome = getattr(fwd, "outcome", None)
    return {"y": y, "converged": torch.as_tensor(fwd.converged, dtype=torch.bool).reshape(-1).cpu(),
            "tol": float(tol) if tol is not None else default_tol(y.dtype),
            "outcome": getattr(outcome, "name", None)}
