"""Cases for the inverse forms (``la-solve-v``, ``la-solve-k``, ``la-solve-q``): specs, tensors, strategies.

A :class:`SolveCase` is an :class:`~iqa_verify.properties.la_forward.cases.LACase` (shapes, decay, initial state,
layout, magnitude, scale, seed) plus what an inverse problem adds: which input is unknown, how the
known inputs condition the system (:class:`Conditioning`) and whether ``o`` is consistent (produced by
``la_forward``) or carries noise outside the range of the map (a true least-squares problem).

:func:`build_solve_problem` makes the float64 problem deterministically from the spec::

    knowns (conditioned)  ->  rounded to the case dtype
    x_true ~ N(0, amp^2)  ->  rounded to the case dtype
    o = la_forward_ref(q, k, v, g, S_0)[0]        (float64, from the rounded tensors)
        + 0.1 * amp^2 * N(0, 1)                     if not consistent
    o  ->  rounded to the case dtype

so ``o`` is consistent to the rounding of the dtype exactly when the spec says so.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from iqa_verify.errors import IqaVerifyError
from iqa_verify.profiles import Profile, Size
from iqa_verify.properties.la_forward.cases import Decay, LACase, Layout, build_la_inputs
from iqa_verify.reference.la_forward import la_forward_ref
from iqa_verify.reference.la_inverse import Unknown

__all__ = [
    "Conditioning",
    "SolveCase",
    "SolveProblem",
    "KNOWNS",
    "build_solve_problem",
    "build_solve_inputs",
    "pinned_solve_cases",
    "solve_cases",
]

F64 = torch.float64

KNOWNS: dict[Unknown, tuple[str, str]] = {Unknown.V: ("q", "k"), Unknown.K: ("q", "v"), Unknown.Q: ("k", "v")}
"""The two known sequence inputs of each inverse, in contract order (then o, g, initial_state)."""


class Conditioning(enum.Enum):
    """How the known inputs condition the linear system. Listed in shrink order.

    WELL: conditioned by construction (the forward-error and gradient properties apply):
      V: ``k_t = 2 sqrt(D) q_t / |q_t|^2 + 0.3 n_t / sqrt(D)`` (diagonal q_t·k_t ~ 2 sqrt(D) dominates);
      K: E >= 2 D (more equations per step than unknowns);  Q: S_0 given and E >= D.
    ILL: the raw random inputs (V: plus one step with q_t·k_t shrunk 1000x): condition numbers of
      1e3..1e12; only backward errors and round trips are meaningful.
    SINGULAR: exactly singular in every dtype:
      V: WELL keys, then at some steps q_t[0] = 0 and k_t[1:] = 0, so q_t·k_t = 0 exactly (q_t = 0 if D = 1);
      K: v_t = 0 at some steps (k_t unidentifiable), and D > E or E = 1 where the sizes allow;
      Q: S_0 = None and k_1 = 0 (S_1 = 0; S_t has rank <= t - 1 < D for small t).
    """

    WELL = "well"
    ILL = "ill"
    SINGULAR = "singular"


@dataclass(frozen=True)
class SolveCase:
    """unknown: which input is solved for; la: shapes, decay, layout, ... (see LACase);
    conditioning: see :class:`Conditioning`; consistent: o produced by la_forward (else plus noise)."""

    unknown: Unknown
    la: LACase
    conditioning: Conditioning = Conditioning.WELL
    consistent: bool = True

    @property
    def seed(self) -> int:  # cotangents and the like are seeded by the case
        return self.la.seed

    def to_json(self) -> str:
        d = json.loads(self.la.to_json())
        d.update(unknown=self.unknown.value, conditioning=self.conditioning.value, consistent=self.consistent)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, unknown: Unknown | None = None) -> SolveCase:
        """Parse a spec; with ``unknown`` given, the spec must be for that inverse (or name none)."""
        try:
            d = json.loads(text)
            u = Unknown(d.pop("unknown", unknown.value if unknown else "v"))
            cond = Conditioning(d.pop("conditioning", "well"))
            consistent = bool(d.pop("consistent", True))
        except (ValueError, TypeError, AttributeError) as exc:
            raise IqaVerifyError(f"case={text!r}: not an inverse-form case spec ({exc})") from None
        if unknown is not None and u is not unknown:
            raise IqaVerifyError(f"case unknown={u.value!r}: this family solves for {unknown.value!r}")
        return cls(u, LACase.from_json(json.dumps(d)), cond, consistent)

    def regime(self) -> str:
        kind = "consistent o" if self.consistent else "noisy o (least squares)"
        return f"solve {self.unknown.value}, {self.conditioning.value}, {kind}, {self.la.regime()}"


# size: (max B, max H, max D/E, max T, max T*max(D, E)); la-solve-k is smaller (its solver iterates)
_BOUNDS = {
    (Size.SMALL, False): (2, 2, 6, 70, 200),
    (Size.MEDIUM, False): (3, 3, 12, 200, 600),
    (Size.LARGE, False): (4, 4, 16, 400, 1500),
    (Size.SMALL, True): (2, 2, 4, 80, 64),
    (Size.MEDIUM, True): (2, 2, 8, 130, 200),
    (Size.LARGE, True): (3, 3, 16, 300, 400),
}


def _bounds(profile: Profile, unknown: Unknown) -> tuple[int, int, int, int, int]:
    return _BOUNDS[(profile.size, unknown is Unknown.K)]


def _dims(draw, unknown: Unknown, cond: Conditioning, max_d: int) -> tuple[int, int]:
    """D, E for the regime (shrinking towards D = E = 1 or the smallest sizes the regime allows)."""
    if unknown is Unknown.K and cond is Conditioning.WELL:
        D = draw(st.integers(1, max(1, max_d // 2)))
        return D, draw(st.integers(min(2 * D, max_d), max_d))
    if unknown is Unknown.K and cond is Conditioning.SINGULAR:
        E = draw(st.integers(1, max(1, max_d - 1)))
        return draw(st.integers(min(E + 1, max_d), max_d)), E
    if unknown is Unknown.Q and cond is Conditioning.WELL:
        D = draw(st.integers(1, max_d))
        return D, draw(st.integers(D, max_d))
    return draw(st.integers(1, max_d)), draw(st.integers(1, max_d))


def solve_cases(profile: Profile, unknown: Unknown) -> st.SearchStrategy[SolveCase]:
    """Specs for the inverse solving for ``unknown`` within the profile's bounds.

    - conditioning: WELL, ILL, SINGULAR (see :class:`Conditioning`; it also constrains D, E, S_0).
    - consistent: o from la_forward, or plus noise (least squares).
    - D, E: 1..max (6 in ci; 4 for la-solve-k), independently except where the regime constrains them.
    - T: 1..min(max T, cap // max(D, E)) with cap = T*max(D, E) <= 200 in ci (64 for la-solve-k): the
      dense float64 references are O((T max(D, E))^3). Reaches T > 64 (more than one chunk of the
      built-in kernels) and values that are not multiples of 16/32/64.
    - B, H: 1..2 in ci; decay, initial_state (forced by Q WELL/SINGULAR), layout, magnitude, scale, seed.
    Shrinks towards B = H = T = D = E = 1, WELL, consistent, mild decay, contiguous, scale 1.
    """
    if not isinstance(unknown, Unknown):
        raise IqaVerifyError(f"unknown={unknown!r}: must be an Unknown (V, K or Q)")
    max_b, max_h, max_d, max_t, cap = _bounds(profile, unknown)

    @st.composite
    def draw_case(draw) -> SolveCase:
        cond = draw(st.sampled_from(Conditioning))
        consistent = not draw(st.booleans())
        D, E = _dims(draw, unknown, cond, max_d)
        T = draw(st.integers(1, max(1, min(max_t, cap // max(D, E)))))
        if unknown is Unknown.Q and cond is not Conditioning.ILL:
            initial = cond is Conditioning.WELL
        else:
            initial = draw(st.booleans())
        la = LACase(
            B=draw(st.integers(1, max_b)),
            T=T,
            H=draw(st.integers(1, max_h)),
            D=D,
            E=E,
            decay=draw(st.sampled_from(Decay)),
            initial_state=initial,
            layout=draw(st.sampled_from(Layout)),
            magnitude=draw(st.sampled_from([0, -2, 1])),
            scale=draw(st.sampled_from([1.0, 0.125, 0.5, 2.5])),
            seed=draw(st.integers(0, 2**31 - 1)),
        )
        return SolveCase(unknown, la, cond, consistent)

    return draw_case()


def pinned_solve_cases(profile: Profile, unknown: Unknown) -> list[SolveCase]:
    """Edge regimes every run covers first: T = D = E = 1; T past one chunk (64) and not a multiple of
    16 with S_0 and views; exactly singular; ill-conditioned with strong decay; noisy o (least squares).

    la-solve-v adds an ill-conditioned chain (kappa ~1e11 in fp16) whose minimum-norm answer, and with it the
    state it carries, leaves fp16's range (|v| 4.3e5, |S_t| 5.4e5) from an o that fits (|o| < 10): the
    answer must come out as +-inf, never NaN; a kernel that carries its state in fp16 gets inf - inf there
    (issue #14: random draws reach such a chain at only some seeds)."""
    max_t, cap = _bounds(profile, unknown)[3:]
    long_t = min(max_t, 67)
    C, S = Conditioning, SolveCase
    overflow = [S(unknown, LACase(B=1, T=min(21, max_t), H=1, D=3, E=1, seed=0), C.ILL)] if unknown is Unknown.V else []
    return [
        S(unknown, LACase(B=1, T=1, H=1, D=1, E=1, seed=11)),
        S(unknown, LACase(B=2, T=long_t, H=1, D=1, E=max(1, cap // long_t) if unknown is not Unknown.V else 1,
                          initial_state=True, layout=Layout.TRANSPOSED, scale=0.5, seed=12)),
        S(unknown, LACase(B=1, T=min(13, max_t), H=2, D=3, E=2, decay=Decay.NONE, layout=Layout.SLICED, seed=13),
          C.SINGULAR),
        S(unknown, LACase(B=2, T=min(21, max_t), H=1, D=2, E=3, decay=Decay.STRONG, initial_state=True, seed=14),
          C.ILL),
        S(unknown, LACase(B=1, T=min(9, max_t), H=2, D=2, E=4, initial_state=True, magnitude=1, scale=2.5, seed=15),
          C.WELL, consistent=False),
        *overflow,
    ]


@dataclass(frozen=True)
class SolveProblem:
    """A built inverse problem, all float64 [B, T, H, *] (contiguous): the knowns (q, k, v, g,
    initial_state as the forward takes them, with the unknown at its true value x_true) and o."""

    forward_inputs: dict[str, torch.Tensor | None]
    x_true: torch.Tensor
    o: torch.Tensor


def _steps(gen: torch.Generator, B: int, T: int, H: int, share: float) -> torch.Tensor:
    """A random [B, T, H] mask with about ``share`` of the steps, and at least one step per sequence-head."""
    mask = torch.rand(B, T, H, generator=gen) < share
    first = torch.randint(0, T, (B, 1, H), generator=gen)
    return mask | (torch.arange(T).view(1, T, 1) == first)


def _condition(spec: SolveCase, t: dict[str, torch.Tensor | None], gen: torch.Generator) -> None:
    """Apply the spec's :class:`Conditioning` to the float64 inputs in place (see its docstring)."""
    la, u, cond = spec.la, spec.unknown, spec.conditioning
    amp = 10.0 ** la.magnitude
    q, k, v = t["q"], t["k"], t["v"]
    if u is Unknown.V and cond is not Conditioning.ILL:
        n = torch.randn(k.shape, generator=gen, dtype=F64)
        qn = q / amp
        t["k"] = k = amp * (2 * math.sqrt(la.D) * qn / qn.square().sum(-1, keepdim=True) + 0.3 * n / math.sqrt(la.D))
        if cond is Conditioning.SINGULAR:
            at = _steps(gen, la.B, la.T, la.H, 0.25).unsqueeze(-1)
            if la.D == 1:
                t["q"] = torch.where(at, torch.zeros_like(q), q)
            else:
                t["q"] = torch.cat([torch.where(at, 0.0, q[..., :1]), q[..., 1:]], dim=-1)
                t["k"] = torch.cat([k[..., :1], torch.where(at, 0.0, k[..., 1:])], dim=-1)
    elif u is Unknown.V:  # ILL: one step per sequence-head with q_t·k_t shrunk 1000x
        at = _steps(gen, la.B, la.T, la.H, 0.0).unsqueeze(-1)
        along = (q * k).sum(-1, keepdim=True) / q.square().sum(-1, keepdim=True) * q
        t["k"] = torch.where(at, k - 0.999 * along, k)
    elif u is Unknown.K and cond is Conditioning.SINGULAR:
        at = _steps(gen, la.B, la.T, la.H, 0.2).unsqueeze(-1)
        t["v"] = torch.where(at, torch.zeros_like(v), v)
    elif u is Unknown.Q and cond is Conditioning.SINGULAR:
        t["k"] = torch.cat([torch.zeros_like(k[:, :1]), k[:, 1:]], dim=1)


HEADROOM = 64.0
"""o is kept below ``finfo(dtype).max / HEADROOM`` (see :func:`build_solve_problem`)."""


def build_solve_problem(spec: SolveCase, dtype: torch.dtype) -> SolveProblem:
    """The float64 problem of ``spec`` with every tensor already rounded to ``dtype`` (see the module
    docstring). Depends only on (spec, dtype).

    Range: where o would not fit ``dtype`` with :data:`HEADROOM` (fp16 tops out at 65504; o grows like
    T |q| |k| |v|), q, k, v are scaled by ``f`` and S_0 by ``f^2`` (o scales by ``f^3``) so that it does:
    a problem whose o cannot be written in the dtype is not an input the kernel can be given. Likewise where
    an input itself would not (a key of V's well-conditioned regime, ~1/|q_t|): then every input and o fit
    with the headroom. Problems whose inputs and o are finite in the dtype are left as they were.
    """
    base = replace(spec.la, layout=Layout.CONTIGUOUS)
    t = build_la_inputs(base, F64, torch.device("cpu"), names=("q", "k", "v"))
    gen = torch.Generator().manual_seed(spec.la.seed + 104729)
    _condition(spec, t, gen)
    la = spec.la
    noise = None if spec.consistent else 0.1 * (10.0 ** la.magnitude) ** 2 * torch.randn(
        la.B, la.T, la.H, la.E, generator=gen, dtype=F64)
    rounded, o = _rounded_problem(t, spec, dtype, noise)
    limit = torch.finfo(dtype).max / HEADROOM
    peak = float(o.abs().max())
    if not all(bool(torch.isfinite(x).all()) for x in (*rounded.values(), o) if x is not None):
        # an input past the dtype's range (V's well-conditioned keys grow like 1/|q_t|: fp16 overflowed one at
        # calibration seed 16): shrink until every input and o fit, in the float64 problem
        o64 = la_forward_ref(t["q"], t["k"], t["v"], t["g"], t["initial_state"], scale=la.scale)[0]
        ins = max(float(t[n].abs().max()) for n in ("q", "k", "v"))
        s0 = float(t["initial_state"].abs().max()) if t["initial_state"] is not None else 0.0
        f = min(1.0, (limit / max(float(o64.abs().max()), 1e-300)) ** (1.0 / 3.0), limit / ins,
                math.sqrt(limit / s0) if s0 else 1.0)
        peak = limit / f**3  # rescale by f below
    if peak > limit:
        f = (limit / peak) ** (1.0 / 3.0)
        t = dict(t, q=t["q"] * f, k=t["k"] * f, v=t["v"] * f)
        if t["initial_state"] is not None:
            t["initial_state"] = t["initial_state"] * (f * f)
        rounded, o = _rounded_problem(t, spec, dtype, None if noise is None else noise * f**3)
    return SolveProblem(rounded, rounded[spec.unknown.value], o.to(dtype).to(F64))


def _rounded_problem(t: dict[str, torch.Tensor | None], spec: SolveCase, dtype: torch.dtype,
                     noise: torch.Tensor | None) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """The inputs rounded to ``dtype`` (as float64) and o = la_forward of them (+ noise), float64."""
    rounded = {n: (x.to(dtype).to(F64) if x is not None else None) for n, x in t.items()}
    o = la_forward_ref(rounded["q"], rounded["k"], rounded["v"], rounded["g"], rounded["initial_state"],
                       scale=spec.la.scale)[0]
    return rounded, (o if noise is None else o + noise)


def build_solve_inputs(spec: SolveCase, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor | None]:
    """The kernel's inputs in contract order: the two knowns, o, g, initial_state (or None), in
    ``dtype`` on ``device``, laid out as ``spec.la.layout`` says."""
    p = build_solve_problem(spec, dtype)
    names = (*KNOWNS[spec.unknown], "o", "g")
    seq = {n: _lay_out(p.forward_inputs[n] if n != "o" else p.o, spec.la.layout, dtype, device) for n in names}
    s0 = p.forward_inputs["initial_state"]
    if s0 is not None:
        s0 = s0.to(device=device, dtype=dtype)
        if spec.la.layout is not Layout.CONTIGUOUS:  # column-major per head
            s0 = s0.transpose(-1, -2).contiguous().transpose(-1, -2)
    return {**seq, "initial_state": s0}


def _lay_out(x: torch.Tensor, layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Logical [B, T, H, ...] -> same values in ``dtype`` on ``device`` with the requested memory layout."""
    x = x.to(device=device, dtype=dtype)
    if layout is Layout.CONTIGUOUS:
        return x.contiguous()
    if layout is Layout.TRANSPOSED:  # [B, H, T, ...] in memory
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    buf = torch.zeros((x.shape[0], 2 * x.shape[1], *x.shape[2:]), dtype=dtype, device=device)
    buf[:, ::2] = x
    return buf[:, ::2]
