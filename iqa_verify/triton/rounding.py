"""Rounding a kernel's float32 results to its output dtype the same way compiled and interpreted.

Compiled, ``x.to(tl.bfloat16)`` rounds to nearest even (Triton's default ``fp_downcast_rounding``). Triton's
interpreter (3.x, ``runtime/interpreter.py``) converts float32 to bfloat16 by its bit-level converter without a
rounding mode: it truncates, so on CPU every bf16 result sat up to one ulp off where a GPU is within half an
ulp, and la-solve-v's Triton solver reached 0.98-0.996 of the componentwise allowance that two round-to-nearest
roundings use (calibration, issue #14); its converter also garbles float32 subnormals. :func:`to_output` rounds
bf16 results to nearest even on the bits and reinterprets the upper half as bf16 (no float conversion at all), the
same on a GPU and in the interpreter; other dtypes are cast as they were (the interpreter converts float16 with
numpy, to nearest).

    upper 16 bits of  bits(x) + 0x7FFF + (bit 16 of bits(x)):  round half to even on the magnitude (a carry
    into the exponent rounds up a binade or to inf, as it should; subnormals round like any other number);
    NaN keeps its sign and upper bits, made quiet (the bias could carry a NaN's bits into another value).
"""

from __future__ import annotations

from iqa_verify.triton.mode import apply_interpret_mode

apply_interpret_mode()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["to_output"]


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """``x`` (the accumulation dtype) in the output ``dtype``, rounded to nearest even compiled and interpreted."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        upper = tl.where(x == x, upper, (bits >> 16) | 0x40)  # NaN stays a (quiet) NaN of the same sign
        return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
