"""Where the suite's Triton kernels run: compiled on a GPU, or through Triton's interpreter on CPU.

One switch, the environment variable ``IQA_TRITON_INTERPRET`` (an :class:`InterpretMode`):

- ``auto`` (default): interpret exactly when CUDA is unavailable, so the same command verifies the
  Triton kernels on a laptop (CPU tensors, slowly) and compiles them on a GPU machine.
- ``1``: always interpret (kernels take CPU tensors; useful to debug a kernel on a GPU machine).
- ``0``: never interpret; without CUDA the Triton kernels are then unavailable (the provider says so).

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` *decorates* a function, so the mode must be
applied before any kernel module is imported: every ``iqa_verify.triton`` kernel module calls
:func:`apply_interpret_mode` on its first line, before ``import triton``. A ``TRITON_INTERPRET=1``
already set by the user is honoured (it forces interpretation whatever the switch says).

What the interpreter needs, and how the kernels here are written for it (on a GPU too, so there is one
code path):

- No autotuning. Block sizes come from :func:`block_sizes` (a deterministic rule of the problem
  sizes); there is no ``@triton.autotune``, whose benchmarking would time interpreted launches.
- Loop induction variables are plain Python ints in the interpreter (``n.to(tl.int64)`` fails there):
  kernels only build *tensors* from them (``n * BT + tl.arange(0, BT)``) and cast those to int64
  before multiplying by strides.
- ``tl.dot`` on bfloat16 operands is mishandled by the interpreter (bf16 is stored as uint16 in numpy).
  Every kernel upcasts its loaded tiles to the accumulation dtype (float32 for bf16/fp16/fp32 inputs,
  float64 for float64) before ``tl.dot`` with ``input_precision="ieee"``: that is also the suite's
  contract (float32 accumulation, no TF32), at the cost of tensor-core bf16 throughput on a GPU.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
from collections.abc import Iterator

__all__ = ["ENV_VAR", "InterpretMode", "interpret_mode", "interpreting", "apply_interpret_mode", "block_sizes",
           "unavailable_reason", "overflow_expected"]

ENV_VAR = "IQA_TRITON_INTERPRET"


class InterpretMode(enum.Enum):
    """Values of ``IQA_TRITON_INTERPRET``: AUTO (interpret without CUDA), ON (always), OFF (never)."""

    AUTO = "auto"
    ON = "1"
    OFF = "0"


def interpret_mode() -> InterpretMode:
    """The switch as set in the environment (unset or empty: AUTO); raises ValueError naming the valid values."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    aliases = {"": "auto", "true": "1", "on": "1", "yes": "1", "false": "0", "off": "0", "no": "0"}
    try:
        return InterpretMode(aliases.get(raw, raw))
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r}: must be auto, 1 or 0") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors) under the current settings."""
    if os.environ.get("TRITON_INTERPRET", "").strip() == "1":
        return True
    mode = interpret_mode()
    if mode is InterpretMode.AUTO:
        return not _cuda_available()
    return mode is InterpretMode.ON


def apply_interpret_mode() -> bool:
    """Set ``TRITON_INTERPRET`` from the switch (before ``import triton`` / ``@triton.jit``); returns
    whether kernels will be interpreted."""
    on = interpreting()
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    return on


def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here (None when they can): no triton, or no CUDA with interpretation off."""
    if importlib.util.find_spec("triton") is None:
        return "needs triton: pip install 'iqa-verify[triton]'"
    try:
        on = interpreting()
    except ValueError as exc:
        return str(exc)
    if not on and not _cuda_available():
        return f"needs CUDA, or {ENV_VAR}=auto|1 to run Triton's interpreter on CPU"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_sizes(*dims: int, minimum: int = 16) -> tuple[int, ...]:
    """Power-of-two tile sizes covering ``dims``, at least ``minimum`` (``tl.dot`` needs 16 on GPUs)."""
    return tuple(max(minimum, _next_pow2(d)) for d in dims)


@contextlib.contextmanager
def overflow_expected() -> Iterator[None]:
    """Around a launch whose overflow is detected and handled afterwards: keeps the interpreter's numpy
    from printing overflow/invalid-value warnings (a no-op for compiled kernels)."""
    if os.environ.get("TRITON_INTERPRET", "").strip() != "1":
        yield
        return
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        yield
