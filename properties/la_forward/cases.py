"""Cases for ``la-forward`` (and the inverse forms built on it): specs, tensors and Hypothesis strategies.

A :class:`LACase` is a small frozen description — shapes, decay regime, initial state, memory layout,
magnitude, scale and a seed — from which :func:`build_la_inputs` makes the tensors deterministically.
Hypothesis draws and shrinks specs (towards the smallest shapes and the mildest regime), never
individual tensor entries, so a counterexample is a few readable numbers and one seed.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

import torch
from hypothesis import strategies as st

from iqa_verify.errors import IqaVerifyError
from iqa_verify.profiles import Profile, Size
from iqa_verify.properties.generic import CotangentLayout

__all__ = ["Decay", "Layout", "LACase", "la_cases", "pinned_la_cases", "build_la_inputs", "free_lengths", "check_free_length"]


class Decay(enum.Enum):
    """Log-decay regimes, g <= 0 per step. Listed in shrink order (mildest first).

    MILD g ~ -U(0, 0.1); NONE g == 0 exactly; PARTIAL_NONE mild with about half the steps exactly 0;
    WEAK g ~ -U(0, 1e-3) (state grows for long: where low-precision accumulation shows);
    STRONG g ~ -U(1, 5); UNDERFLOW g ~ -U(20, 60): cumulative log-decay far below float32 (-103)
    and float64 (-745) underflow after a few steps.
    """

    MILD = "mild"
    NONE = "none"
    PARTIAL_NONE = "partial-none"
    WEAK = "weak"
    STRONG = "strong"
    UNDERFLOW = "underflow"


class Layout(enum.Enum):
    """Memory layout of the inputs: CONTIGUOUS, TRANSPOSED (time/heads swapped in memory), SLICED (views
    into larger buffers, with gaps)."""

    CONTIGUOUS = "contiguous"
    TRANSPOSED = "transposed"
    SLICED = "sliced"


@dataclass(frozen=True)
class LACase:
    """B, T, H, D, E sizes; decay regime; initial_state given or None; layout; magnitude: log10 of the
    scale of q, k, v entries; scale: the kernel's ``scale``; seed: the values' random seed; cotangents: the
    memory layout of the cotangents fed to backward (:class:`~iqa_verify.properties.generic.CotangentLayout`);
    free_T: the length the reference-free properties (state hand-off, causality, sequence independence)
    run at, 0 for the case's own T: they are cheap, so they reach lengths where the float64 reference is slow."""

    B: int
    T: int
    H: int
    D: int
    E: int
    decay: Decay = Decay.MILD
    initial_state: bool = False
    layout: Layout = Layout.CONTIGUOUS
    magnitude: int = 0
    scale: float = 1.0
    seed: int = 0
    cotangents: CotangentLayout = CotangentLayout.CONTIGUOUS
    free_T: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        d["decay"], d["layout"], d["cotangents"] = self.decay.value, self.layout.value, self.cotangents.value
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LACase:
        try:
            d = json.loads(text)
            d["decay"], d["layout"] = Decay(d.get("decay", "mild")), Layout(d.get("layout", "contiguous"))
            d["cotangents"] = CotangentLayout(d.get("cotangents", "contiguous"))
            spec = cls(**d)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IqaVerifyError(f"case={text!r}: not an la case spec ({exc})") from None
        for name in ("B", "T", "H", "D", "E"):
            if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
                raise IqaVerifyError(f"case {name}={getattr(spec, name)!r}: sizes must be integers >= 1")
        check_free_length(spec)
        return spec

    def regime(self) -> str:
        parts = [f"decay={self.decay.value}", "S0 given" if self.initial_state else "S0 None", self.layout.value]
        if self.magnitude:
            parts.append(f"|x|~1e{self.magnitude}")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.cotangents is not CotangentLayout.CONTIGUOUS:
            parts.append(f"cotangents {self.cotangents.value}")
        if self.free_T and self.free_T != self.T:
            parts.append(f"reference-free properties at T={self.free_T}")
        return ", ".join(parts)


# free_T (the reference-free properties' length) per size. ci: short (1..130, across the 16- and 64-step chunk
# boundaries) to keep its time, the pinned cases go to 317 and 1100; dev and thorough: the case's T or lengths
# where the float64 reference is slow (16k in thorough, meant for CUDA)
_FREE_T = {Size.SMALL: (1, 130), Size.MEDIUM: (1000, 4100), Size.LARGE: (4000, 16400)}


