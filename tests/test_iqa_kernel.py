"""The built-in IQA kernel (iqa_verify/iqa/kernel.py) and its backward modes against the float64 references."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.iqa import (
    Anderson,
    Broyden,
    ConvergenceError,
    FixedPointIteration,
    Implicit,
    ImplicitQueryAttention,
    OneStep,
    Outcome,
    Truncated,
    Unrolled,
    iqa_forward,
    iqa_forward_anderson_implicit,
    iqa_forward_broyden_implicit,
    iqa_forward_fixed_point_implicit,
    iqa_forward_fixed_point_unrolled,
    iqa_forward_with_stats,
)
from iqa_verify.iqa.solvers import default_tol
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.iqa import consensus_fixed_point, iqa_implicit_grad_ref, iqa_solve_ref, lipschitz_bound

F64 = torch.float64
GROUPS = ("x", "w_q", "w_k", "w_v")
VARIANTS = [iqa_forward_anderson_implicit, iqa_forward_broyden_implicit, iqa_forward_fixed_point_implicit, iqa_forward_fixed_point_unrolled]
VARIANT_IDS = ["anderson-implicit", "broyden-implicit", "fixed-point-implicit", "fixed-point-unrolled"]



def make_case(seed, *, B=2, N=4, Din=3, Dk=2, E=3, qk_scale=1.0, value_projection=True):
    gen = torch.Generator().manual_seed(seed)
    E = E if value_projection else Din
    x = torch.randn(B, N, Din, dtype=F64, generator=gen)
    w_q = qk_scale * torch.randn(E, Dk, dtype=F64, generator=gen)
    w_k = qk_scale * torch.randn(Din, Dk, dtype=F64, generator=gen)
    w_v = torch.randn(Din, E, dtype=F64, generator=gen) if value_projection else None
    return x, w_q, w_k, w_v


# Seed 7, one batch element, |w_q|, |w_k| x 2.5: an attracting non-trivial fixed point (all gradients non-zero).
def nontrivial_case():
    return make_case(7, B=1, N=3, Din=2, Dk=2, E=2, qk_scale=2.5)


def contractive_case(value_projection=True, scale=None, target=0.6):
    x, w_q, w_k, w_v = make_case(11, value_projection=value_projection)
    return x, w_q * (target / lipschitz_bound(x, w_q, w_k, w_v, scale).max()), w_k, w_v


def cotangent(shape, seed=123):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def kernel_grads(kernel, case, dtype, g, **kw):
    leaves = [t.to(dtype).clone().requires_grad_(True) if t is not None else None for t in case]
    y = kernel(*leaves, **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], g.to(dtype))
    return y, dict(zip([n for n, t in zip(GROUPS, case) if t is not None], grads))


def reference_at(y_kernel, case, g, scale=None):
    """Refine the kernel's output to the float64 fixed point near it and take the exact implicit gradient."""
    sol = iqa_solve_ref(*case, scale=scale, y0=y_kernel.detach())
    assert sol.converged
    grads = iqa_implicit_grad_ref(sol.y, *case, scale, g)
    return sol.y, {n: gr for n, gr in zip(GROUPS, grads) if gr is not None}


def assert_passes(check):
    assert check.passed, check.describe()


# ---------------------------------------------------------------- values and gradients vs the reference


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kernel", VARIANTS, ids=VARIANT_IDS)
def test_gradients_match_the_reference_implicit_gradient(kernel, dtype):
    case = nontrivial_case()
    g = cotangent((1, 3, 2))
    y, got = kernel_grads(kernel, case, dtype, g)
    assert y.dtype == dtype and y.shape == (1, 3, 2)
    y_ref, want = reference_at(y, case, g)
    assert float((y_ref - consensus_fixed_point(case[0], case[3])).abs().max()) > 0.5
    assert_passes(compare("out/y", y, y_ref, tolerance(Kind.VALUE, dtype), dtype=dtype))
    for name in GROUPS:
        assert float(want[name].abs().max()) > 1e-2
        assert_passes(compare(f"grad/d{name}", got[name], want[name], tolerance(Kind.GRAD, dtype), dtype=dtype))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_contractive_kernel_lands_on_consensus_with_zero_qk_gradients(value_projection, dtype):
    scale = None if value_projection else 1.0
    case = contractive_case(value_projection, scale)
    g = cotangent(case[0].shape[:2] + (case[1].shape[0],))
    y, got = kernel_grads(iqa_forward, case, dtype, g, scale=scale)
    assert_passes(compare("out/y", y, consensus_fixed_point(case[0], case[3]), tolerance(Kind.VALUE, dtype), dtype=dtype))
    _, want = reference_at(y, case, g, scale)
    flat = lambda d: torch.cat([d[n].double().reshape(-1) for n in d])  # noqa: E731
    # one tensor so the (exactly zero) w_q/w_k gradients are judged on the scale of the others
    assert_passes(compare("grad/all", flat(got), flat(want), tolerance(Kind.GRAD, dtype), dtype=dtype))
    zeroed = dict(want, w_q=torch.zeros_like(want["w_q"]), w_k=torch.zeros_like(want["w_k"]))
    assert_passes(compare("grad/all dw_q=dw_k=0", flat(got), flat(zeroed), tolerance(Kind.GRAD, dtype), dtype=dtype))


