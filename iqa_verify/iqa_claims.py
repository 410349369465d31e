"""What an ``iqa`` kernel may declare about itself: the types of its ``iqa_info`` attribute (SPEC §3).

A plain contract kernel ``iqa_forward(x, w_q, w_k, w_v=None, *, scale=None) -> y`` is judged from its
output alone and claims the exact implicit gradient. A kernel may say more by carrying an attribute
``iqa_info``, an :class:`IqaKernelInfo`::

    kernel.iqa_info = IqaKernelInfo(backward=Truncated(5), with_stats=my_forward_with_stats)

This module is neutral ground: kernels (the built-ins of :mod:`iqa_verify.iqa`, the Triton kernel, the
adapters, yours) import it to describe themselves, and the ``iqa`` family
(:mod:`iqa_verify.properties.iqa`) imports it to read what they say, so the judge never imports a
kernel to learn its claim. The claims are data: a kernel's own backward implementation (for the
built-ins, :class:`iqa_verify.iqa.backward.BackwardMode`) maps itself to one (``BackwardMode.claim``).

Gradient claims, with ``J = ∂f/∂y`` at the fixed point ``y*``, ``g`` the cotangent and ``u`` the adjoint
(``dL/dθ = u^T ∂f/∂θ``)::

    Exact()        u = (I - J^T)^{-1} g      implicit function theorem (or unrolled to convergence)
    Truncated(k)   u = sum_{t<k} (J^T)^t g   backprop through k applications of f from the detached y*
    OneStep()      u = g                     Jacobian-free (Truncated(1))

An exact claim is judged against the float64 implicit gradient; an approximate one against the float64
reference of that approximation, its distance to the implicit gradient reported (``iqa/gradient-gap``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = ["Exact", "GradientClaim", "IqaKernelInfo", "OneStep", "Truncated", "check_gradient_claim"]


@dataclass(frozen=True)
class Exact:
    """The exact implicit gradient ``u = (I - J^T)^{-1} g`` (implicit backward, or unrolled to convergence)."""

    exact: ClassVar[bool] = True


@dataclass(frozen=True)
class Truncated:
    """Backprop through the last ``k`` applications of f from the detached fixed point (k >= 1)."""

    k: int = 1
    exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_at_least("k", self.k, 1, "the number of backpropagated applications of f")


@dataclass(frozen=True)
class OneStep:
    """The Jacobian-free gradient of one application of f at the detached fixed point (``Truncated(1)``)."""

    exact: ClassVar[bool] = False


GradientClaim = Union[Exact, Truncated, OneStep]
"""What a kernel says its gradient is (data, no implementation)."""

_CLAIMS = (Exact, Truncated, OneStep)


def check_gradient_claim(name: str, value: Any) -> GradientClaim:
    """``value`` as a :data:`GradientClaim`: a claim itself, ``None`` (the exact gradient), or an object
    whose ``claim`` attribute is one (a backward mode of :mod:`iqa_verify.iqa`); else IqaVerifyError."""
    if value is None:
        return Exact()
    claim = value if isinstance(value, _CLAIMS) else getattr(value, "claim", None)
    if not isinstance(claim, _CLAIMS):
        raise IqaVerifyError(f"{name}={value!r}: must be a gradient claim (Exact(), Truncated(k), OneStep() from"
                             " iqa_verify.iqa_claims) or a backward mode with a .claim")
    return claim


@dataclass(frozen=True)
class IqaKernelInfo:
    """What an ``iqa`` kernel declares about itself (its ``iqa_info`` attribute).

    backward: its :data:`GradientClaim` (default :class:`Exact`; ``None`` and a backward mode with a
    ``claim`` are accepted and stored as that claim).
    with_stats: the contract call returning ``(y, stats)`` (None: no stats), where ``stats.forward``
    describes the forward solve: ``y`` (the solver's iterate in its compute dtype, [B, N, E]),
    ``converged`` ([B] bool), the stated tolerance (``tol``, or ``solver.tol``; else the built-in solvers'
    default for the iterate's dtype) of the relative residual ``‖f(y) - y‖_F / max(‖y‖_F, ‖V‖_F)``, and
    optionally ``outcome`` (an enum; ``CONVERGED`` must mean every batch element converged).
    ``iqa/convergence-honesty`` recomputes the residual.
    """

    backward: GradientClaim = Exact()
    with_stats: Callable[..., tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backward", check_gradient_claim("backward", self.backward))
        if self.with_stats is not None and not callable(self.with_stats):
            raise IqaVerifyError(f"with_stats={self.with_stats!r}: must be callable (the contract call returning (y, stats))")

    @property
    def exact(self) -> bool:
        """The kernel claims the exact implicit gradient."""
        return bool(self.backward.exact)

    def describe_backward(self) -> str:
        return "exact implicit gradient" if self.exact else repr(self.backward)
