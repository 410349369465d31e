"""Implicit query attention (family ``iqa``, SPEC §3): solvers, backward modes and the built-in kernel.

Float64 references live in :mod:`iqa_verify.reference.iqa`, sympy facts in :mod:`iqa_verify.reference.iqa_sympy`.
"""

from iqa_verify.contracts import check_iqa_forward_inputs
from iqa_verify.iqa.backward import BackwardMode, BackwardStats, Implicit, OneStep, Truncated, Unrolled
from iqa_verify.iqa.kernel import (
    DEFAULT_BACKWARD,
    DEFAULT_SOLVER,
    ImplicitQueryAttention,
    IqaStats,
    declare,
    iqa_default_scale,
    iqa_forward,
    iqa_forward_anderson_implicit,
    iqa_forward_anderson_one_step,
    iqa_forward_anderson_truncated,
    iqa_forward_broyden_implicit,
    iqa_forward_fixed_point_implicit,
    iqa_forward_fixed_point_unrolled,
    iqa_forward_with_stats,
    iqa_map,
)
from iqa_verify.iqa.solvers import (
    Anderson,
    Broyden,
    ConvergenceError,
    FixedPointIteration,
    Outcome,
    Solution,
    Solver,
)

__all__ = [
    "DEFAULT_BACKWARD",
    "DEFAULT_SOLVER",
    "Anderson",
    "BackwardMode",
    "BackwardStats",
    "Broyden",
    "ConvergenceError",
    "FixedPointIteration",
    "Implicit",
    "ImplicitQueryAttention",
    "IqaStats",
    "OneStep",
    "Outcome",
    "Solution",
    "Solver",
    "Truncated",
    "Unrolled",
    "check_iqa_forward_inputs",
    "declare",
    "iqa_default_scale",
    "iqa_forward",
    "iqa_forward_anderson_implicit",
    "iqa_forward_anderson_one_step",
    "iqa_forward_anderson_truncated",
    "iqa_forward_broyden_implicit",
    "iqa_forward_fixed_point_implicit",
    "iqa_forward_fixed_point_unrolled",
    "iqa_forward_with_stats",
    "iqa_map",
]
