"""The ``iqa`` family: strategy coverage, the reference it judges with, and its verdicts on built-in kernels.

The exact built-in kernels holding every property (float32 and bf16, seed 0, ci profile) is run by
tests/test_builtin_kernels.py, which parametrizes over every registered family's built-ins; here we check
that those items exist, so that dropping a kernel or a dtype from the family shows up as a failure.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, find, settings

from iqa_verify.iqa.backward import Unrolled
from iqa_verify.iqa.solvers import FixedPointIteration
from iqa_verify.loading import load_kernel
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check, run_property
from iqa_verify.supervisor import InProcess
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.comparison import compare
from iqa_verify.properties.iqa.cases import ACCEPT_TOL, IQACase, Regime, built_inputs, iqa_cases, pinned_iqa_cases
from iqa_verify.properties.iqa.diagnostics import gradient_gap_vs_unroll_depth, saved_bytes_vs_iterations
from iqa_verify.reference.iqa import (
    consensus_fixed_point,
    iqa_finite_difference_grad_ref,
    iqa_implicit_grad_ref,
    iqa_map_ref,
    iqa_solve_ref,
    iqa_unrolled_grad_ref,
    lipschitz_bound,
)

F64 = torch.float64
CI = profile_named("ci")
EXACT = (
    "iqa_verify.iqa.kernel:iqa_forward_anderson_implicit",
    "iqa_verify.iqa.kernel:iqa_forward_broyden_implicit",
    "iqa_verify.iqa.kernel:iqa_forward_fixed_point_implicit",
    "iqa_verify.iqa.kernel:iqa_forward_fixed_point_unrolled",
)



def _run(impl: str, dtype=torch.float32, seed: int = 0, only=()):
    fam = family("iqa")
    cfg = RunConfig(fam, load_kernel(impl), impl, dtype, torch.device("cpu"), CI, seed=seed)
    return check(cfg, only=only)


# ---------------------------------------------------------------- built-in kernels


def test_exact_builtins_are_verified_in_float32_and_bf16_by_the_builtin_test() -> None:
    from tests.test_builtin_kernels import SLOW, _items

    items = {(p.values[0].impl, *p.values[1:3]) for p in _items() if p.values[1] == "iqa"}
    fam = family("iqa")
    assert {k.impl for k in fam.builtin_kernels} >= set(EXACT)
    assert not {p.id for p in fam.properties} & SLOW  # every property is searched in the default run
    for impl in EXACT:
        for dtype in ("float32", "bfloat16"):
            assert (impl, "iqa", dtype) in items


def test_declared_approximation_passes_and_its_gap_is_reported() -> None:
    impl = "iqa_verify.iqa.kernel:iqa_forward_anderson_one_step"
    verdict = _run(impl, only=("iqa/gradients", "iqa/gradient-gap"))
    assert verdict.passed, [r.counterexample.message for r in verdict.failed() if r.counterexample]
    # the gap at a non-trivial fixed point (a replayed case keeps its notes)
    fam = family("iqa")
    cfg = RunConfig(fam, load_kernel(impl), impl, torch.float32, torch.device("cpu"), CI, 0)
    gap = run_property(cfg, fam.property("iqa/gradient-gap"), case_json=pinned_iqa_cases(CI)[3].to_json())
    notes = [c.note for c in gap.worst]
    assert gap.status is Status.PASSED and len(notes) == 4
    assert all("declared approximation OneStep()" in n and "reported, not judged" in n for n in notes)
    rel = [float(n.split("relative to ‖all implicit grads‖ ")[1].split()[0]) for n in notes]
    assert max(rel) > 1e-2  # a one-step gradient is measurably off at a non-trivial fixed point


def test_plain_kernel_without_stats_passes_honesty_with_a_note_saying_so() -> None:
    r = run_property(
        RunConfig(family("iqa"), load_kernel("tests/bug_zoo/iqa.py:scale_ignored"), "plain", torch.float32,
                  torch.device("cpu"), CI, 0, isolation=InProcess()),
        family("iqa").property("iqa/convergence-honesty"),
    )
    assert r.status is Status.PASSED and any("reports no solver stats" in c.note for c in r.worst)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("impl", EXACT, ids=[i.rsplit(":", 1)[1] for i in EXACT])
def test_exact_builtins_hold_under_seeds_0_to_9(impl: str, seed: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        verdict = _run(impl, dtype, seed)
        assert verdict.passed, "\n".join(f"{r.property_id}: {r.counterexample.message if r.counterexample else r.error}"
                                         for r in verdict.failed())


# ---------------------------------------------------------------- strategies


def _find(profile, condition):
    return find(iqa_cases(profile), condition, settings=settings(max_examples=400, database=None,
                                                                 suppress_health_check=list(HealthCheck)))


@pytest.mark.parametrize(
    "what, condition",
    [
        ("N = 1", lambda s: s.N == 1),
        ("B >= 2", lambda s: s.B >= 2),
        ("rectangular Din != Dk != E", lambda s: len({s.Din, s.Dk, s.E}) == 3 and s.value_projection),
        ("V = x with scale 1", lambda s: not s.value_projection and s.scale == 1.0),
        ("V = x W_v with the default scale", lambda s: s.value_projection and s.scale is None),
        ("contractive at 0.9", lambda s: s.kind is Regime.CONTRACTIVE and s.target == 0.9),
        ("non-contractive", lambda s: s.kind is Regime.NON_CONTRACTIVE and s.target > 1),
        ("non-contiguous", lambda s: s.transposed),
    ],
)
def test_ci_strategy_covers(what, condition) -> None:
    assert condition(_find(CI, condition)), what


def test_hard_regime_and_rate_099_only_in_thorough() -> None:
    thorough = profile_named("thorough")
    assert _find(thorough, lambda s: s.kind is Regime.HARD).kind is Regime.HARD
    assert _find(thorough, lambda s: s.target == 0.99).target == 0.99
    with pytest.raises(Exception, match="(?i)no examples found|no such example|could not find"):
        _find(CI, lambda s: s.kind is Regime.HARD or s.target == 0.99)


def test_spec_json_round_trip_and_readable_regime() -> None:
    for spec in pinned_iqa_cases(CI):
        assert IQACase.from_json(spec.to_json()) == spec
        assert spec.kind.value in spec.regime()


@pytest.mark.parametrize("spec", pinned_iqa_cases(CI), ids=lambda s: s.regime())
def test_build_hits_its_regime(spec: IQACase) -> None:
    b = built_inputs(spec, torch.float32)
    assert b.x.shape == (spec.B, spec.N, spec.Din) and b.w_q.shape == (spec.E_eff, spec.Dk)
    bound = float(lipschitz_bound(b.x, b.w_q, b.w_k, b.w_v, spec.scale).max())
    if spec.N > 1:  # with one token V_c = 0: f is constant, the bound is 0 whatever the weights
        assert bound == pytest.approx(b.target, rel=2e-2)  # rescaled, then rounded through float32
    # the target is only halved when no non-contractive draw converged; it stays in its regime
    assert b.target == spec.target or (spec.kind is Regime.NON_CONTRACTIVE and 1 < b.target < spec.target)
    start = FixedPointIteration(max_iter=1000, tol=1e-12).solve(
        lambda y: iqa_map_ref(y, b.x, b.w_q, b.w_k, b.w_v, scale=spec.scale), b.x @ b.w_v if b.w_v is not None else b.x)
    sol = iqa_solve_ref(b.x, b.w_q, b.w_k, b.w_v, scale=spec.scale, y0=start.y)  # the branch reached from V
    assert sol.converged
    gap = float((sol.y - consensus_fixed_point(b.x, b.w_v)).abs().max())
    if spec.kind is Regime.CONTRACTIVE:
        assert gap < 1e-10
    else:
        assert b.converged and b.nontrivial and gap > 1e-2  # the pinned non-contractive cases are non-trivial


# ---------------------------------------------------------------- the reference the family judges with


@pytest.mark.parametrize(
    "spec",
    [IQACase(B=1, N=3, Din=2, Dk=1, E=2, target=0.9, seed=11),
     IQACase(B=1, N=2, Din=2, Dk=2, E=1, value_projection=False, target=0.6, seed=12),
     IQACase(B=1, N=3, Din=2, Dk=2, E=2, kind=Regime.NON_CONTRACTIVE, target=12.0, seed=4)],
    ids=["contractive", "contractive-V=x", "non-contractive"],
)
def test_reference_gradient_three_ways(spec: IQACase) -> None:
    """Implicit adjoint, backprop through plain iteration run to convergence, and finite differences agree."""
    b = built_inputs(spec, F64)
    args = (b.x, b.w_q, b.w_k, b.w_v)
    g = torch.randn(spec.B, spec.N, spec.E_eff, dtype=F64, generator=torch.Generator().manual_seed(3))
    # the fixed point plain iteration from V reaches (the branch unrolled backprop differentiates), refined
    start = FixedPointIteration(max_iter=1000, tol=1e-12).solve(
        lambda y: iqa_map_ref(y, *args, scale=spec.scale), b.x @ b.w_v if b.w_v is not None else b.x)
    sol = iqa_solve_ref(*args, scale=spec.scale, y0=start.y)
    assert sol.converged
    implicit = [t for t in iqa_implicit_grad_ref(sol.y, *args, spec.scale, g) if t is not None]
    unrolled = [t for t in iqa_unrolled_grad_ref(*args, spec.scale, g, 400) if t is not None]
    fd = [t for t in iqa_finite_difference_grad_ref(*args, spec.scale, g, y_star=sol.y) if t is not None]
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    tol = tolerance(Kind.GRAD, F64)
    for name, other in (("unrolled", unrolled), ("finite differences", fd)):
        c = compare(f"grad/all implicit vs {name}", flat(implicit), flat(other), tol, dtype=F64)
        assert c.passed, c.describe()
    assert float(flat(implicit).abs().max()) > 1e-2


@pytest.mark.parametrize("spec", pinned_iqa_cases(CI)[2:], ids=lambda s: s.regime())
def test_unrolled_gap_shrinks_geometrically_at_the_contraction_rate(spec: IQACase) -> None:
    """‖g_unrolled(k) - g_implicit‖ ~ poly(k) rho^k with rho the spectral radius of ∂f/∂y at the fixed point:
    the measured per-step rate between two depths past the transient lies within [0.8 rho, rho + 0.1]."""
    b = built_inputs(spec, F64)
    g = torch.randn(spec.B, spec.N, spec.E_eff, dtype=F64, generator=torch.Generator().manual_seed(0))
    depths = list(range(5, 65, 5))
    r = gradient_gap_vs_unroll_depth(b.x, b.w_q, b.w_k, b.w_v, spec.scale, g, depths)
    gaps, rho = r["gaps"], r["rho"]
    assert rho < 1
    # past the transient (depth >= 20 where the gap is still above the float64 floor)
    kept = [(k, gap) for k, gap in zip(depths, gaps) if gap > 1e3 * ACCEPT_TOL and (k >= 20 or gaps[-1] <= 1e3 * ACCEPT_TOL)]
    assert len(kept) >= 2, (gaps, rho)
    (k0, g0), (k1, g1) = kept[0], kept[-1]
    rate = (g1 / g0) ** (1 / (k1 - k0))
    assert 0.8 * rho <= rate <= rho + 0.1, (gaps, rho, rate)


def test_saved_bytes_implicit_flat_unrolled_linear() -> None:
    spec = pinned_iqa_cases(CI)[3]  # non-contractive, rate ~0.84: 40 float32 steps still move the iterate
    b = built_inputs(spec, torch.float32)
    saved = saved_bytes_vs_iterations(b.x.float(), b.w_q.float(), b.w_k.float(), b.w_v.float(), spec.scale,
                                      [10, 40], {"unrolled": Unrolled(), "implicit": family("iqa") and _implicit()})
    assert saved["implicit"][0] == saved["implicit"][1]
    assert saved["unrolled"][1] > 3 * saved["unrolled"][0] > 3 * saved["implicit"][0]


def _implicit():
    from iqa_verify.iqa.backward import Implicit

    return Implicit()
