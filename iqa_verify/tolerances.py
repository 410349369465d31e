"""The one tolerance table and the same-precision baseline rule.

Every comparison in the suite takes its tolerance from :data:`TABLE`; no call site carries a
tolerance literal. An entry is keyed by ``(Kind, dtype)`` and gives ``rtol`` and ``atol`` together,
plus the baseline factor of the rule below.

The rule (SPEC §5, as in the flash-attention tests), elementwise for a tensor ``x`` against its
float64 reference ``r`` with a same-dtype baseline computation ``b``::

    err_i     = |x_i - r_i|
    allowed_i = rtol * |r_i|  +  atol * max(‖r‖∞, tiny)  +  baseline_factor * ‖b - r‖∞  [+ eps_acc * N_i]

``atol`` is relative to the tensor's own scale ``‖r‖∞`` (inputs span many magnitudes, so an absolute
``atol`` would be too loose for small tensors and too strict for large ones); ``tiny`` is the
smallest normal number of the dtype (a floor so an all-zero reference does not demand bitwise
zeros). The baseline term lets a kernel be as wrong as a multiple of what a straightforward PyTorch
computation in the same precision (float32 accumulation for bf16/fp16) gets wrong on the same input,
so hard inputs (long sequences, strong decay) do not raise false alarms while a kernel that loses
precision the baseline keeps (bf16 state, bf16 cumsum of the log-decay) still fails.

The bracketed natural-scale term applies where a family declares one (``N_i``: the size of the terms a
standard algorithm subtracts to form ``x_i``, times the length of its rounding chain; see
:attr:`Kind.NATURAL_SCALE`), or, for the recurrent forward families' values, the root-sum-square of the terms
whose operands tensor-core products round to the input dtype (:attr:`Kind.OPERAND_ROUNDING`, ``eps_x * N_i``).

The error ratio ``max_i err_i / allowed_i`` is what reports and the gate track; a tensor passes
when it is <= 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from iqa_verify.errors import IqaVerifyError

__all__ = ["Kind", "Tolerance", "TABLE", "tolerance"]


class Kind(enum.Enum):
    """What is compared: values, gradients, a float64 reference against an exact oracle, or a
    fixed-point residual ``f(y) - y`` against zero (its ``atol`` is in units of the values' scale)."""

    VALUE = "value"
    GRAD = "grad"
    REFERENCE = "reference"
    # Solvers of the inverse forms (la-solve-v/k/q). Their outputs cannot be judged elementwise against a
    # reference where the system is ill-conditioned or singular, so they are judged by normwise error
    # bounds: BACKWARD_ERROR bounds ‖A^T(A x - b)‖ / (‖A‖ (‖A‖ ‖x‖ + ‖b‖)) and the O round-trip
    # residual; FORWARD_ERROR is the factor c in ‖x - x_ref‖ <= c * kappa(A) * ‖x_ref‖ (+ kappa^2 term).
    BACKWARD_ERROR = "backward-error"
    FORWARD_ERROR = "forward-error"
    RESIDUAL = "residual"
    # Reference-free (metamorphic) properties: two runs of the same kernel that must agree, e.g. one call
    # against the same sequence split in two with the state handed over. Their atol is in units of a
    # magnitude bound computed from |q|, |k|, |v|, |S_0| (and the cotangents), not of the output itself.
    METAMORPHIC = "metamorphic"
    METAMORPHIC_GRAD = "metamorphic-grad"
    # Natural scale (SPEC §5): where standard stable algorithms compute a quantity as a difference of larger
    # terms, their rounding is eps times the size of those terms, not of the result. A family declares, per
    # tensor, N = n * sum|terms| (n the length of the longest chain of roundings, Higham's gamma_n bound); the
    # entry's rtol is the unit of that bound: allowed_i += rtol * N_i.
    NATURAL_SCALE = "natural-scale"
    # Componentwise forward error of Type1 (a triangular solve, componentwise backward stable): allowed
    # ulp(x_ref) + atol * z elementwise, z Skeel's |A^{-1}| (weights ⊙ |A|_mag |x| + ...) (la_inverse.checks._skeel).
    COMPONENTWISE = "componentwise"
    # Operand rounding (SPEC §5): tensor-core products take their operands in the input dtype, so a chunked
    # kernel rounds the intra-chunk attention matrix, the chunk-start state and the decayed keys once each. A
    # family declares, per output element, N = the root-sum-square of the terms so rounded
    # (iqa_verify.properties.recurrent_forward.operands); allowed_i += rtol * N_i.
    OPERAND_ROUNDING = "operand-rounding"


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    baseline_factor: float
    source: str = ""

    def describe(self) -> str:
        return (
            f"rtol={self.rtol:g}, atol={self.atol:g} (x scale), baseline_factor={self.baseline_factor:g}"
            f" from {self.source}"
        )


def _entries() -> dict[tuple[Kind, torch.dtype], Tolerance]:
    raw = {
        # kind, dtype:                        rtol,   atol,   baseline factor
        (Kind.VALUE, torch.float64): (1e-10, 1e-10, 4.0),
        (Kind.VALUE, torch.float32): (2e-5, 2e-5, 4.0),
        (Kind.VALUE, torch.float16): (2e-3, 2e-3, 4.0),
        (Kind.VALUE, torch.bfloat16): (1e-2, 4e-3, 4.0),
        (Kind.GRAD, torch.float64): (1e-9, 1e-9, 8.0),
        (Kind.GRAD, torch.float32): (1e-4, 1e-4, 8.0),
        (Kind.GRAD, torch.float16): (5e-3, 5e-3, 8.0),
        (Kind.GRAD, torch.bfloat16): (4e-2, 4e-2, 8.0),
        # Solvers (atol only: the expected value is 0, or the scale is a normwise bound). A backward-stable
        # solver reaches a few eps; the allowance is 1024 eps of the output dtype because a least-squares
        # solver may treat singular values below ~64 max(D, E) eps sigma_max as zero (a rank decision in
        # the accumulation dtype, see la_solve_q.RANK_RTOL_ULPS), which leaves a residual of that size.
        # bf16/fp16 solvers accumulate in float32; rounding the answer leaves ~eps of the output dtype.
        (Kind.BACKWARD_ERROR, torch.float64): (0.0, 1024 * 2.0**-52, 0.0),
        (Kind.BACKWARD_ERROR, torch.float32): (0.0, 1024 * 2.0**-23, 0.0),
        (Kind.BACKWARD_ERROR, torch.float16): (0.0, 8 * 2.0**-10, 0.0),
        (Kind.BACKWARD_ERROR, torch.bfloat16): (0.0, 8 * 2.0**-7, 0.0),
        (Kind.FORWARD_ERROR, torch.float64): (0.0, 1024 * 2.0**-52, 0.0),
        (Kind.FORWARD_ERROR, torch.float32): (0.0, 1024 * 2.0**-23, 0.0),
        # bf16/fp16 solvers: float32 accumulation (float32's atol) plus rounding the answer to the
        # output dtype, an elementwise relative error of half an ulp (rtol = one ulp, 2u).
        (Kind.FORWARD_ERROR, torch.float16): (2.0**-10, 1024 * 2.0**-23, 0.0),
        (Kind.FORWARD_ERROR, torch.bfloat16): (2.0**-7, 1024 * 2.0**-23, 0.0),
        # Natural-scale terms: rtol = eps of the accumulation dtype (float32 for bf16/fp16: the expected practice,
        # SPEC §5), so a standard algorithm's deterministic rounding bound |error| <= gamma_n sum|terms|
        # (gamma_n = n u / (1 - n u) <= n eps for n u <= 1/2) is admitted with a factor 2 to spare, and an
        # algorithm that rounds the terms or their sums in bf16/fp16 (2^-8, 2^-11) exceeds it by ~2^15 / sqrt(n).
        # Used for the decay gradient, dg_t = sum_{s>=t} (q_s·dq_s - k_s·dk_s) + <dS_T, S_T> (the identity of the
        # GLA paper and flash-linear-attention; the float64 references and the baseline never form it, so only
        # this term admits it): under underflowing decay dg is ~1e-20 while the terms are O(1).
        (Kind.NATURAL_SCALE, torch.float64): (2.0**-52, 0.0, 0.0),
        (Kind.NATURAL_SCALE, torch.float32): (2.0**-23, 0.0, 0.0),
        (Kind.NATURAL_SCALE, torch.float16): (2.0**-23, 0.0, 0.0),
        (Kind.NATURAL_SCALE, torch.bfloat16): (2.0**-23, 0.0, 0.0),
        # Operand rounding: rtol = eps of the input dtype = 2u, x the root-sum-square N of the terms whose operands
        # are rounded once each (each errs by <= u |term|, signs independent: the sum's standard deviation is
        # u N / sqrt(3), so 2u N is ~3.5 of them). Measured (issue #14): a chunked kernel with bf16 tensor-core
        # operands (tests/correct_kernels, la/gla_forward_tc_operands) failed `values` at 1.97 on a dev case with
        # heavy cancellation (T = 257, D = E = 1) and sat at 0.37-0.50 on ci seeds; fla's chunk_simple_gla at 0.57.
        # Rounding a running sum (bf16 state, bf16 cumulative gate) errs per step by u |partial sum|, which grows
        # with the sequence where N does not (bug zoo: still caught, reports/evidence/calibration.md).
        (Kind.OPERAND_ROUNDING, torch.float64): (2.0**-52, 0.0, 0.0),
        (Kind.OPERAND_ROUNDING, torch.float32): (2.0**-23, 0.0, 0.0),
        (Kind.OPERAND_ROUNDING, torch.float16): (2.0**-10, 0.0, 0.0),
        (Kind.OPERAND_ROUNDING, torch.bfloat16): (2.0**-7, 0.0, 0.0),
        # Componentwise forward error (Type1 where identifiable and kappa eps small): atol is the unit of Skeel's z,
        # 2 eps of the accumulation dtype (the rounding weights n + |b_t| + |b_j| are inside z, so gamma_n <= n eps
        # is admitted twice over); rtol is 0 because the answer's rounding enters as one ulp of x_ref in the output
        # dtype (twice the half-ulp round-to-nearest costs). A bf16-state Type1 solver errs by ~2 ulps of v at ci
        # sizes (eps_bf16 times the carried term, sqrt(t) times v), which the normwise bound (rtol = eps_bf16 on
        # top of kappa ‖x‖ atol) did not see (worst ratio 0.86, issue #14).
        (Kind.COMPONENTWISE, torch.float64): (0.0, 2 * 2.0**-52, 0.0),
        (Kind.COMPONENTWISE, torch.float32): (0.0, 2 * 2.0**-23, 0.0),
        (Kind.COMPONENTWISE, torch.float16): (0.0, 2 * 2.0**-23, 0.0),
        (Kind.COMPONENTWISE, torch.bfloat16): (0.0, 2 * 2.0**-23, 0.0),
        # float64 references against sympy closed forms and against each other
        (Kind.REFERENCE, torch.float64): (1e-12, 1e-12, 0.0),
        # Fixed-point residuals (family iqa): f(y) - y of a kernel's output, evaluated in float64, against
        # zero; rtol has nothing to act on (the reference is 0) and is 0. atol x max(|y|, |V|) covers a
        # solver stopping at its default relative residual (iqa_verify.iqa.solvers.DEFAULT_TOL: 1e-12,
        # 1e-6 in float32 compute; a Frobenius residual spreads over <= N*E entries); the baseline term
        # is the residual of the float64 fixed point rounded to the kernel's dtype (what rounding the
        # output alone costs: dominant for bf16/fp16 outputs). The same atol bounds how far a reported
        # "converged" residual may sit above the stated tolerance when recomputed in float64.
        (Kind.RESIDUAL, torch.float64): (0.0, 1e-10, 4.0),
        (Kind.RESIDUAL, torch.float32): (0.0, 2e-5, 4.0),
        (Kind.RESIDUAL, torch.float16): (0.0, 2e-3, 4.0),
        (Kind.RESIDUAL, torch.bfloat16): (0.0, 4e-3, 4.0),
        # Metamorphic comparisons (the recurrent forward families' state-handoff, causality,
        # sequence-independence, varlen-one-by-one): two runs of one kernel on inputs that must give the same
        # numbers, computed in different orders (a chunked kernel's chunk boundaries move when a sequence is
        # split). Rounding in any summation order is <= n eps sum|terms|, and sum|terms| is bounded by the
        # magnitude bound the family declares (see iqa_verify.properties.recurrent_forward), so atol = 64 eps of the
        # accumulation dtype, x that bound (128 eps for gradients: the decay gradient's reverse sums).
        # bf16/fp16: the results are rounded to the output dtype (two roundings differ by <= 1 ulp: rtol =
        # eps of the dtype), and a state handed from one call to the next is an input, so it is rounded to
        # the input dtype: eps of the dtype x the bound (twice for gradients: the state and its cotangent).
        (Kind.METAMORPHIC, torch.float64): (0.0, 64 * 2.0**-52, 0.0),
        (Kind.METAMORPHIC, torch.float32): (0.0, 64 * 2.0**-23, 0.0),
        (Kind.METAMORPHIC, torch.float16): (2.0**-10, 2.0**-10 + 64 * 2.0**-23, 0.0),
        (Kind.METAMORPHIC, torch.bfloat16): (2.0**-7, 2.0**-7 + 64 * 2.0**-23, 0.0),
        (Kind.METAMORPHIC_GRAD, torch.float64): (0.0, 128 * 2.0**-52, 0.0),
        (Kind.METAMORPHIC_GRAD, torch.float32): (0.0, 128 * 2.0**-23, 0.0),
        (Kind.METAMORPHIC_GRAD, torch.float16): (2.0**-10, 2 * 2.0**-10 + 128 * 2.0**-23, 0.0),
        (Kind.METAMORPHIC_GRAD, torch.bfloat16): (2.0**-7, 2 * 2.0**-7 + 128 * 2.0**-23, 0.0),
    }
    return {
        key: Tolerance(*vals, source=f"tolerances.TABLE[{key[0].value}, {str(key[1]).removeprefix('torch.')}]")
        for key, vals in raw.items()
    }


TABLE: dict[tuple[Kind, torch.dtype], Tolerance] = _entries()


def tolerance(kind: Kind, dtype: torch.dtype) -> Tolerance:
    """The table entry for ``(kind, dtype)``; a clear error for a pair the table does not cover."""
    try:
        return TABLE[(kind, dtype)]
    except KeyError:
        known = sorted(str(d).removeprefix("torch.") for k, d in TABLE if k is kind)
        raise IqaVerifyError(f"dtype={dtype}: no {kind.value} tolerance; the table covers {', '.join(known)}") from None
