"""Correct kernels written independently of this repository's built-ins and references, for calibration.

They are kernels under test (nothing that judges a kernel imports them): each follows its family's
contract (SPEC.md) from a different formula than the built-ins and the float64 references, so that a
false alarm on one of them is a false alarm a user with a correct kernel would see. ``scripts/calibrate.py``
runs them beside the built-ins and the planted bugs; :data:`KERNELS` lists them per family.
"""

from __future__ import annotations

KERNELS: dict[str, tuple[str, ...]] = {
    "la-forward": (
        "tests/correct_kernels/la_forward.py:la_forward_f64_recurrent",
        "tests/correct_kernels/la_forward.py:la_forward_identity_dg",
        "tests/correct_kernels/la_forward.py:la_forward_tc_operands",
    ),
    "la-solve-v": (
        "tests/correct_kernels/la_inverse.py:la_solve_v_dense_f64",
        "tests/correct_kernels/la_inverse.py:la_solve_v_triangular_acc",
    ),
    "la-solve-k": (
        "tests/correct_kernels/la_inverse.py:la_solve_k_dense_f64",
        "tests/correct_kernels/la_inverse.py:la_solve_k_lstsq_acc",
    ),
    "la-solve-q": (
        "tests/correct_kernels/la_inverse.py:la_solve_q_per_step_f64",
        "tests/correct_kernels/la_inverse.py:la_solve_q_per_step_svd_acc",
    ),
    "gla-forward": (
        "tests/correct_kernels/gla_forward.py:gla_forward_f64_parallel",
        "tests/correct_kernels/gla_forward.py:gla_forward_identity_dg",
        "tests/correct_kernels/gla_forward.py:gla_forward_tc_operands",
    ),
    "delta-forward": (
        "tests/correct_kernels/delta_forward.py:delta_forward_f64_transitions",
        "tests/correct_kernels/delta_forward.py:delta_forward_identity_dg",
    ),
    "iqa": (
        "tests/correct_kernels/iqa.py:iqa_newton_f64",
        "tests/correct_kernels/iqa.py:iqa_picard_acc",
    ),
}
"""Family -> IMPL paths (as ``iqa-verify check`` takes them) of the independent correct kernels."""
