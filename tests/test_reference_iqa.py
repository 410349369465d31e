"""Float64 references and sympy facts of implicit query attention (reference/iqa.py, reference/iqa_sympy.py).

Gradients are cross-checked three ways (implicit adjoint, unrolled to convergence, finite differences),
the consensus fixed point and the contraction bound are checked against solves and dense Jacobians,
and the float64 implicit gradient is checked against a 50-digit mpmath oracle.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch

from iqa_verify.comparison import compare
from iqa_verify.iqa import Anderson, FixedPointIteration, Outcome, iqa_forward
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.iqa import (
    REF_TOL,
    consensus_fixed_point,
    iqa_finite_difference_grad_ref,
    iqa_forward_ref,
    iqa_implicit_grad_ref,
    iqa_jacobian_y_ref,
    iqa_map_ref,
    iqa_solve_ref,
    iqa_unrolled_grad_ref,
    lipschitz_bound,
)
from iqa_verify.reference.iqa_sympy import (
    symbolic_matrix,
    iqa_symbolic_map,
    prove_consensus,
    prove_softmax_jacobian,
    two_token_oracle,
)

F64 = torch.float64
REF = tolerance(Kind.REFERENCE, F64)
GRAD64 = tolerance(Kind.GRAD, F64)



def make_case(seed: int, *, N=3, Din=2, Dk=2, E=2, qk_scale=1.0, value_projection=True):
    """(x, w_q, w_k, w_v) float64 from a seeded generator; w_q and w_k multiplied by ``qk_scale``."""
    gen = torch.Generator().manual_seed(seed)
    E = E if value_projection else Din
    x = torch.randn(1, N, Din, dtype=F64, generator=gen)
    w_q = qk_scale * torch.randn(E, Dk, dtype=F64, generator=gen)
    w_k = qk_scale * torch.randn(Din, Dk, dtype=F64, generator=gen)
    w_v = torch.randn(Din, E, dtype=F64, generator=gen) if value_projection else None
    return x, w_q, w_k, w_v


def contractive(case, scale=None, target=0.5):
    """Rescale w_q so that the Lipschitz bound of f equals ``target`` (< 1: unique fixed point)."""
    x, w_q, w_k, w_v = case
    return x, w_q * (target / lipschitz_bound(x, w_q, w_k, w_v, scale)), w_k, w_v


def cotangent(shape, seed=101):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads if g is not None])


def assert_passes(check):
    assert check.passed, check.describe()


# Seed 7 with |w_q|, |w_k| scaled by 2.5: f is not a contraction (bound ~2.6), plain iteration from V
# converges to an attracting non-trivial fixed point (rate ~0.3), where all four gradients are non-zero.
NONTRIVIAL = dict(seed=7, qk_scale=2.5)
# Seed 0 with scale 2.5: plain iteration from V does not converge (the fixed point Anderson finds repels it).
REPELLING = dict(seed=0, qk_scale=2.5)


# ---------------------------------------------------------------- map, Jacobian, contraction bound


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_jacobian_closed_form_matches_autograd(value_projection):
    x, w_q, w_k, w_v = make_case(3, N=4, Din=3, Dk=2, E=3, qk_scale=1.5, value_projection=value_projection)
    x = torch.cat([x, 0.5 * x.flip(1)])  # B = 2
    y = cotangent((2, 4, 3), seed=5)
    jac = iqa_jacobian_y_ref(y, x, w_q, w_k, w_v, scale=0.7)
    auto = torch.stack([
        torch.autograd.functional.jacobian(lambda yb: iqa_map_ref(yb[None], x[b : b + 1], w_q, w_k, w_v, scale=0.7)[0], y[b])
        .reshape(12, 12)
        for b in range(2)
    ])
    assert_passes(compare("jacobian/dfdy", jac, auto, REF, dtype=F64))


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_lipschitz_bound_dominates_measured_contraction(value_projection):
    scale = None if value_projection else 1.0
    for seed in range(4):
        for qk in (0.3, 1.0, 3.0):
            x, w_q, w_k, w_v = make_case(seed, N=4, Din=3, Dk=2, E=3, qk_scale=qk, value_projection=value_projection)
            bound = lipschitz_bound(x, w_q, w_k, w_v, scale)
            points = [cotangent(x.shape[:2] + (w_q.shape[0],), seed=s) * 3 for s in range(3)]
            points.append(consensus_fixed_point(x, w_v))
            for y in points:
                measured = torch.linalg.matrix_norm(iqa_jacobian_y_ref(y, x, w_q, w_k, w_v, scale=scale), ord=2)
                assert bool((measured <= bound * (1 + REF.rtol)).all()), (seed, qk, measured, bound)


def test_lipschitz_bound_is_tight_for_two_symmetric_tokens_and_homogeneous():
    # k = (1, -1), v = (2, 0): at consensus J = 0.5 [[0.9, -0.9], [-0.9, 0.9]], norm 0.9 = the bound.
    x = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]], dtype=F64)
    w_k, w_v, w_q = torch.tensor([[1.0], [0.0]], dtype=F64), torch.tensor([[1.0], [1.0]], dtype=F64), torch.tensor([[0.9]], dtype=F64)
    bound = lipschitz_bound(x, w_q, w_k, w_v)
    measured = torch.linalg.matrix_norm(iqa_jacobian_y_ref(consensus_fixed_point(x, w_v), x, w_q, w_k, w_v), ord=2)
    assert_passes(compare("lipschitz/tight", bound, measured, REF, dtype=F64))
    assert_passes(compare("lipschitz/homogeneous", lipschitz_bound(x, 3 * w_q, 2 * w_k, w_v), 6 * bound, REF, dtype=F64))


# ---------------------------------------------------------------- solves and the consensus fixed point


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_consensus_is_the_fixed_point_in_the_contractive_regime(value_projection):
    scale = None if value_projection else 1.0
    for seed in range(3):
        case = contractive(make_case(seed, N=5, Din=3, Dk=4, E=2, value_projection=value_projection), scale, target=0.9)
        sol = iqa_solve_ref(*case, scale=scale)
        assert sol.converged and float(sol.residual.max()) <= REF_TOL
        assert_passes(compare("y/consensus", sol.y, consensus_fixed_point(case[0], case[3]), REF, dtype=F64))


def test_solve_reports_non_convergence():
    case = make_case(**NONTRIVIAL)
    sol = iqa_solve_ref(*case, max_iter=0)
    assert not sol.converged and sol.iterations == 0 and bool(sol.residual.max() > REF_TOL)


def test_non_contractive_reference_refines_a_kernel_output_to_a_non_trivial_fixed_point():
    x, w_q, w_k, w_v = make_case(**REPELLING)
    # plain iteration from V does not converge here; Anderson (the kernel, float32) does
    with torch.no_grad():
        plain = FixedPointIteration(max_iter=500).solve(lambda y: iqa_map_ref(y, x, w_q, w_k, w_v), x @ w_v)
    assert plain.outcome is Outcome.MAX_ITER
    y32 = iqa_forward(*(t.float() for t in (x, w_q, w_k, w_v)), solver=Anderson())
    sol = iqa_solve_ref(x, w_q, w_k, w_v, y0=y32)
    assert sol.converged and float(sol.residual.max()) <= REF_TOL
    distance = float((sol.y - consensus_fixed_point(x, w_v)).abs().max())
    assert distance > 0.5, "expected a non-trivial fixed point"
    assert_passes(compare("y", y32, sol.y, tolerance(Kind.VALUE, torch.float32), dtype=torch.float32))
    grads = iqa_implicit_grad_ref(sol.y, x, w_q, w_k, w_v, None, cotangent(sol.y.shape))
    assert float(grads.w_q.abs().max()) > 1e-3 and float(grads.w_k.abs().max()) > 1e-3


# ---------------------------------------------------------------- gradients three ways


def test_three_way_gradients_at_a_non_trivial_fixed_point():
    x, w_q, w_k, w_v = make_case(**NONTRIVIAL)
    sol = iqa_solve_ref(x, w_q, w_k, w_v)
    assert sol.converged and float((sol.y - consensus_fixed_point(x, w_v)).abs().max()) > 0.5
    g = cotangent(sol.y.shape)
    implicit = iqa_implicit_grad_ref(sol.y, x, w_q, w_k, w_v, None, g)
    unrolled = iqa_unrolled_grad_ref(x, w_q, w_k, w_v, None, g, iterations=150)
    fd = iqa_finite_difference_grad_ref(x, w_q, w_k, w_v, None, g, y_star=sol.y)
    for name, a, b, c in zip(("x", "w_q", "w_k", "w_v"), implicit, unrolled, fd):
        assert float(a.abs().max()) > 1e-2
        assert_passes(compare(f"grad/d{name} implicit~unrolled", a, b, REF, dtype=F64))
        assert_passes(compare(f"grad/d{name} implicit~finite-diff", a, c, GRAD64, dtype=F64))


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_three_way_gradients_in_the_contractive_regime_and_zero_qk_gradients(value_projection):
    scale = None if value_projection else 1.0
    x, w_q, w_k, w_v = contractive(make_case(2, value_projection=value_projection), scale, target=0.8)
    sol = iqa_solve_ref(x, w_q, w_k, w_v, scale=scale)
    g = cotangent(sol.y.shape)
    implicit = iqa_implicit_grad_ref(sol.y, x, w_q, w_k, w_v, scale, g)
    unrolled = iqa_unrolled_grad_ref(x, w_q, w_k, w_v, scale, g, iterations=300)
    fd = iqa_finite_difference_grad_ref(x, w_q, w_k, w_v, scale, g, y_star=sol.y)
    # one tensor per comparison so that the zero w_q/w_k gradients are judged on the gradient's scale
    assert_passes(compare("grad/all implicit~unrolled", flat(implicit), flat(unrolled), REF, dtype=F64))
    assert_passes(compare("grad/all implicit~finite-diff", flat(implicit), flat(fd), GRAD64, dtype=F64))
    zeroed = flat((implicit.x, torch.zeros_like(implicit.w_q), torch.zeros_like(implicit.w_k), implicit.w_v))
    assert_passes(compare("grad/all dw_q=dw_k=0", flat(implicit), zeroed, REF, dtype=F64))
    assert float(implicit.x.abs().max()) > 1e-2


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_forward_ref_autograd_is_the_implicit_gradient(value_projection):
    scale = None if value_projection else 1.0
    case = contractive(make_case(4, value_projection=value_projection), scale, target=0.7)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in case]
    y = iqa_forward_ref(*leaves, scale=scale)
    g = cotangent(y.shape)
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], g)
    want = iqa_unrolled_grad_ref(*case, scale, g, iterations=300)
    assert y.dtype == F64
    assert_passes(compare("grad/all forward_ref~unrolled", flat(got), flat(want), REF, dtype=F64))


# ---------------------------------------------------------------- sympy facts and the mpmath oracle


def test_sympy_softmax_jacobian():
    assert prove_softmax_jacobian(3)


@pytest.mark.parametrize(
    "sizes", [dict(N=3, Din=2, Dk=2, E=2), dict(N=2, Din=2, Dk=1, value_projection=False)], ids=["V=xWv", "V=x"]
)
def test_sympy_consensus_is_a_fixed_point_with_zero_qk_gradients(sizes):
    proof = prove_consensus(**sizes)
    assert proof.fixed_point and proof.grad_w_q_zero and proof.grad_w_k_zero and proof.holds


def test_sympy_checker_can_fail():
    """Negative control: 1 v_1^T (the first value row) is not a fixed point at a generic point."""
    x, wq, wk, wv = symbolic_matrix("x", 2, 1), symbolic_matrix("wq", 1, 1), symbolic_matrix("wk", 1, 1), symbolic_matrix("wv", 1, 1)
    V = x * wv
    y = sp.ones(2, 1) * V[0, :]
    diff = iqa_symbolic_map(y, x, wq, wk, wv, 1) - y
    point = {x[0]: 1.0, x[1]: -0.5, wq[0]: 0.7, wk[0]: 1.1, wv[0]: 0.9}
    assert abs(float(diff[1].subs(point))) > 0.1


@pytest.mark.parametrize(
    "w_v, start",
    [(1.0, "V"), (1.0, "consensus"), (None, "V")],
    ids=["V=xWv/non-trivial", "V=xWv/consensus", "V=x/non-trivial"],
)
def test_mpmath_oracle_matches_float64_implicit_gradient(w_v, start):
    # slope of the 1-d map at consensus: s w_q w_k w_v (x1 - x2)^2 / 4 = 1.5 > 1, so non-trivial points exist
    xs, w_q, w_k, scale, g = (1.2, -0.8), 1.5, 1.0, 1.0, (0.7, -1.3)
    mean = sum(xs) / 2 * (w_v if w_v is not None else 1.0)
    y0 = (xs[0] * (w_v or 1.0), xs[1] * (w_v or 1.0)) if start == "V" else (mean, mean)
    oracle = two_token_oracle(xs, w_q, w_k, w_v, scale, g, y0)
    assert oracle.residual < 1e-40
    t = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    x = torch.tensor(xs, dtype=F64).reshape(1, 2, 1)
    wv_t = t(w_v) if w_v is not None else None
    sol = iqa_solve_ref(x, t(w_q), t(w_k), wv_t, scale=scale, y0=torch.tensor(y0, dtype=F64).reshape(1, 2, 1))
    assert sol.converged
    assert_passes(compare("y/oracle", sol.y, oracle.y, REF, dtype=F64))
    grads = iqa_implicit_grad_ref(sol.y, x, t(w_q), t(w_k), wv_t, scale, torch.tensor(g, dtype=F64).reshape(1, 2, 1))
    want = (oracle.grad_x, oracle.grad_w_q, oracle.grad_w_k, oracle.grad_w_v)
    assert_passes(compare("grad/all oracle", flat(grads), flat(want), REF, dtype=F64))
    if start == "consensus":
        assert float(oracle.grad_w_q.abs().max()) < 1e-40 and float(oracle.grad_w_k.abs().max()) < 1e-40
    else:
        assert abs(float(oracle.y[0, 0, 0] - oracle.y[0, 1, 0])) > 0.5  # non-trivial
