"""Cases for ``iqa``: specs, tensors and Hypothesis strategies with a controlled contraction.

An :class:`IQACase` is a small frozen description — sizes, value variant, regime, a target for the
Lipschitz bound of the map, memory layout and a seed — from which :func:`build_iqa_inputs` makes the
tensors deterministically. Hypothesis draws and shrinks specs, never tensor entries.

The map is ``f(y) = softmax(scale K (y w_q)^T) V`` (SPEC §3); :func:`iqa_verify.reference.iqa.lipschitz_bound`
gives a computable bound ``L`` on its Lipschitz constant, homogeneous of degree 1 in ``w_q`` and in
``w_k``. Building a case rescales ``w_q`` and ``w_k`` by the same factor ``c = sqrt(target / L)`` so
that ``max_b L_b`` hits the spec's target:

* :attr:`Regime.CONTRACTIVE` (target < 1): f is a contraction, the fixed point is unique and equals
  the consensus ``1 · mean_j(v_j)^T`` (SPEC §4); plain iteration converges at rate <= target.
* :attr:`Regime.NON_CONTRACTIVE` (target > 1): non-trivial fixed points may exist. The build keeps
  only draws for which float64 plain iteration from ``y_0 = V`` converges within
  :data:`ACCEPT_STEPS` steps to a fixed point with ``sigma_min(I - ∂f/∂y) >= MIN_SIGMA`` (so a correct
  kernel with a sound solver can meet it, the reference converges there, and forward and adjoint
  errors are at most 1/MIN_SIGMA times the residuals, as in the contractive regime at bound 0.9),
  preferring draws whose fixed point is not the consensus.
* :attr:`Regime.HARD` (thorough profile only): no such filtering; plain iteration may not converge.
  Only honesty properties apply where the reference cannot converge.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from hypothesis import strategies as st

from iqa_verify.errors import IqaVerifyError
from iqa_verify.profiles import Profile, Size
from iqa_verify.reference.iqa import consensus_fixed_point, iqa_jacobian_y_ref, iqa_map_ref, lipschitz_bound

__all__ = [
    "ACCEPT_STEPS",
    "ACCEPT_TOL",
    "MIN_SIGMA",
    "BuiltInputs",
    "IQACase",
    "Regime",
    "build_iqa_inputs",
    "built_inputs",
    "iqa_cases",
    "pinned_iqa_cases",
]

F64 = torch.float64
#: A non-contractive draw is kept when float64 plain iteration from V reaches this relative residual ...
ACCEPT_TOL = 1e-11
#: ... within this many steps (a float32 solver at tol 1e-6 then needs well under half of them).
ACCEPT_STEPS = 300
_ATTEMPTS = 4
#: ... and the fixed point is well conditioned: sigma_min(I - ∂f/∂y) >= this (forward error <= residual / it),
#: the same bound a contraction with Lipschitz bound 0.9 (the ci's strongest) guarantees.
MIN_SIGMA = 0.1
#: A fixed point counts as non-trivial when it is this far (relative to max |V|) from the consensus.
_NONTRIVIAL = 1e-3


class Regime(enum.Enum):
    """Where the map sits; listed in shrink order. See the module docstring."""

    CONTRACTIVE = "contractive"
    NON_CONTRACTIVE = "non-contractive"
    HARD = "hard"


@dataclass(frozen=True)
class IQACase:
    """B, N, Din, Dk, E sizes (E is ignored, = Din, without a value projection); value_projection:
    ``V = x w_v`` with ``scale=None`` (default ``Dk**-0.5``) or ``V = x`` with ``scale=1``;
    kind: the :class:`Regime`; target: the Lipschitz bound ``max_b L_b`` the weights are rescaled to; transposed: x and
    w_q passed as non-contiguous views; seed: the values' random seed."""

    B: int
    N: int
    Din: int
    Dk: int
    E: int
    value_projection: bool = True
    kind: Regime = Regime.CONTRACTIVE
    target: float = 0.5
    transposed: bool = False
    seed: int = 0

    @property
    def E_eff(self) -> int:
        return self.E if self.value_projection else self.Din

    @property
    def scale(self) -> float | None:
        """The ``scale`` keyword passed to the kernel: None (the default) with a value projection, else 1."""
        return None if self.value_projection else 1.0

    def to_json(self) -> str:
        d = asdict(self)
        d["kind"] = self.kind.value
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> IQACase:
        try:
            d = json.loads(text)
            d["kind"] = Regime(d.get("kind", "contractive"))
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise IqaVerifyError(f"case={text!r}: not an iqa case spec ({exc})") from None

    def regime(self) -> str:
        variant = "V=x W_v, scale=Dk^-0.5 (default)" if self.value_projection else "V=x, scale=1"
        layout = ", non-contiguous x and w_q" if self.transposed else ""
        return f"{self.kind.value}, Lipschitz bound {self.target:g}, {variant}{layout}"


