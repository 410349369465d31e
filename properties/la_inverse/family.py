"""One builder for the three inverse-form families (``la-solve-v``, ``la-solve-k``, ``la-solve-q``; SPEC §2).

Each family shares the cases of :mod:`iqa_verify.properties.la_inverse.cases` and the properties of
:mod:`iqa_verify.properties.la_inverse.checks` plus the shared ones that apply (contract,
inputs-unchanged, no-uninit-reads, deterministic). The shared ``values``, ``gradients`` and ``finite``
properties are left out on purpose: elementwise agreement with a reference is meaningless where the
system is ill-conditioned or singular; ``minimum-norm`` and the inverse ``gradients`` and ``finite``
replace them with condition-aware versions. ``la-solve-v`` adds the packed-batch (``cu_seqlens``) properties of
:mod:`iqa_verify.properties.la_inverse.varlen` (n/a for a kernel without the keyword).

reference: the float64 dense pseudo-inverse (``iqa_verify.reference.la_inverse.la_solve_*_dense_ref``);
baseline: the same dense pseudo-inverse computed in the kernel's accumulation dtype (float32 for bf16/fp16).
"""

from __future__ import annotations

from functools import partial

import torch

from iqa_verify.contracts import state_dtype_for
from iqa_verify.family import BuiltinKernel, Case, Family, OutputSpec, Property
from iqa_verify.properties.generic import shared_properties
from iqa_verify.properties.la_inverse import checks
from iqa_verify.properties.la_inverse.varlen import varlen_solve_properties
from iqa_verify.properties.la_inverse.cases import SolveCase, build_solve_inputs, pinned_solve_cases, solve_cases
from iqa_verify.reference.la_inverse import Unknown, la_linear_map, la_solve_k_dense_ref, la_solve_q_dense_ref, la_solve_v_dense_ref

__all__ = ["inverse_family", "SIGNATURES"]

SIGNATURES = {
    Unknown.V: "la_solve_v(q, k, o, g, initial_state=None, *, scale=1.0, cu_seqlens=None) -> v",
    Unknown.K: "la_solve_k(q, v, o, g, initial_state=None, *, scale=1.0) -> k",
    Unknown.Q: "la_solve_q(k, v, o, g, initial_state=None, *, scale=1.0) -> q",
}
_DENSE = {Unknown.V: la_solve_v_dense_ref, Unknown.K: la_solve_k_dense_ref, Unknown.Q: la_solve_q_dense_ref}
_SHARED = ("contract", "inputs-unchanged", "no-uninit-reads", "deterministic")


def _build(unknown: Unknown, spec: SolveCase, dtype: torch.dtype, device: torch.device) -> Case:
    if spec.unknown is not unknown:
        raise ValueError(f"case for unknown {spec.unknown.value} given to the family solving for {unknown.value}")
    return Case(spec=spec, inputs=build_solve_inputs(spec, dtype, device), kwargs={"scale": spec.la.scale},
                dtype=dtype, device=device)


def _output_contract(unknown: Unknown, case: Case) -> dict[str, OutputSpec]:
    s = case.spec.la
    n = s.E if unknown is Unknown.V else s.D
    return {unknown.value: OutputSpec((s.B, s.T, s.H, n), (case.dtype,))}


def _differentiable(case: Case) -> tuple[str, ...]:
    return tuple(n for n, t in case.inputs.items() if t is not None)


def _reference(unknown: Unknown, inputs, kwargs) -> dict[str, torch.Tensor]:
    return {unknown.value: _DENSE[unknown](*inputs.values(), **kwargs)}


