"""The ``delta-forward`` family: the delta rule, gated when a log-decay is given (SPEC.md §6)."""

from __future__ import annotations

import torch

from iqa_verify.family import BuiltinKernel, Case, Family, OutputSpec
from iqa_verify.properties.delta_forward.bounds import CHUNK, column_bounds, magnitude_bounds, state_peak
from iqa_verify.properties.delta_forward.cases import DeltaCase, build_delta_inputs, delta_cases, pinned_delta_cases
from iqa_verify.properties.delta_forward.natural import dg_natural_scale
from iqa_verify.properties.generic import shared_properties
from iqa_verify.properties.recurrent_forward import Far, RecurrentForward, metamorphic_properties, varlen_properties
from iqa_verify.reference.delta_forward import delta_forward_baseline, delta_forward_ref

__all__ = ["FAMILY", "RECURRENCE"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _build(spec: DeltaCase, dtype: torch.dtype, device: torch.device) -> Case:
    return Case(spec=spec, inputs=build_delta_inputs(spec, dtype, device), kwargs={"scale": spec.scale}, dtype=dtype,
                device=device)


def _output_contract(case: Case) -> dict[str, OutputSpec]:
    s, dtype = case.spec, case.dtype
    state_dtypes = (dtype, torch.float32) if dtype in _LOW_PRECISION else (dtype,)
    return {
        "o": OutputSpec((s.B, s.T, s.H, s.E), (dtype,)),
        "final_state": OutputSpec((s.B, s.H, s.D, s.E), state_dtypes),
    }


def _differentiable(case: Case) -> tuple[str, ...]:
    return ("q", "k", "v", "beta") + tuple(n for n in ("g", "initial_state") if case.inputs[n] is not None)


def _grad_natural(inputs, cots, scale: float) -> dict[str, torch.Tensor]:
    """Natural scales (SPEC §5) of two gradients:

    - the decay gradient's, when the case has a decay: the sizes of the terms of
      dg_t = sum_{s>=t} (q_s.dq_s - v_s.dv_s) + <dS_T, S_T> and of chunked kernels' chunk-local form of it
      (see :mod:`iqa_verify.properties.delta_forward.natural`);
    - the initial state's: ``dS_0 = lambda_1 (I - beta_1 k_1 k_1^T) dS_1`` subtracts, exactly to 0 in the
      directions a step erases (beta = 1, a unit key: a projector), so kernels round there at eps times the
      adjoint they projected, not at eps times dS_0. Per batch, head and value column: :data:`CHUNK` (a chunk's
      rounding chain) x kappa x ``lambda_1 rho_1 n_1[e]``, the column bound of that adjoint
      (:func:`~iqa_verify.properties.delta_forward.bounds.column_bounds`). Found by the calibration matrix (ci
      seed 10): the built-in chunked kernel left 2.6e-23 where a projector makes dS_0 exactly 0, after a decay
      of 1.4e-15; the tensor's own scale (another head's 5e-20) allowed 5e-24."""
    x = inputs
    out: dict[str, torch.Tensor] = {}
    if x["g"] is not None:
        out["g"] = dg_natural_scale(x["q"], x["k"], x["v"], x["beta"], x["g"], x["initial_state"], cots["o"],
                                    cots["final_state"], scale=scale)
    s0 = x["initial_state"]
    if s0 is not None:
        cb = column_bounds(x, scale, cots)
        per = (cb.step[:, 0] * cb.n[:, 0]) * (CHUNK * cb.kappa)  # [B, H, E]
        out["initial_state"] = per[:, :, None, :].expand(s0.shape).clone()
    return out


RECURRENCE = RecurrentForward(
    time_inputs=("q", "k", "v", "beta", "g"),
    # far keys stay unit vectors and far betas in [0, 1]: the regime of the contract (SPEC §6), where the transition
    # I - beta k k^T is non-expansive; 10x keys would make it expand (1 - 100 beta) and overflow a correct kernel
    far={"q": Far.SCALED, "k": Far.UNIT_ROWS, "v": Far.SCALED, "beta": Far.UNIT_INTERVAL, "g": Far.LOG_GATE},
    build=build_delta_inputs,
    bounds=magnitude_bounds,
    reference=delta_forward_ref,
    baseline=delta_forward_baseline,
    grad_natural=_grad_natural,
    final_state_natural=lambda inputs: CHUNK * state_peak(inputs),  # see bounds.state_peak
)
"""What the reference-free and packed-batch properties need to know about ``delta-forward`` (g may be None)."""


def _natural_scales(case: Case, cots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``gradients``' declaration of the same natural scales (:func:`_grad_natural`)."""
    return _grad_natural(case.inputs, cots, case.kwargs["scale"])


def _named(fn):
    def call(inputs, kwargs):
        o, state = fn(*inputs.values(), **kwargs)
        return {"o": o, "final_state": state}

    return call


FAMILY = Family(
    name="delta-forward",
    signature="delta_forward(q, k, v, beta, g=None, initial_state=None, *, scale=1.0) -> (o, final_state)",
    output_names=("o", "final_state"),
    cases=delta_cases,
    pinned=pinned_delta_cases,
    spec_from_json=DeltaCase.from_json,
    build=_build,
    output_contract=_output_contract,
    differentiable=_differentiable,
    reference=_named(delta_forward_ref),
    baseline=_named(delta_forward_baseline),
    properties=(shared_properties("delta-forward", grad_natural_scales=_natural_scales,
                                  value_natural_scales=lambda case: {"final_state": RECURRENCE.final_state_natural(case.inputs)})
                + metamorphic_properties("delta-forward", RECURRENCE) + varlen_properties("delta-forward", RECURRENCE)),
    builtin_kernels=(
        BuiltinKernel("iqa_verify.kernels.delta_forward_recurrent:delta_forward_recurrent",
                      "loop over time, float32 state for bf16/fp16"),
        BuiltinKernel("iqa_verify.kernels.delta_forward_chunked:delta_forward_chunked",
                      "chunked (64 steps): WY / UT triangular solve per chunk, hand-written backward"),
    ),
)