_BOUNDS = {
    # size: (max B, max N, max Din/Dk/E, contractive targets, non-contractive targets, with hard regime)
    Size.SMALL: (3, 6, 6, (0.3, 0.6, 0.9), (3.0, 8.0, 12.0), False),
    Size.MEDIUM: (4, 10, 8, (0.3, 0.6, 0.9, 0.97), (3.0, 8.0, 12.0, 20.0), False),
    Size.LARGE: (4, 16, 12, (0.3, 0.6, 0.9, 0.99), (3.0, 8.0, 12.0, 20.0, 40.0), True),
}


def iqa_cases(profile: Profile) -> st.SearchStrategy[IQACase]:
    """Specs for ``iqa`` within the profile's bounds.

    - B: 1..max (B >= 2: per-sequence fixed points must not mix); N: 1..max (N = 1: y = V exactly).
    - Din, Dk, E: drawn independently, so rectangular weights (Din != Dk != E) are common.
    - value_projection: both variants of the notes (``V = x W_v`` with the default scale, ``V = x``
      with scale 1).
    - regime and target: contractive targets up to 0.9 (ci), 0.97 (dev), 0.99 (thorough);
      non-contractive targets 3..12 (ci) up to 40 (thorough); the unfiltered HARD regime only in thorough.
    - transposed: non-contiguous x and w_q; seed.
    Shrinks towards B=N=Din=Dk=E=1, a value projection, the contractive regime at the smallest target,
    contiguous inputs.
    """
    max_b, max_n, max_d, contractive, non_contractive, hard = _BOUNDS[profile.size]
    regimes = [Regime.CONTRACTIVE, Regime.NON_CONTRACTIVE] + ([Regime.HARD] if hard else [])

    @st.composite
    def cases(draw) -> IQACase:
        regime = draw(st.sampled_from(regimes))
        targets = contractive if regime is Regime.CONTRACTIVE else non_contractive
        return IQACase(
            B=draw(st.integers(1, max_b)),
            N=draw(st.integers(1, max_n)),
            Din=draw(st.integers(1, max_d)),
            Dk=draw(st.integers(1, max_d)),
            E=draw(st.integers(1, max_d)),
            value_projection=draw(st.booleans().map(lambda b: not b)),
            kind=regime,
            target=draw(st.sampled_from(targets)),
            transposed=draw(st.booleans()),
            seed=draw(st.integers(0, 2**31 - 1)),
        )

    return cases()


def pinned_iqa_cases(profile: Profile) -> list[IQACase]:
    """Edge regimes every run covers before the random search, whatever the seed: N = 1, rectangular
    weights with B >= 2 at the ci's strongest contraction, both value variants, non-contractive cases
    with a non-trivial fixed point, non-contiguous inputs."""
    nc = Regime.NON_CONTRACTIVE
    return [
        IQACase(B=1, N=1, Din=2, Dk=3, E=4, seed=1),
        IQACase(B=2, N=5, Din=3, Dk=4, E=2, target=0.9, seed=2),
        IQACase(B=2, N=4, Din=3, Dk=2, E=3, value_projection=False, target=0.9, transposed=True, seed=3),
        IQACase(B=2, N=4, Din=3, Dk=2, E=4, kind=nc, target=12.0, seed=4),
        IQACase(B=2, N=3, Din=2, Dk=3, E=2, value_projection=False, kind=nc, target=12.0, transposed=True, seed=5),
    ]


@dataclass(frozen=True)
class BuiltInputs:
    """float64 tensors of a case (already rounded through the case's dtype) and what the build found:
    bound: ``lipschitz_bound`` per batch element [B]; converged: float64 plain iteration from V reached
    :data:`ACCEPT_TOL` within :data:`ACCEPT_STEPS` steps; nontrivial: its fixed point is not the consensus;
    target: the bound actually used (halved when no non-contractive draw converged)."""

    x: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor | None
    bound: torch.Tensor
    converged: bool
    nontrivial: bool
    target: float


def _draw(spec: IQACase, sub: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(spec.seed * 1000 + sub)
    x = torch.randn(spec.B, spec.N, spec.Din, dtype=F64, generator=gen)
    w_q = torch.randn(spec.E_eff, spec.Dk, dtype=F64, generator=gen) * spec.Dk**-0.5
    w_k = torch.randn(spec.Din, spec.Dk, dtype=F64, generator=gen) * spec.Din**-0.5
    w_v = torch.randn(spec.Din, spec.E, dtype=F64, generator=gen) * spec.Din**-0.5 if spec.value_projection else None
    return x, w_q, w_k, w_v


def _rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).to(F64)


