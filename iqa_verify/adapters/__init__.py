"""Adapters: third-party kernels under the suite's contracts (an optional-kernel provider).

* :mod:`iqa_verify.adapters.fla` — flash-linear-attention's ``simple_gla`` kernels as ``la-forward``
  kernels (extra ``fla``: ``fla-core``, ``einops``; Triton's interpreter when there is no GPU).
* :mod:`iqa_verify.adapters.fla_gated` — flash-linear-attention's GLA and gated delta-rule kernels as
  ``gla-forward`` and ``delta-forward`` kernels (same extra).
* :mod:`iqa_verify.adapters.torchdeq` — torchdeq's DEQ solvers and backward modes as ``iqa`` kernels
  (extra ``deq``: ``torchdeq``).

:func:`optional_kernels` lists the registered ones for :mod:`iqa_verify.registry`; it only *finds*
the packages (``importlib.util.find_spec``), so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util

from iqa_verify.family import BuiltinKernel
from iqa_verify.registry import OptionalKernel

__all__ = ["optional_kernels"]

_FLA = "iqa_verify.adapters.fla"
_DEQ = "iqa_verify.adapters.torchdeq"
_FLA_GATED = "iqa_verify.adapters.fla_gated"
_FLA_PKGS = ("fla", "triton", "einops")

# (family, kernel, summary, packages it needs). parallel_simple_gla is not registered: it has no state
# of its own (adapted by embedding, see its docstring); verify it by name.
_KERNELS: tuple[tuple[str, BuiltinKernel, tuple[str, ...]], ...] = (
    ("la-forward", BuiltinKernel(f"{_FLA}:chunk_simple_gla", "fla 0.6.0 chunk_simple_gla (Triton)"), ("fla", "triton", "einops")),
    ("la-forward", BuiltinKernel(f"{_FLA}:fused_recurrent_simple_gla", "fla 0.6.0 fused_recurrent_simple_gla (Triton)"),
     ("fla", "triton", "einops")),
    ("gla-forward", BuiltinKernel(f"{_FLA_GATED}:chunk_gla", "fla 0.6.0 chunk_gla (Triton)"), _FLA_PKGS),
    ("gla-forward", BuiltinKernel(f"{_FLA_GATED}:fused_recurrent_gla", "fla 0.6.0 fused_recurrent_gla (Triton)"), _FLA_PKGS),
    ("delta-forward", BuiltinKernel(f"{_FLA_GATED}:chunk_gated_delta_rule",
                                    "fla 0.6.0 chunk_gated_delta_rule (Triton, WY/UT chunks; g=None passed as 0)"), _FLA_PKGS),
    ("delta-forward", BuiltinKernel(f"{_FLA_GATED}:fused_recurrent_gated_delta_rule",
                                    "fla 0.6.0 fused_recurrent_gated_delta_rule (Triton; g=None passed as 0)"), _FLA_PKGS),
    ("iqa", BuiltinKernel(f"{_DEQ}:torchdeq_default", "torchdeq 0.1.0 get_deq() defaults: fixed_point_iter, 1-step phantom gradient"),
     ("torchdeq",)),
    ("iqa", BuiltinKernel(f"{_DEQ}:torchdeq_anderson_ift", "torchdeq 0.1.0 anderson forward, IFT backward (anderson)"),
     ("torchdeq",)),
)


def _missing(packages: tuple[str, ...]) -> str | None:
    absent = [p for p in packages if importlib.util.find_spec(p) is None]
    return f"not installed: {', '.join(absent)}" if absent else None


def optional_kernels() -> list[OptionalKernel]:
    """The adapters' kernels; ``missing`` names the absent packages (None: runnable here)."""
    return [OptionalKernel(family=fam, kernel=k, missing=_missing(pkgs), third_party=True) for fam, k, pkgs in _KERNELS]
