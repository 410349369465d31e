"""Triton kernels of the suite (an optional provider, see :data:`iqa_verify.registry.PROVIDERS`, entry point group ``iqa_verify.kernels``).

- ``iqa_verify.triton.la_forward:la_forward_triton`` (family ``la-forward``): chunked forward and backward.
- ``iqa_verify.triton.la_solve_v:la_solve_v_triton`` (family ``la-solve-v``): chunked Type1 solve.
- ``iqa_verify.triton.iqa_map:iqa_forward_triton`` (family ``iqa``): the IQA map fused in Triton inside
  the suite's Anderson solver and implicit backward.

Importing this package is cheap: it neither imports triton nor the kernel modules. Where the kernels
run (compiled on CUDA, or Triton's interpreter on CPU) is set by ``IQA_TRITON_INTERPRET``
(:mod:`iqa_verify.triton.mode`).
"""

from __future__ import annotations

from dataclasses import replace

from iqa_verify.family import BuiltinKernel
from iqa_verify.registry import OptionalKernel
from iqa_verify.triton.mode import unavailable_reason

__all__ = ["optional_kernels", "TRITON_KERNELS"]

TRITON_KERNELS: tuple[tuple[str, BuiltinKernel], ...] = (
    ("la-forward", BuiltinKernel("iqa_verify.triton.la_forward:la_forward_triton",
                                 "Triton, chunked: a program per (batch, head), state in registers, hand-written backward")),
    ("la-solve-v", BuiltinKernel("iqa_verify.triton.la_solve_v:la_solve_v_triton",
                                 "Triton, chunked substitution (in-chunk inverse by doubling + refinement); pinv for singular heads")),
    ("iqa", BuiltinKernel("iqa_verify.triton.iqa_map:iqa_forward_triton",
                          "Anderson + implicit backward around a fused Triton map (flash-style softmax, fused projection)")),
)


def optional_kernels() -> list[OptionalKernel]:
    """The Triton kernels, each with ``missing`` set when triton (or a device to run it on) is absent."""
    missing = unavailable_reason()
    if missing is None:
        from iqa_verify.triton.mode import interpreting

        # in the interpreter: CPU tensors, the smoke profile (slow); compiled: CUDA tensors only
        hints = {"profile": "smoke", "device": "cpu"} if interpreting() else {"device": "cuda"}
        return [OptionalKernel(family=fam, kernel=replace(kernel, **hints)) for fam, kernel in TRITON_KERNELS]
    return [OptionalKernel(family=fam, kernel=kernel, missing=missing) for fam, kernel in TRITON_KERNELS]
