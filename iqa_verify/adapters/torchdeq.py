"""torchdeq's DEQ solvers and backward modes as ``iqa`` kernels (SPEC §3).

Contract::

    iqa_forward(x, w_q, w_k, w_v=None, *, scale=None) -> y
      x : [B, N, Din]   w_k : [Din, Dk]   w_q : [E, Dk]   w_v : [Din, E] or None (V = x)
      f(y) = softmax(scale * K (y w_q)^T, dim=-1) V,  K = x w_k,  V = x w_v (or x)
      y = f(y), reached from y_0 = V;  scale defaults to Dk ** -0.5

The map ``f`` is the suite's (:func:`iqa_verify.iqa.kernel.iqa_map`, computed in
``state_dtype_for(x.dtype)``: float32 for bf16/fp16, as the built-in kernel); everything a DEQ user
configures comes from torchdeq 0.1.0: ``get_deq(**deq_kwargs)`` builds the layer (in training mode,
where torchdeq attaches gradients), its forward solver finds the fixed point from ``V`` and its
gradient function (phantom gradient or IFT with its backward solver) makes the gradient.

torchdeq's defaults (read in its source): ``core='sliced'``, ``f_solver='fixed_point_iter'``,
``f_max_iter=40``, ``f_tol=1e-3`` with ``f_stop_mode='abs'``, no IFT: a 1-step phantom gradient
(``grad=1``, ``tau=1.0``) — an approximation, not the implicit gradient; ``b_solver='fixed_point_iter'``,
``b_max_iter=40``, ``b_tol=1e-6`` for IFT.

What the kernel declares to the ``iqa`` family (``iqa_info``, :mod:`iqa_verify.iqa_claims`):
``ift=True`` → the exact implicit gradient (``Exact()``); otherwise a phantom gradient with ``tau=1`` and
one state (``n_states=1``, integer ``grad=k``) is ``Truncated(k)`` (k applications of f from the detached
fixed point; ``OneStep()`` for k=1), judged against that approximation with the gap to the implicit
gradient reported. Any other phantom configuration (damped ``tau``, several states) has no counterpart
in the suite and claims nothing more: it is judged as exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from iqa_verify.contracts import check_iqa_forward_inputs, state_dtype_for
from iqa_verify.iqa.kernel import iqa_default_scale, iqa_map
from iqa_verify.iqa_claims import Exact, GradientClaim, IqaKernelInfo, OneStep, Truncated

__all__ = ["make_torchdeq_iqa", "declared_backward", "torchdeq_default", "torchdeq_anderson_ift"]

#: torchdeq 0.1.0 defaults that decide the gradient (DEQIndexing / DEQSliced constructors).
_GRAD_DEFAULTS = {"ift": False, "hook_ift": False, "grad": 1, "tau": 1.0, "n_states": 1, "indexing": None}


def declared_backward(deq_kwargs: dict[str, Any]) -> GradientClaim:
    """The suite's claim for the gradient torchdeq makes under ``deq_kwargs`` (``Exact()``: IFT, or a
    phantom configuration the suite has no counterpart for)."""
    cfg = {**_GRAD_DEFAULTS, **deq_kwargs}
    if cfg["ift"] or cfg["hook_ift"]:
        return Exact()
    grad = cfg["grad"]
    if isinstance(grad, int) and cfg["tau"] == 1.0 and cfg["n_states"] == 1 and not cfg["indexing"]:
        return OneStep() if grad == 1 else Truncated(grad)
    return Exact()


def make_torchdeq_iqa(name: str = "torchdeq_iqa", **deq_kwargs: Any) -> Callable[..., torch.Tensor]:
    """An ``iqa`` contract kernel solving with ``torchdeq.get_deq(**deq_kwargs)`` (see the module doc).

    x: [B, N, Din]; w_q: [E, Dk]; w_k: [Din, Dk]; w_v: [Din, E] or None -> y: [B, N, E] (x's dtype).
    The layer is built on each call (it is stateless between calls: torchdeq keeps no fixed point)."""
    from torchdeq import get_deq  # optional extra "deq"

    get_deq(**deq_kwargs)  # refuse a bad configuration now, not on the first case

    def kernel(x, w_q, w_k, w_v=None, *, scale=None):
        sizes = check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
        s = iqa_default_scale(sizes.Dk) if scale is None else float(scale)
        cd = state_dtype_for(x.dtype)
        xc, wq = x.to(cd), w_q.to(cd)
        k = xc @ w_k.to(cd)
        v = xc @ w_v.to(cd) if w_v is not None else xc
        deq = get_deq(**deq_kwargs).train()
        z_out, _info = deq(lambda y: iqa_map(y, k, v, wq, s), v)
        return z_out[-1].to(x.dtype)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"iqa kernel: torchdeq get_deq({', '.join(f'{a}={b!r}' for a, b in deq_kwargs.items())})"
    kernel.iqa_info = IqaKernelInfo(backward=declared_backward(deq_kwargs))  # type: ignore[attr-defined]
    kernel.deq_kwargs = dict(deq_kwargs)  # type: ignore[attr-defined]
    return kernel


def __getattr__(attr: str) -> Any:
    # The registered configurations are built on first use, so importing this module needs no torchdeq.
    if attr in _REGISTERED:
        value = make_torchdeq_iqa(attr, **_REGISTERED[attr])
        globals()[attr] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


_REGISTERED: dict[str, dict[str, Any]] = {
    # torchdeq's defaults as a user gets them from get_deq(): plain iteration, 1-step phantom gradient.
    "torchdeq_default": {},
    # Anderson forward and an IFT backward solved by Anderson (exact gradient claimed).
    "torchdeq_anderson_ift": {"f_solver": "anderson", "b_solver": "anderson", "ift": True},
}