def _rescaled(spec: IQACase, sub: int, target: float, dtype: torch.dtype):
    x, w_q, w_k, w_v = _draw(spec, sub)
    bound = float(lipschitz_bound(x, w_q, w_k, w_v, spec.scale).max())
    c = (target / bound) ** 0.5 if bound > 0 else 1.0
    x, w_q, w_k, w_v = (_rounded(t, dtype) for t in (x, w_q * c, w_k * c, w_v))
    return x, w_q, w_k, w_v, lipschitz_bound(x, w_q, w_k, w_v, spec.scale)


def _plain_iteration_converges(x, w_q, w_k, w_v, scale) -> tuple[bool, bool]:
    """(float64 plain iteration from V converges within ACCEPT_STEPS, its fixed point is non-trivial)."""
    v = x @ w_v if w_v is not None else x
    y = v
    vn = torch.linalg.vector_norm(v.flatten(1), dim=1)
    best = float("inf")
    for step in range(ACCEPT_STEPS):
        fy = iqa_map_ref(y, x, w_q, w_k, w_v, scale=scale)
        r = torch.linalg.vector_norm((fy - y).flatten(1), dim=1) / torch.maximum(
            torch.linalg.vector_norm(y.flatten(1), dim=1), vn).clamp_min(torch.finfo(F64).tiny)
        worst = float(r.max())
        y = fy
        if worst <= ACCEPT_TOL:
            n = y.shape[1] * y.shape[2]
            i_minus_j = torch.eye(n, dtype=F64) - iqa_jacobian_y_ref(y, x, w_q, w_k, w_v, scale=scale)
            if float(torch.linalg.svdvals(i_minus_j).min()) < MIN_SIGMA:
                return False, False
            gap = float((y - consensus_fixed_point(x, w_v)).abs().max())
            return True, gap > _NONTRIVIAL * max(float(v.abs().max()), torch.finfo(F64).tiny)
        best = min(best, worst)
        if step >= 60 and worst > 0.5 * best ** 0.5:  # stalled or cycling far from convergence
            return False, False
    return False, False


@lru_cache(maxsize=2048)
def built_inputs(spec: IQACase, dtype: torch.dtype) -> BuiltInputs:
    """The float64 tensors of ``spec`` (values representable in ``dtype``); cached, deterministic."""
    target = spec.target
    if spec.kind is not Regime.NON_CONTRACTIVE:
        x, w_q, w_k, w_v, bound = _rescaled(spec, 0, target, dtype)
        if spec.kind is Regime.CONTRACTIVE:
            return BuiltInputs(x, w_q, w_k, w_v, bound, True, False, target)
        conv, nontrivial = _plain_iteration_converges(x, w_q, w_k, w_v, spec.scale)
        return BuiltInputs(x, w_q, w_k, w_v, bound, conv, nontrivial, target)
    fallback = None
    while True:
        for sub in range(_ATTEMPTS):
            x, w_q, w_k, w_v, bound = _rescaled(spec, sub, target, dtype)
            conv, nontrivial = _plain_iteration_converges(x, w_q, w_k, w_v, spec.scale)
            if conv and nontrivial:
                return BuiltInputs(x, w_q, w_k, w_v, bound, True, True, target)
            if conv and fallback is None:
                fallback = BuiltInputs(x, w_q, w_k, w_v, bound, True, False, target)
        if fallback is not None:
            return fallback
        target /= 2  # terminates: below 1 the map contracts and plain iteration converges


def build_iqa_inputs(spec: IQACase, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Contract-order inputs of ``spec`` in ``dtype`` on ``device``: x [B, N, Din], w_q [E, Dk],
    w_k [Din, Dk], w_v [Din, E] or None. x and w_q are non-contiguous views when ``spec.transposed``."""
    b = built_inputs(spec, dtype)

    def put(t: torch.Tensor | None, transposed: bool) -> torch.Tensor | None:
        if t is None:
            return None
        if transposed:  # same values, column-major storage
            return t.transpose(-1, -2).to(device=device, dtype=dtype).contiguous().transpose(-1, -2)
        return t.to(device=device, dtype=dtype).contiguous()

    return {"x": put(b.x, spec.transposed), "w_q": put(b.w_q, spec.transposed), "w_k": put(b.w_k, False),
            "w_v": put(b.w_v, False)}
