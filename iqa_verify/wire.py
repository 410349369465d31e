"""Tensors across the process boundary between the supervisor and a kernel worker, layout and all.

A kernel is handed non-contiguous views (transposed, sliced, expanded with stride 0) and must read them
as they are, so a tensor travels as its whole storage plus the view on it (offset, sizes, strides, dtype,
device), never as a contiguous copy. Storages travel as raw bytes in an ordinary pickle (not through
torch's serialization, whose first use costs seconds in a fresh process): nothing is shared
between the processes, so a kernel that writes to its inputs cannot reach the supervisor's tensors.

Tensors that share a storage on one side share it on the other (the storage is sent once), and a
``requires_grad`` flag is carried but not restored (the receiver decides what is a leaf).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ctypes

import torch

__all__ = ["WireTensor", "pack", "unpack", "pack_map", "unpack_map", "cast_keeping_layout"]


@dataclass(frozen=True)
class WireTensor:
    """One tensor as it travels: ``storage`` indexes the message's storage list."""

    storage: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str
    requires_grad: bool


class _Packer:
    def __init__(self) -> None:
        self.storages: list[bytes] = []
        self.devices: list[str] = []
        self._seen: dict[tuple[str, int], int] = {}

    def tensor(self, t: torch.Tensor) -> WireTensor:
        t = t.detach()
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in self._seen or st.data_ptr() == 0:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
            self._seen[key] = len(self.storages)
            host = raw.cpu().contiguous()
            self.storages.append(ctypes.string_at(host.data_ptr(), host.numel()) if host.numel() else b"")
            self.devices.append(str(t.device))
        return WireTensor(self._seen[key], t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
                          str(t.device), t.requires_grad)


def _pack_value(p: _Packer, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return p.tensor(value)
    if isinstance(value, dict):
        return {k: _pack_value(p, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack_value(p, v) for v in value)
    return value


def pack(value: Any) -> tuple[Any, list[bytes]]:
    """``value`` (tensors nested in dicts, lists, tuples) as picklable data plus the storages it uses."""
    p = _Packer()
    return _pack_value(p, value), p.storages


def _unpack_value(value: Any, storages: list[bytes], on: dict[int, torch.Tensor], device: str | None) -> Any:
    if isinstance(value, WireTensor):
        where = device if device is not None else value.device
        if value.storage not in on:
            data = storages[value.storage]
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            on[value.storage] = raw.to(where)
        raw = on[value.storage]
        # an empty dtype-typed tensor on the storage, then the view exactly as it was sent
        return torch.empty(0, dtype=value.dtype, device=raw.device).set_(
            raw.untyped_storage(), value.offset, value.size, value.stride)
    if isinstance(value, dict):
        return {k: _unpack_value(v, storages, on, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack_value(v, storages, on, device) for v in value)
    return value


def unpack(value: Any, storages: list[bytes], device: str | None = None) -> Any:
    """The inverse of :func:`pack`: every tensor rebuilt with its layout, on ``device`` (default: where it was)."""
    return _unpack_value(value, storages, {}, device)


def pack_map(tensors: Mapping[str, torch.Tensor | None]) -> tuple[dict[str, Any], list[bytes]]:
    return pack(dict(tensors))


def unpack_map(packed: tuple[dict[str, Any], list[bytes]], device: str | None = None) -> dict[str, Any]:
    value, storages = packed
    return unpack(value, storages, device)


def cast_keeping_layout(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device`` with the same strides (stride-0 dims stay expanded, gaps stay gaps);
    ``Tensor.to`` would make a sliced or expanded tensor contiguous."""
    if t.dtype == dtype and t.device == device:
        return t
    zero = [d for d in range(t.ndim) if t.stride(d) == 0 and t.shape[d] > 1]
    if zero:
        base = t
        for d in zero:
            base = base.narrow(d, 0, 1)
        return cast_keeping_layout(base, dtype, device).expand(t.shape)
    n = t.untyped_storage().nbytes() // t.element_size()
    out = torch.zeros(n, dtype=dtype, device=device).as_strided(t.shape, t.stride(), t.storage_offset())
    return out.copy_(t)