def free_lengths(profile: Profile) -> st.SearchStrategy[int]:
    """free_T for a spec of the recurrent forward families (la, gla, delta): 1..130 in ci; in dev and thorough 0
    (the case's T) or 1000..4100 and 4000..16400, never a multiple of 16."""
    lo, hi = _FREE_T[profile.size]
    if profile.size is Size.SMALL:
        return st.integers(lo, hi)
    return st.one_of(st.just(0), st.integers(lo, hi - 1).map(lambda t: t if t % 16 else t + 1))


def check_free_length(spec) -> None:
    """A spec's free_T must be an integer >= 0 (the error names it)."""
    if not isinstance(spec.free_T, int) or isinstance(spec.free_T, bool) or spec.free_T < 0:
        raise IqaVerifyError(f"case free_T={spec.free_T!r}: must be an integer >= 0 (0: the case's T)")

_BOUNDS = {
    # size: (max B, max H, max D/E, short T max, long T range)
    Size.SMALL: (3, 3, 16, 80, (256, 400)),
    # dev and thorough reach head dims past the 64/128 tiles of real kernels (and not powers of two)
    Size.MEDIUM: (4, 4, 100, 130, (256, 1100)),
    Size.LARGE: (4, 4, 160, 200, (256, 2100)),
}


def la_cases(profile: Profile) -> st.SearchStrategy[LACase]:
    """Specs for ``la-forward`` within the profile's bounds.

    - T: 1..short max, or a long range (>= 256) where state accumulation errors grow;
      both sides reach values that are not multiples of 16/32/64.
    - B, H: 1..max (B >= 2 and H >= 2 have distinct per-sequence states, so mixing shows).
    - D, E: drawn independently (D != E and D == E both occur).
    - decay, initial_state, layout, magnitude (1e-2, 1, 1e1), scale (1, 0.125, 0.5, 2.5), seed.
    - cotangents: the layout of the cotangents fed to backward, drawn like the inputs' layout.
    - free_T: 1..130 in ci; in dev and thorough 0 (the case's T) or 1000..4100 and 4000..16400 (``_FREE_T``).
    Shrinks towards B=H=D=E=T=1, mild decay, no initial state, contiguous, magnitude 1, scale 1.
    """
    max_b, max_h, max_d, short_t, (long_lo, long_hi) = _BOUNDS[profile.size]
    return st.builds(
        LACase,
        B=st.integers(1, max_b),
        # long T: never a multiple of 16 (Hypothesis favours range ends, and 256 is a multiple of every chunk size);
        # drawn below the bound so that bumping a multiple of 16 stays within it
        T=st.one_of(st.integers(1, short_t), st.integers(long_lo, long_hi - 1).map(lambda t: t if t % 16 else t + 1)),
        H=st.integers(1, max_h),
        D=st.integers(1, max_d),
        E=st.integers(1, max_d),
        decay=st.sampled_from(Decay),
        initial_state=st.booleans(),
        layout=st.sampled_from(Layout),
        magnitude=st.sampled_from([0, -2, 1]),
        scale=st.sampled_from([1.0, 0.125, 0.5, 2.5]),
        seed=st.integers(0, 2**31 - 1),
        cotangents=st.sampled_from(CotangentLayout),
        free_T=free_lengths(profile),
    )


