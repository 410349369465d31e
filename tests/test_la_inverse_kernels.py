"""Built-in inverse kernels (la_solve_v, la_solve_q, la_solve_k) against the dense float64 references."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
from iqa_verify.kernels.la_solve_k import (
    LsqrOutcome,
    LsqrSettings,
    Type2Method,
    la_solve_k,
    la_solve_k_recursion,
    la_solve_k_with_stats,
)
from iqa_verify.kernels.la_solve_k import STOP_TOL_ULPS
from iqa_verify.kernels.la_solve_k_lsqr import LinearAttentionKeyMap
from iqa_verify.kernels.la_solve_q import la_solve_q
from iqa_verify.kernels.la_solve_v import SingularPolicy, la_solve_v, la_solve_v_sequential
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.la_forward import la_forward_ref
from iqa_verify.reference.la_inverse import (
    Unknown,
    la_linear_map,
    la_solve_k_dense_ref,
    la_solve_k_recursion_ref,
    la_solve_q_dense_ref,
    la_solve_v_dense_ref,
)

F64, F32 = torch.float64, torch.float32


def _case(B=2, T=11, H=2, D=3, E=2, *, initial=True, seed=0, decay=0.3, key_shift=1.0, noise=0.0):
    """Float64 inputs; o = forward + noise * N(0, 1) (noise = 0: consistent). k = key_shift * q + N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q = rand(B, T, H, D)
    k = key_shift * q + rand(B, T, H, D)
    v = rand(B, T, H, E)
    g = -decay * torch.rand(B, T, H, generator=gen, dtype=F64)
    S0 = rand(B, H, D, E) if initial else None
    o = la_forward_ref(q, k, v, g, S0, scale=0.7)[0] + noise * rand(B, T, H, E)
    return dict(q=q, k=k, v=v, g=g, S0=S0, o=o, scale=0.7)


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def _args(c, unknown, dtype):
    names = {Unknown.V: ("q", "k"), Unknown.K: ("q", "v"), Unknown.Q: ("k", "v")}[unknown]
    return tuple(_cast(c[n], dtype) for n in (*names, "o", "g", "S0"))


def _baseline(c, unknown, dtype):
    """Same-dtype straightforward computation: the dense pseudo-inverse solve in ``dtype``."""
    m = la_linear_map(unknown, *_args(c, unknown, F64), scale=c["scale"])
    x = torch.linalg.pinv(m.matrix.to(dtype)) @ m.rhs(c["o"]).to(dtype).unsqueeze(-1)
    B, T, H, _ = c["o"].shape
    return x.squeeze(-1).reshape(B, H, T, m.n).transpose(1, 2)


def _check(path, actual, expected, dtype, baseline=None):
    check = compare(path, actual, expected, tolerance(Kind.VALUE, dtype), dtype=dtype, baseline=baseline)
    assert check.passed, check.describe()


