"""The kernel contracts (public API, ../shared/SPEC.md): argument checks shared by every kernel.

A kernel of a family may call the matching ``check_*_inputs`` first (la_forward, gla_forward, delta_forward,
the inverse forms, iqa); it raises
:class:`~iqa_verify.errors.IqaVerifyError` naming the bad argument and the rule, and returns the
sizes. Layout is ``(batch, time, heads, dim)`` as in flash-linear-attention.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from iqa_verify.errors import (
    IqaVerifyError,
    check_at_least,
    check_dtype,
    check_floating,
    check_ndim,
    check_same_device,
    check_shape,
)

__all__ = [
    "IQASizes",
    "LASizes",
    "check_cu_seqlens",
    "check_delta_forward_inputs",
    "check_gla_forward_inputs",
    "check_iqa_forward_inputs",
    "check_la_forward_inputs",
    "check_la_solve_inputs",
    "state_dtype_for",
]


class IQASizes(NamedTuple):
    B: int
    N: int
    Din: int
    Dk: int
    E: int


class LASizes(NamedTuple):
    B: int
    T: int
    H: int
    D: int
    E: int


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for bf16/fp16 inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, device: torch.device) -> int:
    """Validate a packed batch's ``cu_seqlens`` (SPEC §6) for inputs [B, T, ...]; returns N, the number of
    sequences. Rules: int64 [N + 1] on the inputs' device, N >= 1, cu[0] = 0, strictly increasing (every
    length >= 1), cu[N] <= T (positions from cu[N] on are padding), and B = 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise IqaVerifyError(f"cu_seqlens={cu_seqlens!r}: must be an int64 tensor [N + 1]")
    check_ndim("cu_seqlens", cu_seqlens, 1, "[N + 1]")
    check_dtype("cu_seqlens", cu_seqlens, torch.int64)
    check_same_device("cu_seqlens", cu_seqlens, device)
    cu = [int(c) for c in cu_seqlens.tolist()]
    if len(cu) < 2:
        raise IqaVerifyError(f"cu_seqlens={cu}: must hold N + 1 >= 2 offsets (at least one sequence)")
    if cu[0] != 0:
        raise IqaVerifyError(f"cu_seqlens={cu}: must start at 0")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise IqaVerifyError(f"cu_seqlens={cu}: must be strictly increasing (every sequence length >= 1)")
    if cu[-1] > T:
        raise IqaVerifyError(f"cu_seqlens={cu}: the last offset must be <= T={T}")
    if B != 1:
        raise IqaVerifyError(f"B={B}: a packed batch (cu_seqlens given) must have batch size 1")
    return len(cu) - 1


def check_la_forward_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> LASizes:
    """Validate ``la_forward(q, k, v, g, initial_state, cu_seqlens=cu_seqlens)`` arguments.

    q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    All on one device in one floating dtype; T >= 1, D >= 1, E >= 1. With ``cu_seqlens`` (a packed batch,
    see :func:`check_cu_seqlens`) B = 1 and initial_state is [N, H, D, E]; the returned sizes still say B = 1.
    """
    if cu_seqlens is not None:
        check_ndim("q", q, 4, "[1, T, H, D]")
        N = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], q.device)
        if initial_state is not None:
            check_shape("initial_state", initial_state, (N, *q.shape[2:3], q.shape[3], v.shape[-1]), "[N, H, D, E]")
        sizes = check_la_forward_inputs(q, k, v, g, None)
        if initial_state is not None:
            _check_like(q, {"initial_state": initial_state})
        return sizes
    check_ndim("q", q, 4, "[B, T, H, D]")
    check_floating("q", q)
    B, T, H, D = q.shape
    check_at_least("T", T, 1, "sequence length")
    check_at_least("D", D, 1, "key dimension")
    check_ndim("v", v, 4, "[B, T, H, E]")
    E = v.shape[-1]
    check_at_least("E", E, 1, "value dimension")
    check_shape("k", k, (B, T, H, D), "[B, T, H, D]")
    check_shape("v", v, (B, T, H, E), "[B, T, H, E]")
    sizes = LASizes(B, T, H, D, E)
    _check_decay_and_state(g, initial_state, sizes, q, {"k": k, "v": v})
    return sizes


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> LASizes:
    """q, k: [B, T, H, D]; v: [B, T, H, E]; q floating; T, D, E >= 1 (the shared head of the forward checks)."""
    check_ndim("q", q, 4, "[B, T, H, D]")
    check_floating("q", q)
    B, T, H, D = q.shape
    check_at_least("T", T, 1, "sequence length")
    check_at_least("D", D, 1, "key dimension")
    check_ndim("v", v, 4, "[B, T, H, E]")
    E = v.shape[-1]
    check_at_least("E", E, 1, "value dimension")
    check_shape("k", k, (B, T, H, D), "[B, T, H, D]")
    check_shape("v", v, (B, T, H, E), "[B, T, H, E]")
    return LASizes(B, T, H, D, E)