def test_bf16_inputs_compute_in_float32_and_return_bf16():
    case = contractive_case()
    xb = [t.to(torch.bfloat16) for t in case]
    y, stats = iqa_forward_with_stats(*xb)
    assert y.dtype == torch.bfloat16 and stats.forward.residual.dtype == torch.float32
    ref = iqa_solve_ref(*(t.double() for t in xb)).y
    assert_passes(compare("out/y", y, ref, tolerance(Kind.VALUE, torch.bfloat16), dtype=torch.bfloat16))


# ---------------------------------------------------------------- backward modes


def test_backward_modes_exactness_flags_and_truncation_converges():
    assert Implicit.exact and Unrolled.exact and not Truncated.exact and not OneStep.exact
    case = nontrivial_case()
    g = cotangent((1, 3, 2))
    y, _ = kernel_grads(iqa_forward, case, F64, g)
    _, want = reference_at(y, case, g)
    errors = []
    for k in (1, 3, 10, 40):
        _, got = kernel_grads(iqa_forward, case, F64, g, backward=Truncated(k))
        errors.append(max(float((got[n] - want[n]).abs().max()) for n in GROUPS))
    assert errors[0] > 1e-2 and all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12


def test_seed000_bugs_detached_output_and_one_step_gradient_are_caught():
    """Seed 000 returns a detached y (no gradient at all) and computes the gradient of one application
    of f at the fixed point. Both differ measurably from the exact implicit gradient."""
    case = nontrivial_case()
    g = cotangent((1, 3, 2))

    def seed000(x, w_q, w_k, w_v):
        k, v = x @ w_k, x @ w_v
        y = v.clone()
        for _ in range(20):
            y_new = torch.softmax((k @ (y @ w_q).transpose(-1, -2)) / w_k.shape[1] ** 0.5, dim=-1) @ v
            if torch.norm(y_new - y) < 1e-6:
                break
            y = y_new
        return y.detach()

    leaves = [t.clone().requires_grad_(True) for t in case]
    assert not seed000(*leaves).requires_grad  # a downstream loss gets no gradient at all

    y, one_step = kernel_grads(iqa_forward, case, F64, g, backward=OneStep())
    _, want = reference_at(y, case, g)
    checks = [compare(f"grad/d{n}", one_step[n], want[n], tolerance(Kind.GRAD, F64), dtype=F64) for n in GROUPS]
    assert all(not c.passed for c in checks), [c.describe() for c in checks]
    assert min(c.ratio for c in checks) > 1e3  # the gap is far beyond any tolerance


def test_failed_adjoint_solve_raises_instead_of_returning_a_wrong_gradient():
    case = nontrivial_case()
    leaves = [t.clone().requires_grad_(True) for t in case]
    y = iqa_forward(*leaves, backward=Implicit(FixedPointIteration(max_iter=2)))
    with pytest.raises(ConvergenceError, match="adjoint solve"):
        (y * cotangent(y.shape)).sum().backward()


def test_stats_report_forward_and_adjoint_convergence():
    case = nontrivial_case()
    leaves = [t.clone().requires_grad_(True) for t in case]
    y, stats = iqa_forward_with_stats(*leaves)
    sol = stats.forward
    assert sol.outcome is Outcome.CONVERGED and sol.residual_trace[-1] <= default_tol(F64) < sol.residual_trace[0]
    assert len(sol.residual_trace) == sol.iterations + 1 and not stats.backward.adjoint
    (y * cotangent(y.shape)).sum().backward()
    assert len(stats.backward.adjoint) == 1 and stats.backward.adjoint[0].outcome is Outcome.CONVERGED


@pytest.mark.parametrize("backward", [Implicit(), Unrolled(), Truncated(3), OneStep()], ids=str)
def test_no_graph_under_no_grad(backward):
    leaves = [t.clone().requires_grad_(True) for t in nontrivial_case()]
    with torch.no_grad():
        y = iqa_forward(*leaves, backward=backward)
    assert not y.requires_grad
    assert iqa_forward(*leaves, backward=backward).requires_grad


