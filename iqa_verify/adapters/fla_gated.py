"""flash-linear-attention's GLA and gated delta-rule kernels as ``gla-forward`` / ``delta-forward`` kernels (SPEC §6).

Contracts::

    gla_forward(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)   g : [B, T, H, D]
    delta_forward(q, k, v, beta, g=None, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)
                                                                                             beta, g : [B, T, H]

How fla 0.6.0's conventions map onto them (read in its source):

* layout ``[B, T, H, K]`` / ``[B, T, H, V]``, state ``[N, H, K, V]`` (``state_v_first=False``): the same.
* ``chunk_gla(q, k, v, g)`` and ``fused_recurrent_gla(q, k, v, gk=g)``: g is the per-key-dimension log gate.
* ``chunk_gated_delta_rule(q, k, v, g, beta)`` / ``fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta)``:
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, g the natural-log decay. The contract's
  ``g=None`` (no decay) is passed as ``g = 0`` (exp(0) = 1 exactly, so fla computes the plain delta rule);
  ``use_qk_l2norm_in_kernel=False``, ``use_beta_sigmoid_in_kernel=False``: the suite's keys and betas are passed as is.
* ``scale``: always passed as ``float(scale)`` (fla's default ``None`` means ``K ** -0.5``).
* final state: requested with ``output_final_state=True``; fla returns it in float32 (the adapter does not cast).
* ``cu_seqlens`` (packed batches, SPEC §6: B = 1, initial_state and final state [N, H, D, E]): passed through to
  fla unchanged by all four kernels (fla 0.6.0's ``chunk_gla``, ``fused_recurrent_gla``, ``chunk_gated_delta_rule``
  and ``fused_recurrent_gated_delta_rule`` take it with that meaning); omitted from the call when None.

fla's plain ``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` take no decay: they are not adapted (the
gated kernels with g = 0 cover the ungated rule with fla's own numbers). Without a GPU the kernels run in
Triton's interpreter with the shims of :mod:`iqa_verify.adapters._interpreter`.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

from iqa_verify.contracts import check_delta_forward_inputs, check_gla_forward_inputs

__all__ = ["chunk_gated_delta_rule", "chunk_gla", "fused_recurrent_gated_delta_rule", "fused_recurrent_gla"]


@functools.cache
def _fla_ops(name: str) -> ModuleType:
    """``fla.ops.<name>``, imported once so its kernels run here (interpreted, shimmed, when there is no GPU)."""
    from iqa_verify.adapters import _interpreter

    interpret = _interpreter.interpreter_needed()
    if interpret:
        _interpreter.enable_interpreter("fla")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        module = importlib.import_module(f"fla.ops.{name}")
    if interpret:
        _interpreter.shim_package_kernels("fla")
        _interpreter.fix_bf16_arithmetic()
    return module


def _packing(cu_seqlens: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """fla's ``cu_seqlens`` keyword when the call is packed; nothing otherwise (fla's own default)."""
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}


def chunk_gla(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``chunk_gla``. q, k, g: [B, T, H, D]; v: [B, T, H, E]; initial_state: [B, H, D, E] or None
    -> (o [B, T, H, E], final_state [B, H, D, E], float32 from fla). ``cu_seqlens`` is passed to fla as is."""
    check_gla_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    return _fla_ops("gla").chunk_gla(q, k, v, g, scale=float(scale), initial_state=initial_state,
                                      output_final_state=True, **_packing(cu_seqlens))


def fused_recurrent_gla(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``fused_recurrent_gla`` (gk = g). Shapes as :func:`chunk_gla`."""
    check_gla_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    return _fla_ops("gla").fused_recurrent_gla(q, k, v, gk=g, scale=float(scale), initial_state=initial_state,
                                                output_final_state=True, **_packing(cu_seqlens))


def _decay(beta: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(beta) if g is None else g


def chunk_gated_delta_rule(q, k, v, beta, g=None, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``chunk_gated_delta_rule`` (WY / UT chunked form). q, k: [B, T, H, D]; v: [B, T, H, E]; beta: [B, T, H];
    g: [B, T, H] or None (passed as 0); initial_state: [B, H, D, E] or None -> (o, final_state float32 from fla).
    ``cu_seqlens`` is passed to fla as is."""
    check_delta_forward_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    return _fla_ops("gated_delta_rule").chunk_gated_delta_rule(
        q, k, v, _decay(beta, g), beta, scale=float(scale), initial_state=initial_state, output_final_state=True,
        use_qk_l2norm_in_kernel=False, **_packing(cu_seqlens))


def fused_recurrent_gated_delta_rule(q, k, v, beta, g=None, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``fused_recurrent_gated_delta_rule``. Shapes as :func:`chunk_gated_delta_rule`."""
    check_delta_forward_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    return _fla_ops("gated_delta_rule").fused_recurrent_gated_delta_rule(
        q, k, v, g=_decay(beta, g), beta=beta, scale=float(scale), initial_state=initial_state,
        output_final_state=True, use_qk_l2norm_in_kernel=False, **_packing(cu_seqlens))