def check_gla_forward_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> LASizes:
    """Validate ``gla_forward(q, k, v, g, initial_state, cu_seqlens=cu_seqlens)`` arguments (SPEC §6,
    per-key-dimension gates).

    q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H, D] (log gate per key dimension);
    initial_state: [B, H, D, E] or None. All on one device in one floating dtype; T, D, E >= 1. With
    ``cu_seqlens`` (a packed batch, see :func:`check_cu_seqlens`) B = 1 and initial_state is [N, H, D, E].
    """
    sizes = _check_qkv(q, k, v)
    B, T, H, D, E = sizes
    check_shape("g", g, (B, T, H, D), "[B, T, H, D]")
    tensors = {"k": k, "v": v, "g": g}
    _check_state(initial_state, sizes, q, cu_seqlens, tensors)
    _check_like(q, tensors)
    return sizes


def check_delta_forward_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> LASizes:
    """Validate ``delta_forward(q, k, v, beta, g, initial_state, cu_seqlens=cu_seqlens)`` arguments (SPEC §6,
    the delta rule).

    q, k: [B, T, H, D]; v: [B, T, H, E]; beta: [B, T, H]; g: [B, T, H] (log-decay) or None;
    initial_state: [B, H, D, E] or None. All on one device in one floating dtype; T, D, E >= 1. With
    ``cu_seqlens`` (a packed batch, see :func:`check_cu_seqlens`) B = 1 and initial_state is [N, H, D, E].
    """
    sizes = _check_qkv(q, k, v)
    B, T, H, D, E = sizes
    check_shape("beta", beta, (B, T, H), "[B, T, H]")
    tensors = {"k": k, "v": v, "beta": beta}
    if g is not None:
        check_shape("g", g, (B, T, H), "[B, T, H]")
        tensors["g"] = g
    _check_state(initial_state, sizes, q, cu_seqlens, tensors)
    _check_like(q, tensors)
    return sizes


def _check_state(initial_state: torch.Tensor | None, sizes: LASizes, q: torch.Tensor, cu_seqlens: torch.Tensor | None,
                 tensors: dict[str, torch.Tensor]) -> None:
    """initial_state [B, H, D, E] (or [N, H, D, E] for a packed batch, whose ``cu_seqlens`` is checked too) or
    None; a given state joins ``tensors`` (checked for dtype and device by the caller)."""
    B, T, H, D, E = sizes
    rows, layout = B, "[B, H, D, E]"
    if cu_seqlens is not None:
        rows, layout = check_cu_seqlens(cu_seqlens, B, T, q.device), "[N, H, D, E]"
    if initial_state is not None:
        check_shape("initial_state", initial_state, (rows, H, D, E), layout)
        tensors["initial_state"] = initial_state


def _check_decay_and_state(g: torch.Tensor, initial_state: torch.Tensor | None, sizes: LASizes, first: torch.Tensor,
                           others: dict[str, torch.Tensor]) -> None:
    """g [B, T, H] and initial_state [B, H, D, E] or None, then every tensor in ``others``, g and the
    initial state in ``first``'s dtype and on its device (the shared tail of the linear-attention checks)."""
    B, T, H, D, E = sizes
    check_shape("g", g, (B, T, H), "[B, T, H]")
    tensors = dict(others, g=g)
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, D, E), "[B, H, D, E]")
        tensors["initial_state"] = initial_state
    _check_like(first, tensors)