def _baseline(unknown: Unknown, inputs, kwargs) -> dict[str, torch.Tensor]:
    """pinv(A) b with A and the known offset c built in float64 from the inputs, both rounded to the accumulation
    dtype, b = vec(O) - c formed there (as a kernel must: where o and c nearly cancel, the answer carries eps_acc
    times them, which no rule based on A's kappa sees) and the pseudo-inverse taken there; returned in the input
    dtype. Forming b in float64 left that cancellation out: a one-step sequence whose o/scale - exp(g) S0^T q
    cancels 1000x was a false alarm on every float32 Type1 kernel (issue #14, calibration seed 6)."""
    first = next(iter(inputs.values()))
    acc = state_dtype_for(first.dtype)
    a, b, o, g, s0 = inputs.values()
    lm = la_linear_map(unknown, a, b, o, g, s0, **kwargs)
    B, T, H, _ = o.shape
    x = (torch.linalg.pinv(lm.matrix.to(acc)) @ lm.rhs(o, acc).unsqueeze(-1)).squeeze(-1)
    return {unknown.value: x.reshape(B, H, T, lm.n).transpose(1, 2).to(first.dtype)}


def _properties(unknown: Unknown, name: str) -> tuple[Property, ...]:
    contract, *shared = shared_properties(name, use=_SHARED)

    def p(pid: str, title: str, fn, catches: str) -> Property:
        return Property(id=f"{name}/{pid}", title=title, check=fn, catches=catches)

    u = unknown.value
    return (
        contract,
        p("backward-error", f"A^T(A {u} - b) is at rounding level relative to ‖A‖(‖A‖‖{u}‖+‖o‖+‖c‖), however ill-conditioned",
          checks.check_backward_error,
          "wrong math (decay, scale, initial state, pivot), exact inverse where a pseudo-inverse is needed (inf/NaN)"),
        p("o-roundtrip", "la_forward of the solution reproduces the consistent part of o",
          checks.check_o_roundtrip, "solvers that do not solve the system (greedy per-step fits, early stopping)"),
        p("minimum-norm", "agrees with the float64 pseudo-inverse solution within kappa * eps (where kappa is moderate)",
          checks.check_minimum_norm, "least-squares solutions that are not minimum-norm, wrong rank decisions"),
        p("unknown-roundtrip", f"solving la_forward({u}) gives {u} back when identifiable, else its row-space projection",
          checks.check_unknown_roundtrip, "lost components, wrong null-space handling"),
        p("idempotent", "solving la_forward of the solution gives the solution back", checks.check_idempotent,
          "solutions outside the row space, state carried across calls"),
        p("gradients", "gradients equal the float64 dense pinv's where the system is full rank and well-conditioned",
          checks.check_gradients, "detached outputs, wrong or missing gradients"),
        p("finite", "finite where the float64 solution fits the dtype; gradients never NaN (nor inf where smooth)",
          checks.check_finite, "0/0 and 0*inf in singular steps and in discarded branches, overflow"),
        *(varlen_solve_properties(name) if unknown is Unknown.V else ()),
        *shared,
    )


def inverse_family(unknown: Unknown, builtin_kernels: tuple[BuiltinKernel, ...]) -> Family:
    """The :class:`Family` solving for ``unknown``, named ``la-solve-<v|k|q>``, verified in float32, bf16, fp16 and float64."""
    name = f"la-solve-{unknown.value}"
    return Family(
        name=name,
        signature=SIGNATURES[unknown],
        output_names=(unknown.value,),
        cases=partial(_cases, unknown),
        pinned=partial(_pinned, unknown),
        spec_from_json=partial(SolveCase.from_json, unknown=unknown),
        build=partial(_build, unknown),
        output_contract=partial(_output_contract, unknown),
        differentiable=_differentiable,
        reference=partial(_reference, unknown),
        baseline=partial(_baseline, unknown),
        properties=_properties(unknown, name),
        builtin_kernels=builtin_kernels,
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        diagnostics=partial(_solvability, unknown),
    )


def _solvability(unknown, profile):
    from iqa_verify.properties.la_inverse.solvability import solvability_tables  # imports every inverse kernel

    return solvability_tables(unknown, profile)


def _cases(unknown, profile):
    return solve_cases(profile, unknown)


def _pinned(unknown, profile):
    return pinned_solve_cases(profile, unknown)
