"""The ``gla-forward`` family: linear attention with per-key-dimension gates and an initial state (SPEC.md §6)."""

from __future__ import annotations

import torch

from iqa_verify.family import BuiltinKernel, Case, Family, OutputSpec
from iqa_verify.properties.generic import shared_properties
from iqa_verify.properties.gla_forward.bounds import magnitude_bounds
from iqa_verify.properties.gla_forward.cases import GLACase, build_gla_inputs, gla_cases, pinned_gla_cases
from iqa_verify.properties.gla_forward.natural import dg_natural_scale
from iqa_verify.properties.la_forward.natural import initial_state_natural
from iqa_verify.properties.recurrent_forward import Far, RecurrentForward, metamorphic_properties, varlen_properties
from iqa_verify.properties.recurrent_forward.operands import operand_rounding_scales
from iqa_verify.reference.gla_forward import gla_forward_baseline, gla_forward_ref

__all__ = ["FAMILY", "RECURRENCE"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _build(spec: GLACase, dtype: torch.dtype, device: torch.device) -> Case:
    return Case(spec=spec, inputs=build_gla_inputs(spec, dtype, device), kwargs={"scale": spec.scale}, dtype=dtype,
                device=device)


def _output_contract(case: Case) -> dict[str, OutputSpec]:
    s, dtype = case.spec, case.dtype
    state_dtypes = (dtype, torch.float32) if dtype in _LOW_PRECISION else (dtype,)
    return {
        "o": OutputSpec((s.B, s.T, s.H, s.E), (dtype,)),
        "final_state": OutputSpec((s.B, s.H, s.D, s.E), state_dtypes),
    }


def _differentiable(case: Case) -> tuple[str, ...]:
    return ("q", "k", "v", "g") + (("initial_state",) if case.inputs["initial_state"] is not None else ())


def _grad_natural(inputs, cots, scale: float) -> dict[str, torch.Tensor]:
    """The gate gradient's natural scale (SPEC §5), per key dimension: the identity
    dg_td = sum_{s>=t} (q_sd dq_sd - k_sd dk_sd) + <dS_T[d], S_T[d]> that the GLA paper and chunked kernels use
    (see :mod:`iqa_verify.properties.gla_forward.natural`)."""
    x = inputs
    return {"g": dg_natural_scale(x["q"], x["k"], x["v"], x["g"], x["initial_state"], cots["o"], cots["final_state"],
                                  scale=scale),
            **initial_state_natural(gla_forward_ref, x, cots, scale)}  # dS_0: T + 1 terms that cancel where the cotangents do


RECURRENCE = RecurrentForward(
    time_inputs=("q", "k", "v", "g"),
    far={"q": Far.SCALED, "k": Far.SCALED, "v": Far.SCALED, "g": Far.LOG_GATE},  # g [B, T, H, D]: every dimension strong
    build=build_gla_inputs,
    bounds=magnitude_bounds,
    reference=gla_forward_ref,
    baseline=gla_forward_baseline,
    grad_natural=_grad_natural,
    operand_scales=operand_rounding_scales,  # tensor-core kernels round A, the chunk-start state, the decayed keys
)
"""What the reference-free and packed-batch properties need to know about ``gla-forward``."""


def _natural_scales(case: Case, cots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``gradients``' declaration of the same natural scales (:func:`_grad_natural`)."""
    return _grad_natural(case.inputs, cots, case.kwargs["scale"])


def _named(fn):
    def call(inputs, kwargs):
        o, state = fn(*inputs.values(), **kwargs)
        return {"o": o, "final_state": state}

    return call


def _operand_scales(case: Case) -> dict[str, torch.Tensor]:
    """``values``' declaration of what tensor-core operand rounding costs (:func:`operand_rounding_scales`)."""
    return operand_rounding_scales(case.inputs, case.kwargs["scale"])


FAMILY = Family(
    name="gla-forward",
    signature="gla_forward(q, k, v, g, initial_state=None, *, scale=1.0) -> (o, final_state)",
    output_names=("o", "final_state"),
    cases=gla_cases,
    pinned=pinned_gla_cases,
    spec_from_json=GLACase.from_json,
    build=_build,
    output_contract=_output_contract,
    differentiable=_differentiable,
    reference=_named(gla_forward_ref),
    baseline=_named(gla_forward_baseline),
    properties=(shared_properties("gla-forward", grad_natural_scales=_natural_scales,
                                  value_operand_scales=_operand_scales)
                + metamorphic_properties("gla-forward", RECURRENCE) + varlen_properties("gla-forward", RECURRENCE)),
    builtin_kernels=(
        BuiltinKernel("iqa_verify.kernels.gla_forward_recurrent:gla_forward_recurrent",
                      "loop over time, float32 state for bf16/fp16"),
        BuiltinKernel("iqa_verify.kernels.gla_forward_chunked:gla_forward_chunked",
                      "chunked (64 steps): per-dimension factored or masked scores, hand-written backward"),
    ),
)