def test_non_convergence_raises_unless_not_strict():
    case = nontrivial_case()
    with pytest.raises(ConvergenceError, match="maximum steps reached"):
        iqa_forward(*case, solver=FixedPointIteration(max_iter=3))
    y, stats = iqa_forward_with_stats(*case, solver=FixedPointIteration(max_iter=3), strict=False)
    assert stats.forward.outcome is Outcome.MAX_ITER and bool(torch.isfinite(y).all())


# ---------------------------------------------------------------- contract


def test_contract_dtype_inputs_unchanged_non_contiguous_and_deterministic():
    x, w_q, w_k, w_v = (t.float() for t in contractive_case())
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view
    w_qt = w_q.t().contiguous().t()
    assert not xt.is_contiguous() and not w_qt.is_contiguous()
    before = [t.clone() for t in (xt, w_qt, w_k, w_v)]
    y1 = iqa_forward(xt, w_qt, w_k, w_v)
    assert y1.dtype == torch.float32 and y1.device == x.device and y1.shape == (2, 4, 3)
    assert torch.equal(y1, iqa_forward(xt, w_qt, w_k, w_v))  # deterministic
    f32 = tolerance(Kind.VALUE, torch.float32)
    assert_passes(compare("out/y contiguous~view", y1, iqa_forward(x, w_q, w_k, w_v), f32, dtype=torch.float32))
    for a, b in zip((xt, w_qt, w_k, w_v), before):
        assert torch.equal(a, b)


def _bad(**changes):
    x, w_q, w_k, w_v = make_case(0, B=1, N=2, Din=3, Dk=2, E=4)
    args = dict(x=x, w_q=w_q, w_k=w_k, w_v=w_v) | changes
    return args


@pytest.mark.parametrize(
    "args, message",
    [
        (_bad(x=torch.zeros(1, 0, 3, dtype=F64)), "N=0: number of tokens must be >= 1"),
        (_bad(x=torch.zeros(0, 2, 3, dtype=F64)), "B=0: batch size must be >= 1"),
        (_bad(x=torch.zeros(2, 3, dtype=F64)), r"x.shape=\(2, 3\): must be \[B, N, Din\]"),
        (_bad(x=torch.zeros(1, 2, 3, dtype=torch.int64)), "x.dtype=torch.int64: must be a floating dtype"),
        (_bad(w_k=torch.zeros(4, 2, dtype=F64)), r"w_k.shape=\(4, 2\): must be \[Din, Dk\]"),
        (_bad(w_k=torch.zeros(3, 0, dtype=F64)), "Dk=0: key dimension must be >= 1"),
        (_bad(w_q=torch.zeros(3, 2, dtype=F64)), r"w_q.shape=\(3, 2\): must be \[E, Dk\]"),
        (_bad(w_v=torch.zeros(2, 4, dtype=F64)), r"w_v.shape=\(2, 4\): must be \[Din, E\]"),
        (_bad(w_v=None), r"w_q.shape=\(4, 2\): must be \[E, Dk\] \(E = Din when w_v is None\)"),
        (_bad(w_q=torch.zeros(4, 2, dtype=torch.float32)), "w_q.dtype=torch.float32: must match"),
        (_bad(solver="anderson"), "solver='anderson': must be a Solver"),
        (_bad(backward="implicit"), "backward='implicit': must be a BackwardMode"),
        (_bad(scale=float("nan")), "scale=nan: must be finite"),
    ],
    ids=["N=0", "B=0", "x-2d", "x-int", "w_k-shape", "Dk=0", "w_q-shape", "w_v-shape", "w_v-None-needs-E=Din",
         "dtype-mismatch", "solver-string", "backward-string", "scale-nan"],
)
def test_invalid_arguments(args, message):
    with pytest.raises(IqaVerifyError, match=message):
        iqa_forward(**args)


# ---------------------------------------------------------------- nn.Module


@pytest.mark.parametrize("value_projection", [True, False], ids=["V=xWv", "V=x"])
def test_module_matches_the_functional_kernel(value_projection):
    torch.manual_seed(0)
    layer = ImplicitQueryAttention(3, key_dim=2, value_projection=value_projection, dtype=F64,
                                   solver=Broyden(), backward=Implicit(Anderson()))
    names = {n for n, _ in layer.named_parameters()}
    assert names == ({"W_K", "Omega_Q", "Omega_V"} if value_projection else {"W_K", "Omega_Q"})
    x = make_case(3)[0]
    y = layer(x)
    want = iqa_forward(x, layer.Omega_Q.detach(), layer.W_K.detach(), None if layer.Omega_V is None else layer.Omega_V.detach())
    assert_passes(compare("out/y", y, want, tolerance(Kind.VALUE, F64), dtype=F64))
    assert layer.last_stats is not None and layer.last_stats.forward.outcome is Outcome.CONVERGED
    y.square().sum().backward()
    for _, p in layer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0