def pinned_la_cases(profile: Profile) -> list[LACase]:
    """Edge regimes every run covers before the random search, whatever the seed.

    Besides the decay and layout regimes: head dims past the 64-wide tiles real kernels loop over, not
    powers of two (D = 100, E = 72), and 128 (a kernel whose key loop covers only the first 32 or 64
    dims passes every smaller case), at short T so the ci time holds; cotangents in every layout; and one
    case the reference-free properties run past 1024 steps.
    """
    long_t = _BOUNDS[profile.size][4][0] + 61  # 317: long, and not a multiple of 16/32/64
    C = CotangentLayout
    return [
        LACase(B=1, T=1, H=1, D=1, E=1, seed=1),
        LACase(B=2, T=long_t, H=2, D=8, E=6, decay=Decay.WEAK, initial_state=True, scale=0.5, seed=2),
        LACase(B=2, T=97, H=3, D=5, E=7, decay=Decay.UNDERFLOW, initial_state=True, layout=Layout.TRANSPOSED, seed=3,
               cotangents=C.TRANSPOSED),
        LACase(B=3, T=65, H=2, D=4, E=4, decay=Decay.PARTIAL_NONE, layout=Layout.SLICED, scale=2.5, seed=4,
               cotangents=C.SLICED),
        LACase(B=1, T=33, H=2, D=3, E=2, decay=Decay.NONE, initial_state=True, magnitude=-2, seed=5),
        # the reference-free properties run this one past 1024 steps (16 chunks of 64)
        LACase(B=1, T=long_t, H=2, D=4, E=4, decay=Decay.MILD, seed=6, free_T=1100),
        LACase(B=2, T=19, H=2, D=100, E=72, initial_state=True, scale=0.125, seed=7, cotangents=C.EXPANDED),
        LACase(B=1, T=9, H=2, D=128, E=128, decay=Decay.STRONG, initial_state=True, layout=Layout.TRANSPOSED,
               scale=0.125, seed=8, cotangents=C.TRANSPOSED),
    ]


def _log_decay(spec: LACase, gen: torch.Generator) -> torch.Tensor:
    shape = (spec.B, spec.H, spec.T)  # time last in memory; transposed to [B, T, H] by the caller's layout
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if spec.decay is Decay.NONE:
        return torch.zeros(shape, dtype=torch.float64)
    lo, hi = {
        Decay.MILD: (0.0, 0.1),
        Decay.PARTIAL_NONE: (0.0, 0.1),
        Decay.WEAK: (0.0, 1e-3),
        Decay.STRONG: (1.0, 5.0),
        Decay.UNDERFLOW: (20.0, 60.0),
    }[spec.decay]
    g = -(lo + (hi - lo) * u)
    if spec.decay is Decay.PARTIAL_NONE:
        g = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, torch.zeros_like(g), g)
    return g


def build_la_inputs(
    spec: LACase, dtype: torch.dtype, device: torch.device, names: tuple[str, ...] = ("q", "k", "v")
) -> dict[str, torch.Tensor | None]:
    """Tensors for ``spec``: ``names`` in order ([B, T, H, D] for q, k; [B, T, H, E] for v and o), then
    g [B, T, H] and initial_state [B, H, D, E] (or None), in ``dtype`` on ``device``, laid out as
    ``spec.layout`` says. Values depend only on (spec, names), not on dtype or device."""
    gen = torch.Generator().manual_seed(spec.seed)
    amp = 10.0 ** spec.magnitude
    dims = {"q": spec.D, "k": spec.D, "v": spec.E, "o": spec.E}
    out: dict[str, torch.Tensor | None] = {}
    for name in names:
        x = torch.randn(spec.B, spec.H, spec.T, dims[name], generator=gen, dtype=torch.float64) * amp
        out[name] = _sequence(x, spec.layout, dtype, device)
    out["g"] = _sequence(_log_decay(spec, gen), spec.layout, dtype, device)
    if spec.initial_state:
        s0 = torch.randn(spec.B, spec.H, spec.E, spec.D, generator=gen, dtype=torch.float64) * amp
        s0 = s0.to(device=device, dtype=dtype).transpose(-1, -2)  # [B, H, D, E], column-major per head
        if spec.layout is Layout.CONTIGUOUS:
            s0 = s0.contiguous()
        elif spec.layout is Layout.SLICED:
            s0 = torch.cat([s0, torch.zeros_like(s0[..., :1])], dim=-1)[..., : spec.E]
        out["initial_state"] = s0
    else:
        out["initial_state"] = None
    return out


def _sequence(x: torch.Tensor, layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """x: [B, H, T, ...] float64 -> [B, T, H, ...] in dtype/device with the requested memory layout."""
    logical = x.to(device=device, dtype=dtype).transpose(1, 2)
    if layout is Layout.CONTIGUOUS:
        return logical.contiguous()
    if layout is Layout.TRANSPOSED:
        return logical
    # SLICED: every other time step of a buffer twice as long
    B, T = logical.shape[:2]
    buf = torch.zeros((B, 2 * T, *logical.shape[2:]), dtype=dtype, device=device)
    buf[:, ::2] = logical
    return buf[:, ::2]

