"""The ``iqa`` family: implicit query attention, a fixed point ``y = softmax(scale K (y w_q)^T) V`` (SPEC §3).

Cases: :mod:`iqa_verify.properties.iqa.cases` (controlled contraction); where a kernel is judged:
:mod:`iqa_verify.properties.iqa.judging`; IQA properties: :mod:`iqa_verify.properties.iqa.checks`; what the family reads
from a kernel (its ``iqa_info``: gradient claim and stats, types in :mod:`iqa_verify.iqa_claims`):
:mod:`iqa_verify.properties.iqa.kernels`; measurements of the built-in solvers for reports:
:mod:`iqa_verify.properties.iqa.diagnostics`.

The family's ``reference`` (:func:`iqa_verify.reference.iqa.iqa_forward_ref`, Newton from V) and ``baseline``
(:func:`iqa_verify.reference.iqa.iqa_forward_baseline`, plain iteration from V in the compute dtype) follow
the generic interface; the IQA properties do not use them for judging, because the fixed point need not
be unique: they refine the kernel's own output instead.

Declared here: the shared properties it uses (contract, inputs-unchanged, no-uninit-reads, deterministic;
not values, gradients and finite, which the IQA properties replace) and, for all its properties, its
honest-refusal policy: in the hard regime a kernel may raise a convergence error instead of answering
(:func:`~iqa_verify.properties.iqa.judging.convergence_refusal`).
"""

from __future__ import annotations

import torch

from iqa_verify.family import BuiltinKernel, Case, Family, OutputSpec
from iqa_verify.properties.generic import shared_properties
from iqa_verify.properties.iqa.cases import IQACase, build_iqa_inputs, iqa_cases, pinned_iqa_cases
from iqa_verify.properties.iqa.checks import iqa_properties
from iqa_verify.properties.iqa.judging import convergence_refusal
from iqa_verify.reference.iqa import iqa_forward_baseline, iqa_forward_ref

__all__ = ["FAMILY"]


def _build(spec: IQACase, dtype: torch.dtype, device: torch.device) -> Case:
    return Case(spec=spec, inputs=build_iqa_inputs(spec, dtype, device), kwargs={"scale": spec.scale},
                dtype=dtype, device=device)


def _output_contract(case: Case) -> dict[str, OutputSpec]:
    s = case.spec
    return {"y": OutputSpec((s.B, s.N, s.E_eff), (case.dtype,))}


def _differentiable(case: Case) -> tuple[str, ...]:
    return ("x", "w_q", "w_k") + (("w_v",) if case.inputs["w_v"] is not None else ())


def _reference(inputs, kwargs):
    return {"y": iqa_forward_ref(*inputs.values(), **kwargs)}


def _baseline(inputs, kwargs):
    return {"y": iqa_forward_baseline(*inputs.values(), **kwargs)}


def _shared(*names: str):
    return shared_properties("iqa", use=names, honest_refusal=convergence_refusal)


def _report_diagnostics(profile):
    # measures the built-in solvers (kernel code) for the report's charts; imported on demand, never for judging
    from iqa_verify.properties.iqa.diagnostics import report_diagnostics

    return report_diagnostics(profile)


FAMILY = Family(
    name="iqa",
    signature="iqa_forward(x, w_q, w_k, w_v=None, *, scale=None) -> y",
    output_names=("y",),
    cases=iqa_cases,
    pinned=pinned_iqa_cases,
    spec_from_json=IQACase.from_json,
    build=_build,
    output_contract=_output_contract,
    differentiable=_differentiable,
    reference=_reference,
    baseline=_baseline,
    properties=(*_shared("contract"), *iqa_properties(honest_refusal=convergence_refusal),
                *_shared("inputs-unchanged", "no-uninit-reads", "deterministic")),
    builtin_kernels=(
        BuiltinKernel("iqa_verify.iqa.kernel:iqa_forward_anderson_implicit",
                      "Anderson forward, implicit backward (Anderson adjoint)"),
        BuiltinKernel("iqa_verify.iqa.kernel:iqa_forward_broyden_implicit",
                      "Broyden forward, implicit backward (Broyden adjoint)"),
        BuiltinKernel("iqa_verify.iqa.kernel:iqa_forward_fixed_point_implicit",
                      "plain iteration forward, implicit backward"),
        BuiltinKernel("iqa_verify.iqa.kernel:iqa_forward_fixed_point_unrolled",
                      "plain iteration to convergence, backprop through every step"),
    ),
    dtypes=(torch.float32, torch.bfloat16),
    diagnostics=_report_diagnostics,
)
