"""Cases for ``gla-forward``: specs, tensors and Hypothesis strategies.

A :class:`GLACase` is a small frozen description — shapes, gate regime, initial state, memory layout,
magnitude, scale and a seed — from which :func:`build_gla_inputs` makes the tensors deterministically.
Hypothesis draws and shrinks specs (towards the smallest shapes and the mildest regime), never tensor entries.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

import torch
from hypothesis import strategies as st

from iqa_verify.errors import IqaVerifyError
from iqa_verify.profiles import Profile, Size
from iqa_verify.properties.la_forward.cases import Layout, check_free_length, free_lengths

__all__ = ["Gate", "GLACase", "build_gla_inputs", "gla_cases", "initial_state_tensor", "pinned_gla_cases", "sequence_layout"]


class Gate(enum.Enum):
    """Log-gate regimes, g [B, T, H, D] <= 0. Listed in shrink order (mildest first).

    MILD g ~ -U(0, 0.1) per entry; ZERO g == 0 exactly; SCALAR mild but constant over D (la-forward's
    special case); PARTIAL_ZERO mild with about half the key dimensions exactly 0 on every step;
    WEAK g ~ -U(0, 1e-3) (the state grows for long); STRONG g ~ -U(1, 5);
    UNDERFLOW_SOME mild, except about a third of the key dimensions with g ~ -U(20, 60): those rows of the
    state underflow (below float32 and float64 range after a few steps) while the others carry on;
    RESETS near-keeping gates g ~ -U(0, 0.01), except about one step in eight per key dimension a forget
    g ~ -U(8, 24): within a chunk the cumulative gate then sits at |b| ~ 8-50 while neighbouring steps decay
    by under 1 %, so exp(b_i - b_j) ~ 1 is a difference of two large numbers (a cumulative sum kept in bf16 errs
    there by half an ulp of |b|: several per cent of an O(1) term). RESETS is pinned, not drawn (see
    ``gla_cases``).
    """

    MILD = "mild"
    ZERO = "zero"
    SCALAR = "scalar"
    PARTIAL_ZERO = "partial-zero"
    WEAK = "weak"
    STRONG = "strong"
    UNDERFLOW_SOME = "underflow-some"
    RESETS = "resets"


@dataclass(frozen=True)
class GLACase:
    """B, T, H, D, E sizes; gate regime; initial_state given or None; layout; magnitude: log10 of the
    scale of q, k, v entries; scale: the kernel's ``scale``; seed: the values' random seed; free_T: the length
    the reference-free properties (state hand-off, causality, sequence independence, varlen-one-by-one) run
    at, 0 for the case's own T (as la-forward's)."""

    B: int
    T: int
    H: int
    D: int
    E: int
    gate: Gate = Gate.MILD
    initial_state: bool = False
    layout: Layout = Layout.CONTIGUOUS
    magnitude: int = 0
    scale: float = 1.0
    seed: int = 0
    free_T: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        d["gate"], d["layout"] = self.gate.value, self.layout.value
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GLACase:
        try:
            d = json.loads(text)
            d["gate"], d["layout"] = Gate(d.get("gate", "mild")), Layout(d.get("layout", "contiguous"))
            spec = cls(**d)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IqaVerifyError(f"case={text!r}: not a gla case spec ({exc})") from None
        for name in ("B", "T", "H", "D", "E"):
            if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
                raise IqaVerifyError(f"case {name}={getattr(spec, name)!r}: sizes must be integers >= 1")
        check_free_length(spec)
        return spec

    def regime(self) -> str:
        parts = [f"gate={self.gate.value}", "S0 given" if self.initial_state else "S0 None", self.layout.value]
        if self.magnitude:
            parts.append(f"|x|~1e{self.magnitude}")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.free_T and self.free_T != self.T:
            parts.append(f"reference-free properties at T={self.free_T}")
        return ", ".join(parts)


_BOUNDS = {
    # size: (max B, max H, max D/E, short T max, long T range)
    Size.SMALL: (2, 2, 12, 80, (256, 330)),
    Size.MEDIUM: (4, 4, 32, 130, (256, 1100)),
    Size.LARGE: (4, 4, 64, 200, (256, 2100)),
}


# The regimes the random search draws. Regimes added later are pinned only, so that ``check --seed N`` keeps
# drawing the examples the calibration (reports/evidence/calibration.md) recorded for seed N.
_DRAWN_GATES = (Gate.MILD, Gate.ZERO, Gate.SCALAR, Gate.PARTIAL_ZERO, Gate.WEAK, Gate.STRONG, Gate.UNDERFLOW_SOME)


def gla_cases(profile: Profile) -> st.SearchStrategy[GLACase]:
    """Specs for ``gla-forward`` within the profile's bounds.

    - T: 1..short max, or a long range (>= 256, never a multiple of 16) where accumulation errors grow.
    - B, H: 1..max; D, E: drawn independently (D != E and D == E both occur).
    - gate regime, initial_state, layout, magnitude (1e-2, 1, 1e1), scale (1, 0.125, 0.5, 2.5), seed.
    - free_T: 1..130 in ci; in dev and thorough 0 (the case's T) or past 1000 (la-forward's ``free_lengths``).
    Shrinks towards B=H=D=E=T=1, mild gates, no initial state, contiguous, magnitude 1, scale 1.
    """
    max_b, max_h, max_d, short_t, (long_lo, long_hi) = _BOUNDS[profile.size]
    return st.builds(
        GLACase,
        B=st.integers(1, max_b),
        T=st.one_of(st.integers(1, short_t), st.integers(long_lo, long_hi).map(lambda t: t if t % 16 else t + 1)),
        H=st.integers(1, max_h),
        D=st.integers(1, max_d),
        E=st.integers(1, max_d),
        gate=st.sampled_from(_DRAWN_GATES),
        initial_state=st.booleans(),
        layout=st.sampled_from(Layout),
        magnitude=st.sampled_from([0, -2, 1]),
        scale=st.sampled_from([1.0, 0.125, 0.5, 2.5]),
        seed=st.integers(0, 2**31 - 1),
        free_T=free_lengths(profile),
    )


def pinned_gla_cases(profile: Profile) -> list[GLACase]:
    """Edge regimes every run covers before the random search, whatever the seed."""
    long_t = _BOUNDS[profile.size][4][0] + 61  # 317: long, and not a multiple of 16/32/64
    return [
        GLACase(B=1, T=1, H=1, D=1, E=1, seed=1),
        # early: a property stops judging pinned regimes at its first failure, and this one shows a bf16 cumulative
        # gate sum most clearly (5.7x where the long weak-gate case below shows it at 1.6x)
        GLACase(B=2, T=80, H=2, D=6, E=5, gate=Gate.RESETS, initial_state=True, seed=8),
        GLACase(B=2, T=long_t, H=2, D=8, E=6, gate=Gate.WEAK, initial_state=True, scale=0.5, seed=2),
        GLACase(B=2, T=97, H=2, D=6, E=5, gate=Gate.UNDERFLOW_SOME, initial_state=True, layout=Layout.TRANSPOSED, seed=3),
        GLACase(B=2, T=70, H=2, D=4, E=4, gate=Gate.PARTIAL_ZERO, layout=Layout.SLICED, scale=2.5, seed=4),
        GLACase(B=1, T=33, H=2, D=3, E=2, gate=Gate.ZERO, initial_state=True, magnitude=-2, seed=5),
        GLACase(B=1, T=65, H=2, D=5, E=3, gate=Gate.STRONG, initial_state=True, seed=6),
        # the reference-free properties run this one past 1024 steps (16 chunks of 64)
        GLACase(B=1, T=long_t, H=2, D=4, E=4, seed=7, free_T=1100),
    ]


def _log_gate(spec: GLACase, gen: torch.Generator) -> torch.Tensor:
    shape = (spec.B, spec.H, spec.T, spec.D)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if spec.gate is Gate.ZERO:
        return torch.zeros(shape, dtype=torch.float64)
    lo, hi = {Gate.WEAK: (0.0, 1e-3), Gate.STRONG: (1.0, 5.0)}.get(spec.gate, (0.0, 0.1))
    g = -(lo + (hi - lo) * u)
    if spec.gate is Gate.SCALAR:
        return g[..., :1].expand(shape).clone()
    dims = torch.rand(spec.B, spec.H, 1, spec.D, generator=gen, dtype=torch.float64)
    if spec.gate is Gate.PARTIAL_ZERO:
        g = torch.where(dims < 0.5, torch.zeros_like(g), g)
    elif spec.gate is Gate.UNDERFLOW_SOME:
        g = torch.where(dims < 1 / 3, -(20.0 + 40.0 * u), g)
    elif spec.gate is Gate.RESETS:
        forget = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.125
        g = torch.where(forget, -(8.0 + 16.0 * u), 0.1 * g)
    return g


def build_gla_inputs(spec: GLACase, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Tensors for ``spec``: q, k [B, T, H, D], v [B, T, H, E], g [B, T, H, D] and initial_state [B, H, D, E]
    (or None), in ``dtype`` on ``device``, laid out as ``spec.layout`` says. Values depend only on the spec."""
    gen = torch.Generator().manual_seed(spec.seed)
    amp = 10.0 ** spec.magnitude
    out: dict[str, torch.Tensor | None] = {}
    for name, width in (("q", spec.D), ("k", spec.D), ("v", spec.E)):
        x = torch.randn(spec.B, spec.H, spec.T, width, generator=gen, dtype=torch.float64) * amp
        out[name] = sequence_layout(x, spec.layout, dtype, device)
    out["g"] = sequence_layout(_log_gate(spec, gen), spec.layout, dtype, device)
    out["initial_state"] = initial_state_tensor(spec, gen, amp, dtype, device) if spec.initial_state else None
    return out


