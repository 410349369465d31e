"""What the ``iqa`` family reads from a kernel beyond its contract: its gradient claim and its stats.

A kernel declares both with an ``iqa_info`` attribute, an :class:`~iqa_verify.iqa_claims.IqaKernelInfo`
(the types live in the neutral :mod:`iqa_verify.iqa_claims`, so the family imports no kernel to read a
claim). A kernel without one is a plain contract kernel: it claims the exact implicit gradient and
reports no stats. The built-in kernels (:mod:`iqa_verify.iqa.kernel`) declare themselves the same way.

The functions below are ``ExtraCall`` functions: they run beside the kernel, in its worker process, and
return data (:meth:`~iqa_verify.family.PropertyContext.extra`). :func:`forward_stats` calls the kernel's
own ``with_stats`` (kernel code, in the kernel's process); nothing here judges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iqa_verify.iqa_claims import IqaKernelInfo

__all__ = ["IqaKernelInfo", "claims", "forward_stats", "has_stats", "kernel_info"]


def kernel_info(kernel: Callable[..., Any]) -> IqaKernelInfo:
    """The kernel's ``iqa_info`` attribute, else a plain contract kernel's (exact gradient claimed, no stats)."""
    info = getattr(kernel, "iqa_info", None)
    return info if isinstance(info, IqaKernelInfo) else IqaKernelInfo()


def claims(kernel: Callable[..., Any]) -> IqaKernelInfo:
    """What the kernel says of itself, as data: its gradient claim (``with_stats`` dropped; see
    :func:`has_stats` and :func:`forward_stats`)."""
    return IqaKernelInfo(backward=kernel_info(kernel).backward)


def has_stats(kernel: Callable[..., Any]) -> bool:
    return kernel_info(kernel).with_stats is not None


def forward_stats(kernel: Callable[..., Any], inputs: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kernel's ``with_stats`` call on ``inputs``: its iterate ``y``, ``converged`` [B] and the stated
    tolerance (``tol``, else ``solver.tol``, else the built-in solvers' default for the iterate's dtype:
    kernel-side code, run here in the kernel's process), and the outcome's name."""
    import torch

    with torch.no_grad():
        _, stats = kernel_info(kernel).with_stats(*inputs.values(), **kwargs)
    fwd = stats.forward
    y = fwd.y.detach()
    tol = getattr(fwd, "tol", None)
    if tol is None:
        tol = getattr(getattr(fwd, "solver", None), "tol", None)
    if tol is None:
        from iqa_verify.iqa.solvers import default_tol

        tol = default_tol(y.dtype)
    outcome = getattr(fwd, "outcome", None)
    return {"y": y, "converged": torch.as_tensor(fwd.converged, dtype=torch.bool).reshape(-1).cpu(),
            "tol": float(tol), "outcome": getattr(outcome, "name", None)}
