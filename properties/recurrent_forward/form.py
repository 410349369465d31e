"""What the reference-free and packed-batch properties need to know about a recurrent forward family.

The three forward families (``la-forward``, ``gla-forward``, ``delta-forward``, SPEC §1 and §6) share one
calling shape::

    f(<time inputs>, initial_state=None, *, scale=1.0, cu_seqlens=None) -> (o, final_state)
      every time input [B, T, H, *] (time on dim 1), initial_state and final_state [B, H, D, E], o [B, T, H, E]
      (q [B, T, H, D] and v [B, T, H, E] among the time inputs: D and E are read from them)

and one recurrence ``S_t = A_t S_{t-1} + (update)``, ``o_t = scale * S_t^T q_t``. What differs between them is
data, declared once per family as a :class:`RecurrentForward`: which inputs carry a time axis (and in what
order the contract takes them), how an input "far from the case's" is drawn for each (a log gate is made
strong, keys of the delta rule stay unit vectors, ...), the magnitude bounds that scale the
``Kind.METAMORPHIC`` allowance, and the float64 reference and same-precision baseline that take ``cu_seqlens``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from iqa_verify.errors import IqaVerifyError

__all__ = ["Bounds", "Far", "Inputs", "RecurrentForward"]

Inputs = dict[str, torch.Tensor | None]
Bounds = Callable[[Mapping[str, torch.Tensor | None], float, Mapping[str, torch.Tensor] | None], dict[str, float]]
"""``bounds(inputs, scale, cotangents or None) -> {name: float}``: bounds on |every term| that the outputs ("o",
"final_state") and, given cotangents, the gradients (by input name) are sums of (see each family's bounds module)."""


class Far(enum.Enum):
    """How an input's entries are drawn where a property replaces them by values far from the case's
    (the future in ``causality``, the far neighbour in ``sequence-independence``, padding in packed batches).

    SCALED: normal entries, 10x the largest |entry| of the case's tensor (at least 1e-2);
    LOG_GATE: -U(20, 60), a gate under which the state forgets within one step (exp(-60) is far below float32's eps);
    UNIT_ROWS: unit vectors of random direction along the last dim (keys of the delta rule: they keep the
    transition I - beta k k^T non-expansive, SPEC §6, as every model's keys do);
    UNIT_INTERVAL: U(0, 1) (the delta rule's beta).
    """

    SCALED = "scaled"
    LOG_GATE = "log-gate"
    UNIT_ROWS = "unit-rows"
    UNIT_INTERVAL = "unit-interval"


@dataclass(frozen=True)
class RecurrentForward:
    """A recurrent forward family, as the reference-free and packed-batch properties see it.

    time_inputs: the names of the inputs with a time axis (dim 1), in the contract's order; each may be None in
        a case (an optional input such as the delta rule's g) and is then left None by every property.
    far: for every time input, how values far from the case's are drawn (:class:`Far`).
    build: ``build(spec, dtype, device) -> inputs`` (the family's case builder: every time input, then
        ``initial_state``); specs carry B, T, initial_state and seed, and optionally ``free_T`` (the length the
        reference-free properties run at, 0 or absent for the case's own T).
    bounds: the family's magnitude bounds (:data:`Bounds`).
    reference: the float64 reference with the contract's signature, taking ``cu_seqlens``.
    baseline: the same-precision baseline, with the same signature.
    final_state_natural: ``f(inputs of one sequence) -> float``, the natural scale of its final state where
        standard algorithms form it as a difference of larger terms (the delta rule: the states it came through),
        or None; ``values`` and ``varlen-values`` (per sequence) add ``NATURAL_SCALE`` eps times it to the allowance.
    grad_natural: ``f(inputs, cotangents, scale) -> {input name: N}`` (float64, the input's shape), the natural
        scale of gradients standard algorithms form as differences of larger terms (the decay gradient's
        identity), or None; ``gradients`` and ``varlen-gradients`` (per sequence) add ``NATURAL_SCALE`` eps times N.
    operand_scales: ``f(inputs, scale) -> {"o": N, "final_state": N}`` (float64, the outputs' shapes), the
        root-sum-square of the terms a tensor-core kernel rounds the operands of (:mod:`.operands`), or None;
        ``values`` and ``varlen-values`` (per sequence) add ``OPERAND_ROUNDING`` eps times N. A family declares
        at most one of this and ``final_state_natural``.
    """

    time_inputs: tuple[str, ...]
    far: Mapping[str, Far]
    build: Callable[[Any, torch.dtype, torch.device], Inputs]
    bounds: Bounds
    reference: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    baseline: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    final_state_natural: Callable[[Mapping[str, torch.Tensor | None]], float] | None = None
    grad_natural: Callable[[Mapping[str, torch.Tensor | None], Mapping[str, torch.Tensor], float],
                           Mapping[str, torch.Tensor]] | None = None
    operand_scales: Callable[[Mapping[str, torch.Tensor | None], float], Mapping[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        missing = [n for n in self.time_inputs if n not in self.far]
        if missing or not {"q", "v"} <= set(self.time_inputs):
            raise IqaVerifyError(f"time_inputs={self.time_inputs}, far={dict(self.far)}: every time input needs a Far kind"
                             f" (missing {missing}) and q, v must be among them")
        if self.final_state_natural is not None and self.operand_scales is not None:
            raise IqaVerifyError("final_state_natural and operand_scales: a family declares at most one value scale")

    def grad_names(self, inputs: Mapping[str, torch.Tensor | None]) -> tuple[str, ...]:
        """The inputs gradients are judged for: every given time input, then ``initial_state`` when given."""
        return tuple(n for n in (*self.time_inputs, "initial_state") if inputs.get(n) is not None)
