"""Fixed-point solvers (iqa_verify/iqa/solvers.py): speed, outcomes, statistics, dtypes, genericity."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.iqa import Anderson, Broyden, ConvergenceError, FixedPointIteration, Outcome
from iqa_verify.iqa.solvers import default_tol
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.iqa import consensus_fixed_point, iqa_jacobian_y_ref, iqa_map_ref, lipschitz_bound

F64 = torch.float64
SOLVERS = [FixedPointIteration(), Anderson(), Broyden()]
IDS = ["fixed-point", "anderson", "broyden"]



def assert_passes(check):
    assert check.passed, check.describe()


def rate_09_problem():
    """Two tokens with k = (1, -1), v = (2, 0), w_q = 0.9: the Lipschitz bound and the spectral radius of
    ∂f/∂y at the (unique) fixed point y* = 1 mean(v)^T are both 0.9."""
    x = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]], dtype=F64)
    w_k, w_v, w_q = torch.tensor([[1.0], [0.0]], dtype=F64), torch.tensor([[1.0], [1.0]], dtype=F64), torch.tensor([[0.9]], dtype=F64)
    return x, w_q, w_k, w_v


def test_anderson_and_broyden_beat_plain_iteration_at_contraction_09():
    x, w_q, w_k, w_v = rate_09_problem()
    y_star = consensus_fixed_point(x, w_v)
    rho = torch.linalg.eigvals(iqa_jacobian_y_ref(y_star, x, w_q, w_k, w_v)).abs().max()
    assert abs(float(rho) - 0.9) < 1e-12 and abs(float(lipschitz_bound(x, w_q, w_k, w_v)) - 0.9) < 1e-12

    def fn(y):
        return iqa_map_ref(y, x, w_q, w_k, w_v)

    sols = {type(s).__name__: s.solve(fn, x @ w_v) for s in (FixedPointIteration(max_iter=1000), Anderson(), Broyden())}
    for name, sol in sols.items():
        assert sol.outcome is Outcome.CONVERGED, (name, sol.describe())
        assert_passes(compare(f"y/{name}", sol.y, y_star, tolerance(Kind.VALUE, F64), dtype=F64))
    plain = sols["FixedPointIteration"].iterations
    assert plain > 150  # ~ log(1e-12) / log(0.9)
    assert 3 * sols["Anderson"].iterations < plain and 3 * sols["Broyden"].iterations < plain


def test_damping_tames_an_oscillating_map():
    c = torch.ones(2, 3, dtype=F64)

    def fn(y):
        return -0.95 * y + c  # plain iteration oscillates with rate 0.95; damping 0.5 gives rate 0.025

    plain, damped = FixedPointIteration(max_iter=2000).solve(fn, c), FixedPointIteration(damping=0.5).solve(fn, c)
    assert plain.outcome is Outcome.CONVERGED and damped.outcome is Outcome.CONVERGED
    assert damped.iterations * 10 < plain.iterations
    assert_passes(compare("y", damped.y, c / 1.95, tolerance(Kind.VALUE, F64), dtype=F64))


@pytest.mark.parametrize("solver", [FixedPointIteration(max_iter=4), Anderson(max_iter=4), Broyden(max_iter=4)], ids=IDS)
def test_max_iter_is_reported_with_its_message(solver):
    x, w_q, w_k, w_v = rate_09_problem()
    sol = solver.solve(lambda y: iqa_map_ref(y, x, w_q, w_k, w_v), x @ w_v)
    assert sol.outcome is Outcome.MAX_ITER and "raise max_iter" in sol.outcome.message
    assert sol.iterations == 4 and len(sol.residual_trace) == 5 and sol.residual_history.shape == (5, 1)
    assert not bool(sol.converged.any()) and bool(torch.isfinite(sol.y).all())
    with pytest.raises(ConvergenceError, match="maximum steps reached"):
        sol.raise_if_failed()


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_divergence_is_reported_and_the_best_finite_iterate_kept(solver):
    y0 = torch.ones(1, 4, dtype=F64)

    def expanding(y):
        return 3.0 * y + 1.0

    sol = solver.solve(expanding, y0)
    assert sol.outcome in (Outcome.DIVERGED, Outcome.CONVERGED)  # Broyden/Anderson may solve a linear map
    if sol.outcome is Outcome.DIVERGED:
        assert "diverged" in sol.outcome.message
    assert bool(torch.isfinite(sol.y).all())

    calls = {"n": 0}

    def poisoned(y):
        calls["n"] += 1
        return y * 0.5 if calls["n"] < 3 else torch.full_like(y, float("nan"))

    sol = solver.solve(poisoned, y0)
    assert sol.outcome is Outcome.DIVERGED
    assert bool(torch.isfinite(sol.y).all()) and bool(torch.isfinite(sol.residual).all())


def test_residual_trace_formula_for_plain_iteration():
    A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=F64)
    b = torch.tensor([1.0, -2.0], dtype=F64)
    y0 = torch.tensor([[3.0, 1.0], [0.0, 0.5]], dtype=F64)  # B = 2

    def fn(y):
        return y @ A.T + b

    sol = FixedPointIteration(max_iter=6).solve(fn, y0)
    ys = [y0]
    for _ in range(6):
        ys.append(fn(ys[-1]))
    n0 = y0.norm(dim=1)
    want = torch.stack([(ys[t + 1] - ys[t]).norm(dim=1) / torch.maximum(ys[t].norm(dim=1), n0) for t in range(7 - 1)])
    ref = tolerance(Kind.REFERENCE, F64)
    assert_passes(compare("residual_history", sol.residual_history[:6], want, ref, dtype=F64))
    assert_passes(compare("residual_trace", torch.tensor(sol.residual_trace[:6], dtype=F64), want.max(dim=1).values, ref, dtype=F64))


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_batch_elements_converge_independently(solver):
    rates = torch.tensor([[0.1], [0.8]], dtype=F64)
    c = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64)

    def fn(y):
        return rates * y.flip(-1) + c

    sol = solver.solve(fn, torch.zeros(2, 2, dtype=F64))
    assert sol.outcome is Outcome.CONVERGED and bool(sol.converged.all())
    assert bool((sol.residual <= default_tol(F64)).all())
    assert_passes(compare("y", fn(sol.y), sol.y, tolerance(Kind.VALUE, F64), dtype=F64))


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_generic_adjoint_style_linear_solve(solver):
    """u = g + M^T u (what the implicit backward solves) equals (I - M^T)^{-1} g."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, dtype=F64, generator=gen)
    M = 0.9 * M / torch.linalg.matrix_norm(M, ord=2)
    g = torch.randn(3, 6, dtype=F64, generator=gen)
    sol = type(solver)(max_iter=1000, tol=1e-14).solve(lambda u: g + u @ M, g)
    want = torch.linalg.solve(torch.eye(6, dtype=F64) - M.T, g.T).T
    assert sol.outcome is Outcome.CONVERGED
    assert_passes(compare("u", sol.y, want, tolerance(Kind.VALUE, F64), dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_low_precision_inputs_keep_a_float32_state(dtype, solver):
    c = torch.tensor([[1.0, -2.0, 0.5]], dtype=dtype)
    seen = []

    def fn(y):
        seen.append(y.dtype)
        return 0.5 * y + c

    sol = solver.solve(fn, torch.zeros_like(c))
    assert sol.y.dtype == dtype and set(seen) == {dtype}
    assert sol.residual.dtype == torch.float32 and sol.outcome is Outcome.CONVERGED
    assert_passes(compare("y", sol.y, 2 * c.double(), tolerance(Kind.VALUE, dtype), dtype=dtype))


def test_unrolled_solve_is_differentiable():
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    sol = FixedPointIteration(max_iter=200).solve(lambda y: a * y + 1.0, torch.zeros(1, 1, dtype=F64))
    (grad,) = torch.autograd.grad(sol.y.sum(), a)  # y* = 1 / (1 - a): dy*/da = 1 / (1 - a)^2 = 4
    assert_passes(compare("dy/da", grad, torch.tensor(4.0, dtype=F64), tolerance(Kind.GRAD, F64), dtype=F64))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FixedPointIteration(max_iter=-1), "max_iter=-1"),
        (lambda: FixedPointIteration(damping=0.0), "damping=0.0"),
        (lambda: Anderson(damping=1.5), "damping=1.5"),
        (lambda: Anderson(memory=0), "memory=0"),
        (lambda: Anderson(regularization=-1.0), "regularization=-1.0"),
        (lambda: Broyden(memory=0), "memory=0"),
        (lambda: Broyden(tol=0.0), "tol=0.0"),
    ],
    ids=["max_iter<0", "damping=0", "damping>1", "anderson-memory=0", "regularization<0", "broyden-memory=0", "tol=0"],
)
def test_invalid_solver_settings(make, message):
    with pytest.raises(IqaVerifyError, match=message):
        make()


def test_a_solver_is_init_step_terminate_over_a_typed_state() -> None:
    """The one loop, driven by hand: each step is observable and the state says why it stops."""
    from iqa_verify.iqa.solvers import SolverState

    a = torch.tensor([[0.5]], dtype=torch.float64)
    fn = lambda y: a * y + 1.0  # noqa: E731 - fixed point 2
    solver = FixedPointIteration(max_iter=100, tol=1e-10)
    state = solver.init(fn, torch.zeros(1, 1, dtype=torch.float64), 1e-10)
    assert isinstance(state, SolverState) and state.iterations == 0 and len(state.history) == 1
    state = solver.step(fn, state)
    assert state.iterations == 1 and float(state.y) == 1.0 and float(state.history[-1]) == 0.5
    while not solver.terminate(state):
        state = solver.step(fn, state)
    assert bool(state.converged.all()) and abs(float(state.best_y) - 2.0) < 1e-9
    assert solver.solve(fn, torch.zeros(1, 1, dtype=torch.float64)).iterations == state.iterations
