"""The ``la-solve-v`` family (Type1: V from Q, K, O; SPEC §2)."""

from __future__ import annotations

from iqa_verify.family import BuiltinKernel
from iqa_verify.properties.la_inverse.family import inverse_family
from iqa_verify.reference.la_inverse import Unknown

__all__ = ["FAMILY"]

FAMILY = inverse_family(Unknown.V, (
    BuiltinKernel("iqa_verify.kernels.la_solve_v:la_solve_v",
                  "chunked forward substitution (64 steps, triangular solves); dense pinv for singular heads"),
    BuiltinKernel("iqa_verify.kernels.la_solve_v:la_solve_v_sequential",
                  "forward substitution, a loop over time; dense pinv for singular heads"),
))
