"""The ``la-solve-k`` family (Type2: K from Q, V, O; SPEC §2).

Built-in kernel: :func:`iqa_verify.kernels.la_solve_k.la_solve_k` (direct). The matrix-free
:func:`~iqa_verify.kernels.la_solve_k.la_solve_k_lsqr` is verified at seed 0 by a test, not a built-in.

The design notes' step-wise recursion :func:`~iqa_verify.kernels.la_solve_k.la_solve_k_recursion` is
deliberately *not* a built-in: it is exact (reproduces O) only for E = 1 and fails ``o-roundtrip``
and ``backward-error`` by tens of percent for E > 1, so it does not implement the Type2 contract. It is
verified where it is correct and caught where it is not:

- :data:`FAMILY_E1` is this family with every case restricted to E = 1. There the recursion solves the
  system exactly (backward-error, o-roundtrip, idempotent hold) but, for D > 1 and T > 1, it is still
  not the minimum-norm solution (``minimum-norm`` fails: k_t keeps the part of s_{t-1} along q_{t-1});
  ``tests/test_la_inverse_families.py`` checks both;
- ``tests/bug_zoo/la_inverse.py`` lists it as the planted bug "greedy Type2 recursion", caught for E > 1;
- :func:`iqa_verify.properties.la_inverse.solvability.solvability_map` measures its round-trip residual against
  LSQR's as E grows.
"""

from __future__ import annotations

import dataclasses


from iqa_verify.family import BuiltinKernel
from iqa_verify.properties.la_inverse.cases import Conditioning, solve_cases
from iqa_verify.properties.la_inverse.family import inverse_family
from iqa_verify.reference.la_inverse import Unknown

__all__ = ["FAMILY", "FAMILY_E1", "RECURSION_IMPL"]

RECURSION_IMPL = "iqa_verify.kernels.la_solve_k:la_solve_k_recursion"
"""The design notes' recursion: exact for E = 1 (not minimum-norm for D > 1), wrong for E > 1."""

FAMILY = inverse_family(Unknown.K, (
    BuiltinKernel("iqa_verify.kernels.la_solve_k:la_solve_k",
                  "direct float64 solve of the compressed system, one LU/QR per head (the notes' recursion is exact"
                  " for E = 1 only: see iqa_verify.properties.la_inverse.solve_k)"),
))
"""Not a built-in: :func:`~iqa_verify.kernels.la_solve_k.la_solve_k_lsqr` (matrix-free LSQR). It holds every
property at seed 0 in all four dtypes (ci profile), but under seed 4 (float32) an ill-conditioned case
runs LSQR to its iteration cap for minutes and it raises "no convergence" (honest, but not the contract's
answer): see tests/test_la_inverse_families.py and benchmarks/results/la_inverse.md."""


def _e1_cases(profile):
    """The family's cases with E = 1 and, since the recursion divides by |q_t|^2 and |v_t|^2, no exactly
    zero v_t (SINGULAR becomes ILL)."""
    def restrict(spec):
        cond = Conditioning.ILL if spec.conditioning is Conditioning.SINGULAR else spec.conditioning
        return dataclasses.replace(spec, la=dataclasses.replace(spec.la, E=1), conditioning=cond)

    return solve_cases(profile, Unknown.K).map(restrict)


def _e1_pinned(profile):
    return [dataclasses.replace(s, la=dataclasses.replace(s.la, E=1),
                                conditioning=Conditioning.ILL if s.conditioning is Conditioning.SINGULAR else s.conditioning)
            for s in FAMILY.pinned(profile)]


FAMILY_E1 = dataclasses.replace(FAMILY, cases=_e1_cases, pinned=_e1_pinned, builtin_kernels=(
    BuiltinKernel(RECURSION_IMPL, "the design notes' step-wise recursion: exact for E = 1 only, never minimum-norm for D > 1"),
))
"""``la-solve-k`` restricted to E = 1 (same name, properties and case format; not in the registry)."""