# ---------------------------------------------------------------- Type1


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("chunk_size", [1, 4, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("initial", [True, False], ids=["S0", "no-S0"])
def test_la_solve_v_matches_dense(dtype, chunk_size, initial):
    c = _case(T=11, initial=initial)  # 11 is not a multiple of 4 and < 64
    ref = la_solve_v_dense_ref(*_args(c, Unknown.V, F64), scale=c["scale"])
    base = _baseline(c, Unknown.V, dtype) if dtype != F64 else None
    out = la_solve_v(*_args(c, Unknown.V, dtype), scale=c["scale"], chunk_size=chunk_size)
    assert out.dtype == dtype
    _check("v", out, ref, dtype, base)
    seq = la_solve_v_sequential(*_args(c, Unknown.V, dtype), scale=c["scale"])
    _check("v_sequential", seq, ref, dtype, base)


@pytest.mark.parametrize("kernel", [la_solve_v, la_solve_v_sequential], ids=lambda f: f.__name__)
def test_la_solve_v_singular_step_least_squares(kernel):
    c = _case(T=9)
    k = c["k"].clone()
    k[0, 5, 1] = 0.0  # q_5 · k_5 = 0 for batch 0, head 1
    c["k"], c["o"] = k, la_forward_ref(c["q"], k, c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    ref = la_solve_v_dense_ref(*_args(c, Unknown.V, F64), scale=c["scale"])
    out = kernel(*_args(c, Unknown.V, F64), scale=c["scale"])
    assert bool(torch.isfinite(out).all())
    _check("v", out, ref, F64)
    with pytest.raises(IqaVerifyError, match=r"t=5: q_t·k_t = 0 .*batch 0, head 1"):
        kernel(*_args(c, Unknown.V, F64), scale=c["scale"], on_singular=SingularPolicy.RAISE)


@pytest.mark.parametrize("kernel", [la_solve_v, la_solve_v_sequential], ids=lambda f: f.__name__)
def test_la_solve_v_singular_head_with_growth_has_finite_gradients(kernel):
    """Seed-sweep finding (seed 2): a singular head whose discarded substitution overflowed float32
    gave NaN gradients (0 * inf in the backward of the masked-out branch). Values only are checked:
    the pseudo-inverse is not smooth at a singular point (the gradients property skips those too)."""
    from iqa_verify.registry import family

    fam = family("la-solve-v")
    spec = fam.spec_from_json('{"B":2,"T":17,"H":2,"D":1,"E":1,"decay":"none","initial_state":false,'
                              '"layout":"contiguous","magnitude":1,"scale":1.0,"seed":2,"unknown":"v",'
                              '"conditioning":"singular","consistent":true}')
    case = fam.build(spec, torch.float32, torch.device("cpu"))
    q, k, o, g, _ = case.inputs.values()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, o, g)]
    v = kernel(*leaves, scale=1.0)
    grads = torch.autograd.grad(v.sum(), leaves)
    assert bool(torch.isfinite(v).all())
    for name, d in zip(("dq", "dk", "do", "dg"), grads):
        assert bool(torch.isfinite(d).all()), f"{name}: {int((~torch.isfinite(d)).sum())} non-finite"


def test_la_solve_v_gradients_match_dense():
    c = _case(T=7, B=1)
    leaves = [x.clone().requires_grad_() for x in (c["q"], c["k"], c["o"], c["g"], c["S0"])]
    cot = torch.randn(c["v"].shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad(la_solve_v(*leaves, scale=c["scale"], chunk_size=3), leaves, cot)
    ref = torch.autograd.grad(la_solve_v_dense_ref(*leaves, scale=c["scale"]), leaves, cot)
    for name, a, r in zip(("dq", "dk", "do", "dg", "dS0"), grads, ref):
        check = compare(f"grad/{name}", a, r, tolerance(Kind.GRAD, F64), dtype=F64)
        assert check.passed, check.describe()


def test_la_solve_v_low_precision_and_views():
    c = _case(T=10, H=3)
    q, k, o, g, S0 = _args(c, Unknown.V, torch.bfloat16)
    q_view = q.transpose(0, 2).contiguous().transpose(0, 2)  # same values, non-contiguous layout
    assert not q_view.is_contiguous()
    before = [x.clone() for x in (q_view, k, o, g, S0)]
    out = la_solve_v(q_view, k, o, g, S0, scale=c["scale"], chunk_size=4)
    assert out.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(before, (q_view, k, o, g, S0)))
    ref = la_solve_v_dense_ref(q, k, o, g, S0, scale=c["scale"])  # the bf16-rounded inputs, solved in float64
    _check("v", out, ref, torch.bfloat16, _baseline({**c, **dict(q=q.double(), k=k.double(), o=o.double(), g=g.double(), S0=S0.double())}, Unknown.V, F32))


# ---------------------------------------------------------------- Type3


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize(
    "shape, initial",
    [((11, 3, 4), True), ((11, 3, 4), False), ((4, 5, 4), False), ((9, 4, 2), True)],
    ids=["full-rank", "no-S0", "rank-deficient-T<D", "E<D"],
)
def test_la_solve_q_matches_dense(dtype, shape, initial):
    T, D, E = shape
    c = _case(T=T, D=D, E=E, initial=initial)
    ref = la_solve_q_dense_ref(*_args(c, Unknown.Q, F64), scale=c["scale"])
    base = _baseline(c, Unknown.Q, dtype) if dtype != F64 else None
    for chunk_size in (3, 64):
        out = la_solve_q(*_args(c, Unknown.Q, dtype), scale=c["scale"], chunk_size=chunk_size)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        _check("q", out, ref, dtype, base)


def test_la_solve_q_gradients_match_dense():
    c = _case(T=5, D=2, E=3, B=1)
    leaves = [x.clone().requires_grad_() for x in (c["k"], c["v"], c["o"], c["g"], c["S0"])]
    cot = torch.randn(c["q"].shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad(la_solve_q(*leaves, scale=c["scale"], chunk_size=2), leaves, cot)
    ref = torch.autograd.grad(la_solve_q_dense_ref(*leaves, scale=c["scale"]), leaves, cot)
    for name, a, r in zip(("dk", "dv", "do", "dg", "dS0"), grads, ref):
        check = compare(f"grad/{name}", a, r, tolerance(Kind.GRAD, F64), dtype=F64)
        assert check.passed, check.describe()


# ---------------------------------------------------------------- Type2


def test_la_solve_k_adjoint_is_vjp():
    """A^T r of the solver's operator equals the autograd VJP of the forward in k."""
    c = _case(T=10, D=3, E=2)
    op = LinearAttentionKeyMap(c["q"], c["v"], c["g"], c["scale"], 4)
    r = torch.randn(c["o"].shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    k = c["k"].clone().requires_grad_()
    (vjp,) = torch.autograd.grad(la_forward_chunked(c["q"], k, c["v"], c["g"], None, scale=c["scale"])[0], k, r)
    check = compare("A^T r", op.adjoint(r), vjp, tolerance(Kind.REFERENCE, F64), dtype=F64)
    assert check.passed, check.describe()


_K_CASES = {
    "E<D-consistent": ((9, 3, 2), 0.0),
    "E<D-least-squares": ((9, 3, 2), 0.1),
    "E>D-least-squares": ((7, 2, 3), 0.1),
    "E=1": ((6, 4, 1), 0.0),
    "E=D-least-squares": ((9, 3, 3), 0.1),  # LSQR in float32 stalls here (ill-conditioned): DIRECT only
}
_K_PARAMS = [
    pytest.param(method, shape, noise, id=f"{name}-{method.name}")
    for name, (shape, noise) in _K_CASES.items()
    for method in Type2Method
    if not (method is Type2Method.LSQR and name == "E=D-least-squares")
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("method, shape, noise", _K_PARAMS)
def test_la_solve_k_matches_dense(method, dtype, shape, noise):
    T, D, E = shape
    c = _case(T=T, D=D, E=E, noise=noise, key_shift=0.0)
    ref = la_solve_k_dense_ref(*_args(c, Unknown.K, F64), scale=c["scale"])
    base = _baseline(c, Unknown.K, dtype) if dtype != F64 else None
    out, stats = la_solve_k_with_stats(*_args(c, Unknown.K, dtype), scale=c["scale"], chunk_size=4, method=method)
    assert out.dtype == dtype
    assert stats.outcome is LsqrOutcome.CONVERGED, stats
    assert stats.iterations.shape == (2, 2) and bool((stats.iterations >= 1).all())
    if method is Type2Method.LSQR and dtype == F32:
        # float32 LSQR stops at a residual of STOP_TOL_ULPS eps, so its forward error is kappa times that,
        # not an elementwise value tolerance: the family's condition-aware properties judge it
        # (tests/test_builtin_kernels.py); here it must agree to kappa * 8 eps * |k|.
        A = la_linear_map(Unknown.K, *_args(c, Unknown.K, F64), scale=c["scale"]).matrix
        sv = torch.linalg.svdvals(A)
        kappa = float((sv[..., 0] / sv.masked_fill(sv <= 1e-12 * sv[..., :1], float("inf")).min(-1).values).max())
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        assert err <= kappa * STOP_TOL_ULPS * torch.finfo(F32).eps, (err, kappa)
        return
    _check("k", out, ref, dtype, base)


@pytest.mark.parametrize(
    "defect",
    ["q-in-plane", "v-zero-step", "v-in-line"],
)
def test_la_solve_k_rank_deficient_is_minimum_norm(defect):
    """Null spaces beyond the local ones (found by the rank check, pinv fallback) and exact zeros."""
    c = _case(T=10, D=3, E=3, noise=0.1, key_shift=0.0)
    if defect == "q-in-plane":
        c["q"] = c["q"].clone()
        c["q"][0, :, 1, 2] = 0.0  # every q_t of (batch 0, head 1) in a plane: k_j[2] is never seen
    elif defect == "v-zero-step":
        c["v"] = c["v"].clone()
        c["v"][1, 4, 0] = 0.0  # k_4 of (batch 1, head 0) is free
    else:
        c["v"] = c["v"].clone()
        c["v"][0, :, 0] = c["v"][0, :1, 0] * torch.rand(10, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = la_solve_k_dense_ref(*_args(c, Unknown.K, F64), scale=c["scale"])
    out, stats = la_solve_k_with_stats(*_args(c, Unknown.K, F64), scale=c["scale"])
    assert stats.outcome is LsqrOutcome.CONVERGED, stats
    _check("k", out, ref, F64)
    if defect == "q-in-plane":
        # minimum norm: the never-seen component is 0 (to rounding), any value would fit O equally well
        assert float(out[0, :, 1, 2].abs().max()) <= tolerance(Kind.VALUE, F64).atol * float(out.abs().max())


def test_la_solve_k_reports_max_iter():
    c = _case(T=9, D=3, E=2, noise=0.1)
    out, stats = la_solve_k_with_stats(
        *_args(c, Unknown.K, F64), scale=c["scale"], settings=LsqrSettings(max_iter=2), method=Type2Method.LSQR
    )
    assert stats.outcome is LsqrOutcome.MAX_ITER
    assert bool((stats.iterations == 2).all())
    assert bool((stats.normal_residual > 1e-3).any())  # far from the solution after two steps
    assert "raise max_iter" in stats.outcome.value
    with pytest.raises(IqaVerifyError, match=r"method=LSQR: no convergence in 2 iterations .*raise settings.max_iter"):
        la_solve_k(*_args(c, Unknown.K, F64), scale=c["scale"], settings=LsqrSettings(max_iter=2),
                   method=Type2Method.LSQR)


def test_la_solve_k_gradients_finite_and_close_to_dense():
    c = _case(T=6, D=2, E=2, B=1, noise=0.0, key_shift=0.0)
    leaves = [x.clone().requires_grad_() for x in (c["q"], c["v"], c["o"], c["g"], c["S0"])]
    cot = torch.randn(c["k"].shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad(la_solve_k(*leaves, scale=c["scale"], chunk_size=4), leaves, cot)
    ref = torch.autograd.grad(la_solve_k_dense_ref(*leaves, scale=c["scale"]), leaves, cot)
    for name, a, r in zip(("dq", "dv", "do", "dg", "dS0"), grads, ref):
        check = compare(f"grad/{name}", a, r, tolerance(Kind.GRAD, F32), dtype=F64)
        assert check.passed, check.describe()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 4, 2, 2, 5), (2, 6, 1, 3, 2), (1, 5, 1, 1, 3)], ids=str)
def test_la_solve_k_lsqr_implicit_gradients_equal_the_pseudo_inverse_derivative(shape):
    """The matrix-free method's backward (Golub-Pereyra, four LSQR solves) against autograd through the
    dense float64 pinv, rank-deficient maps (D > 1, short T) and least-squares O included; it once
    differentiated through the LSQR iterations (NaN at T = D = E = 1, detached on singular heads)."""
    B, T, H, D, E = shape
    gen = torch.Generator().manual_seed(7)
    q, v = torch.randn(B, T, H, D, generator=gen, dtype=F64), torch.randn(B, T, H, E, generator=gen, dtype=F64)
    g = -0.1 * torch.rand(B, T, H, generator=gen, dtype=F64)
    s0 = torch.randn(B, H, D, E, generator=gen, dtype=F64)
    k0 = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    o = la_forward_ref(q, k0, v, g, s0, scale=0.7)[0] + 0.1 * torch.randn(B, T, H, E, generator=gen, dtype=F64)
    cot = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (q, v, o, g, s0)]
    k = la_solve_k(*leaves, scale=0.7, method=Type2Method.LSQR)
    grads = torch.autograd.grad(k, leaves, cot)
    ref_leaves = [x.clone().requires_grad_() for x in (q, v, o, g, s0)]
    ref = torch.autograd.grad(la_solve_k_dense_ref(*ref_leaves, scale=0.7), ref_leaves, cot)
    for name, a, r in zip(("dq", "dv", "do", "dg", "dS0"), grads, ref):
        check = compare(f"grad/{name}", a, r, tolerance(Kind.GRAD, F64), dtype=F64)
        assert check.passed, check.describe()


def test_la_solve_k_recursion_matches_reference_and_is_exact_for_e1():
    c = _case(T=8, D=3, E=1)
    args = _args(c, Unknown.K, F64)
    k_rec = la_solve_k_recursion(*args, scale=c["scale"])
    ref = la_solve_k_recursion_ref(*args, scale=c["scale"])
    _check("k", k_rec, ref, F64)
    back = la_forward_chunked(c["q"], k_rec, c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    _check("o", back, c["o"], F64)


# ---------------------------------------------------------------- argument validation

_C = _case(T=4)
_BAD = {
    "q-ndim": (la_solve_v, (_C["q"][0], _C["k"], _C["o"], _C["g"]), {}, r"q\.shape=\(4, 2, 3\): must be \[B, T, H, D\]"),
    "k-shape": (la_solve_v, (_C["q"], _C["k"][..., :2], _C["o"], _C["g"]), {}, r"k\.shape=.*must be \[B, T, H, D\]"),
    "o-time": (la_solve_q, (_C["k"], _C["v"], _C["o"][:, :3], _C["g"]), {}, r"o\.shape=.*\[B, T, H, E\]"),
    "g-shape": (la_solve_k, (_C["q"], _C["v"], _C["o"], _C["g"][..., :1]), {}, r"g\.shape=.*\[B, T, H\]"),
    "dtype": (la_solve_k, (_C["q"], _C["v"], _C["o"].float(), _C["g"]), {}, r"o\.dtype=torch\.float32: must match"),
    "state-shape": (la_solve_q, (_C["k"], _C["v"], _C["o"], _C["g"], _C["S0"][..., :1]), {}, r"initial_state\.shape="),
    "chunk-0": (la_solve_v, (_C["q"], _C["k"], _C["o"], _C["g"]), {"chunk_size": 0}, r"chunk_size=0: chunk size must be >= 1"),
    "policy-str": (la_solve_v, (_C["q"], _C["k"], _C["o"], _C["g"]), {"on_singular": "raise"}, r"on_singular='raise'"),
    "settings": (la_solve_k, (_C["q"], _C["v"], _C["o"], _C["g"]), {"settings": {"atol": 1}}, r"settings=.*LsqrSettings"),
    "method-str": (la_solve_k, (_C["q"], _C["v"], _C["o"], _C["g"]), {"method": "lsqr"}, r"method='lsqr': must be a Type2Method"),
}


@pytest.mark.parametrize("kernel, args, kwargs, message", list(_BAD.values()), ids=list(_BAD))
def test_invalid_arguments(kernel, args, kwargs, message):
    with pytest.raises(IqaVerifyError, match=message):
        kernel(*args, **kwargs)
