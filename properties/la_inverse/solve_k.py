"""The ``la-solve-k`` family (Type2: K from Q, V, O; SPEC §2).

Built-in kernel: :func:`iqa_verify.kernels.la_solve_k.la_solve_k` (direct). The matrix-free
:func:`~iqa_verify.kernels.la_solve_k.la_solve_k_lsqr` is verified at seed 0 by a test, not a built-in.

The design notes' step-wise recursion :func:`~iqa_verify.kernels.la_solve_k.la_solve_k_recursion` is
deliberately *not* a built-in: it is exact (reproduces O) only for E = 1 and fails ``o-roundtrip``
and ``backward-error`` by tens of percent for E > 1, so it does not implement the Type2 contract. It is
verified where it is correct and caught where it is not:

- ``tests/test_la_inverse_families.py`` declares, for the test alone, this family with every case
  restricted to E = 1. There the recursion solves the system exactly (backward-error, o-roundtrip,
  idempotent hold) but, for D > 1 and T > 1, it is still not the minimum-norm solution (``minimum-norm``
  fails: k_t keeps the part of s_{t-1} along q_{t-1}); the test checks both;
- ``tests/bug_zoo/la_inverse.py`` lists it as the planted bug "greedy Type2 recursion", caught for E > 1;
- :func:`iqa_verify.properties.la_inverse.solvability.solvability_map` measures its round-trip residual against
  LSQR's as E grows.
"""

from __future__ import annotations

from iqa_verify.family import BuiltinKernel
from iqa_verify.properties.la_inverse.family import inverse_family
from iqa_verify.reference.la_inverse import Unknown

__all__ = ["FAMILY"]

FAMILY = inverse_family(Unknown.K, (
    BuiltinKernel("iqa_verify.kernels.la_solve_k:la_solve_k",
                  "direct float64 solve of the compressed system, one LU/QR per head (the notes' recursion is exact"
                  " for E = 1 only: see iqa_verify.properties.la_inverse.solve_k)"),
))
"""Not a built-in: :func:`~iqa_verify.kernels.la_solve_k.la_solve_k_lsqr` (matrix-free LSQR). It holds every
property at seed 0 in all four dtypes (ci profile), but under seed 4 (float32) an ill-conditioned case
runs LSQR to its iteration cap for minutes and it raises "no convergence" (honest, but not the contract's
answer): see tests/test_la_inverse_families.py and benchmarks/results/la_inverse.md."""

