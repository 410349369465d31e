"""flash-linear-attention's ``simple_gla`` kernels as ``la-forward`` kernels (SPEC §1).

Contract of every kernel here::

    la_forward(q, k, v, g, initial_state=None, *, scale=1.0) -> (o, final_state)
      q, k : [B, T, H, D]   v : [B, T, H, E]   g : [B, T, H] (log-decay, g <= 0)
      initial_state : [B, H, D, E] or None
      S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t,  final_state = S_T

How fla 0.6.0's conventions map onto it (checked in its source and by ``tests/test_adapters.py``):

* layout: fla takes ``[B, T, H, K]`` / ``[B, T, H, V]`` (``head_first`` was removed) — the same.
* ``g``: fla's "forget gate" ``[B, T, H]`` is the log-decay of the same recurrence; passed as is, in
  the inputs' dtype.
* ``scale``: fla's default is ``None`` meaning ``K ** -0.5``; the contract's is ``1.0``. The adapter
  always passes ``float(scale)``.
* ``initial_state``: the same ``[N, H, K, V]`` layout (``state_v_first=False``); ``None`` is zeros.
* ``cu_seqlens`` (packed batches, SPEC §6): passed through to fla unchanged by the three kernels with a
  state; ``parallel_simple_gla``'s adapter does not take it (reported "not varlen-capable").
* final state: only returned with ``output_final_state=True`` (always passed); fla returns it in
  float32 whatever the input dtype (allowed for bf16/fp16; for float64 inputs the contract asks for
  float64, and the suite reports what fla returns — the adapter does not cast).

Nothing else is done to inputs or outputs: every number the suite judges is fla's. Without a GPU
the kernels run in Triton's interpreter, see :mod:`iqa_verify.adapters._interpreter` for why and for
the three documented shims that make fla's (valid) Triton code run there.

``parallel_simple_gla`` computes ``o`` only: no initial state in, no final state out. It is adapted
by exact algebraic embeddings that keep every number fla's own (see :func:`parallel_simple_gla`).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Any

import torch

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError

__all__ = [
    "chunk_simple_gla",
    "fused_chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "parallel_simple_gla",
    "fla_simple_gla_module",
]


@functools.cache
def fla_simple_gla_module() -> ModuleType:
    """``fla.ops.simple_gla``, imported (once) so that its kernels run here: interpreted, with the shims of
    :mod:`iqa_verify.adapters._interpreter`, when there is no GPU."""
    from iqa_verify.adapters import _interpreter

    interpret = _interpreter.interpreter_needed()
    if interpret:
        _interpreter.enable_interpreter("fla")
    with warnings.catch_warnings():
        # fla warns "Triton is not supported on current platform, roll back to CPU" when it finds no GPU.
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        import fla.ops.simple_gla as module
    if interpret:
        _interpreter.shim_package_kernels("fla")
        _interpreter.fix_bf16_arithmetic()
    return module


def _op(name: str) -> Any:
    return getattr(fla_simple_gla_module(), name)


def _with_state(name: str, q, k, v, g, initial_state, scale: float, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor]:
    check_la_forward_inputs(q, k, v, g, initial_state, cu_seqlens)
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    o, final_state = _op(name)(q, k, v, g=g, scale=float(scale), initial_state=initial_state, output_final_state=True,
                               **extra)
    return o, final_state


def chunk_simple_gla(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``chunk_simple_gla`` (chunked: per-chunk states, intra-chunk matmuls, fla's own backward).

    q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None
    -> (o [B, T, H, E], final_state [B, H, D, E], float32 from fla). ``cu_seqlens`` is passed to fla as is."""
    return _with_state("chunk_simple_gla", q, k, v, g, initial_state, scale, cu_seqlens)


def fused_chunk_simple_gla(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``fused_chunk_simple_gla`` (one kernel walks the chunks carrying the state).

    Shapes as :func:`chunk_simple_gla`."""
    return _with_state("fused_chunk_simple_gla", q, k, v, g, initial_state, scale, cu_seqlens)


def fused_recurrent_simple_gla(q, k, v, g, initial_state=None, *, scale=1.0, cu_seqlens=None):
    """fla ``fused_recurrent_simple_gla`` (step-by-step recurrence in one kernel).

    Shapes as :func:`chunk_simple_gla`."""
    return _with_state("fused_recurrent_simple_gla", q, k, v, g, initial_state, scale, cu_seqlens)


def _eye_steps(n: int, h: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """[B, n=d, H, d]: step i carries the unit vector e_i in every head."""
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    return eye[None, :, None, :].expand(like.shape[0], n, h, d)


def parallel_simple_gla(q, k, v, g, initial_state=None, *, scale=1.0):
    """fla ``parallel_simple_gla`` (attention form, no state) adapted to the full contract by embedding.

    fla's kernel returns ``o`` only. Both state ends are added with extra time steps whose outputs
    are read from the same fla kernel, so that every judged number (and gradient) is fla's:

    * ``initial_state`` S_0 given: D steps are *prepended* with ``k = e_i``, ``v = S_0[i, :]``,
      ``g = 0``, ``q = 0``: after them the state is exactly ``sum_i e_i S_0[i, :] = S_0``, which the
      first real step then decays by ``exp(g_1)``. ``o`` is read from the real steps of that call.
    * ``final_state``: D steps are *appended* with ``k = 0``, ``v = 0``, ``g = 0``, ``q = e_i``: the
      state stays ``S_T``, and step i outputs ``scale * S_T^T e_i = scale * S_T[i, :]``. So
      ``final_state = o_probe / scale``, divided in ``state_dtype_for(dtype)`` (float32 for bf16/fp16,
      but rounded to the output dtype first: the state carries output precision, not state precision).
    * Without S_0, ``o`` comes from a plain call on the user's inputs (exactly what a user gets); the
      probe is a second call. With S_0 one call does both.

    ``scale = 0`` is refused (the state cannot be read through it). Shapes as :func:`chunk_simple_gla`.
    """
    B, T, H, D, E = check_la_forward_inputs(q, k, v, g, initial_state)
    scale = float(scale)
    if scale == 0.0:
        raise IqaVerifyError("scale=0.0: parallel_simple_gla's adapter reads the final state through scale, so scale must be non-zero")
    fla_parallel = _op("parallel_simple_gla")
    zeros_qk = q.new_zeros(B, D, H, D)
    probe = (_eye_steps(D, H, D, q), zeros_qk, v.new_zeros(B, D, H, E), g.new_zeros(B, D, H))
    parts = [(q, k, v, g), probe]
    if initial_state is not None:
        prefix = (zeros_qk, _eye_steps(D, H, D, k), initial_state.permute(0, 2, 1, 3), g.new_zeros(B, D, H))
        parts.insert(0, prefix)
    qq, kk, vv, gg = (torch.cat(ts, dim=1) for ts in zip(*parts))
    out, _ = fla_parallel(qq, kk, vv, g=gg, scale=scale)
    if initial_state is None:
        o, _ = fla_parallel(q, k, v, g=g, scale=scale)
    else:
        o = out[:, D : D + T]
    final_state = (out[:, -D:].to(state_dtype_for(q.dtype)) / scale).permute(0, 2, 1, 3)
    return o, final_state