def initial_state_tensor(spec, gen: torch.Generator, amp: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B, H, D, E] random state (column-major per head unless the layout is CONTIGUOUS; with a gap when SLICED)."""
    s0 = torch.randn(spec.B, spec.H, spec.E, spec.D, generator=gen, dtype=torch.float64) * amp
    s0 = s0.to(device=device, dtype=dtype).transpose(-1, -2)
    if spec.layout is Layout.CONTIGUOUS:
        return s0.contiguous()
    if spec.layout is Layout.SLICED:
        return torch.cat([s0, torch.zeros_like(s0[..., :1])], dim=-1)[..., : spec.E]
    return s0


def sequence_layout(x: torch.Tensor, layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """x: [B, H, T, ...] float64 -> [B, T, H, ...] in dtype/device with the requested memory layout."""
    logical = x.to(device=device, dtype=dtype).transpose(1, 2)
    if layout is Layout.CONTIGUOUS:
        return logical.contiguous()
    if layout is Layout.TRANSPOSED:
        return logical
    B, T = logical.shape[:2]  # SLICED: every other time step of a buffer twice as long
    buf = torch.zeros((B, 2 * T, *logical.shape[2:]), dtype=dtype, device=device)
    buf[:, ::2] = logical
    return buf[:, ::2]
