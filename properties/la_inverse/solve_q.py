"""The ``la-solve-q`` family (Type3: Q from K, V, O; SPEC §2)."""

from __future__ import annotations

from iqa_verify.family import BuiltinKernel
from iqa_verify.properties.la_inverse.family import inverse_family
from iqa_verify.reference.la_inverse import Unknown

__all__ = ["FAMILY"]

FAMILY = inverse_family(Unknown.Q, (
    BuiltinKernel("iqa_verify.kernels.la_solve_q:la_solve_q", "per-step pinv(scale * S_t^T) o_t, chunked states"),
))