def _check_like(first: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor in ``first``'s dtype and on its device."""
    for name, t in tensors.items():
        check_dtype(name, t, first.dtype)
        check_same_device(name, t, first.device)


_LAYOUT = {"q": "D", "k": "D", "v": "E", "o": "E"}


def check_la_solve_inputs(named: dict[str, torch.Tensor], g: torch.Tensor, initial_state: torch.Tensor | None,
                          cu_seqlens: torch.Tensor | None = None) -> LASizes:
    """Validate the inputs of an inverse kernel; returns (B, T, H, D, E).

    named: the three [B, T, H, *] inputs in contract order, keyed by their names (``q``, ``k``: last
    dim D; ``v``, ``o``: last dim E); g: [B, T, H]; initial_state: [B, H, D, E] or None. One floating
    dtype and one device; T, D, E >= 1. With ``cu_seqlens`` (a packed batch, SPEC §6, see
    :func:`check_cu_seqlens`) B = 1 and initial_state is [N, H, D, E]; the returned sizes still say B = 1.
    """
    if cu_seqlens is not None:
        first_name, first = next(iter(named.items()))
        check_ndim(first_name, first, 4, f"[1, T, H, {_LAYOUT[first_name]}]")
        N = check_cu_seqlens(cu_seqlens, first.shape[0], first.shape[1], first.device)
        sizes = check_la_solve_inputs(named, g, None)
        if initial_state is not None:
            check_shape("initial_state", initial_state, (N, sizes.H, sizes.D, sizes.E), "[N, H, D, E]")
            _check_like(first, {"initial_state": initial_state})
        return sizes
    first_name, first = next(iter(named.items()))
    check_ndim(first_name, first, 4, f"[B, T, H, {_LAYOUT[first_name]}]")
    check_floating(first_name, first)
    B, T, H, _ = first.shape
    check_at_least("T", T, 1, "sequence length")
    dims: dict[str, int] = {}
    for name, t in named.items():
        layout = f"[B, T, H, {_LAYOUT[name]}]"
        check_ndim(name, t, 4, layout)
        dims.setdefault(_LAYOUT[name], t.shape[-1])
        check_shape(name, t, (B, T, H, dims[_LAYOUT[name]]), layout)
    D, E = dims["D"], dims["E"]
    check_at_least("D", D, 1, "key dimension")
    check_at_least("E", E, 1, "value dimension")
    sizes = LASizes(B, T, H, D, E)
    _check_decay_and_state(g, initial_state, sizes, first, named)
    return sizes


def check_iqa_forward_inputs(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor | None, scale: float | None = None
) -> IQASizes:
    """Validate ``iqa_forward(x, w_q, w_k, w_v, scale=scale)`` arguments and return the sizes.

    x: [B, N, Din]; w_k: [Din, Dk]; w_q: [E, Dk]; w_v: [Din, E] or None (E = Din); all on one device
    in one floating dtype; B, N, Din, Dk, E >= 1; scale finite when given.
    """
    check_ndim("x", x, 3, "[B, N, Din]")
    check_floating("x", x)
    B, N, Din = x.shape
    check_at_least("B", B, 1, "batch size")
    check_at_least("N", N, 1, "number of tokens")
    check_at_least("Din", Din, 1, "input dimension")
    check_ndim("w_k", w_k, 2, "[Din, Dk]")
    Dk = w_k.shape[1]
    check_at_least("Dk", Dk, 1, "key dimension")
    check_shape("w_k", w_k, (Din, Dk), "[Din, Dk]")
    if w_v is not None:
        check_ndim("w_v", w_v, 2, "[Din, E]")
        E = w_v.shape[1]
        check_at_least("E", E, 1, "value dimension")
        check_shape("w_v", w_v, (Din, E), "[Din, E]")
    else:
        E = Din
    check_shape("w_q", w_q, (E, Dk), "[E, Dk] (E = Din when w_v is None)")
    _check_like(x, {"w_q": w_q, "w_k": w_k} | ({"w_v": w_v} if w_v is not None else {}))
    if scale is not None and not math.isfinite(scale):
        raise IqaVerifyError(f"scale={scale}: must be finite")
    return IQASizes(B, N, Din, Dk, E)
