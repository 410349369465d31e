"""Float64 references of the inverse forms (reference/la_inverse.py) and their sympy facts."""

from __future__ import annotations

import pytest
import sympy as sp
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.la_forward import la_forward_ref
from iqa_verify.reference.la_inverse import (
    Unknown,
    la_linear_map,
    la_solve_k_dense_ref,
    la_solve_k_recursion_ref,
    la_solve_q_dense_ref,
    la_solve_q_per_step_ref,
    la_solve_v_dense_ref,
    la_solve_v_substitution_ref,
)
from iqa_verify.reference.la_inverse_sympy import (
    type1_substitution_proof,
    type2_recursion_counterexample,
    type2_recursion_exact_e1,
    type2_stationarity_derivation,
    type3_closed_form_2x2,
)

F64 = torch.float64
REF = tolerance(Kind.REFERENCE, F64)


def _case(B=2, T=6, H=2, D=3, E=2, *, initial=True, seed=0, decay=0.3, key_shift=0.0):
    """Random float64 inputs and a consistent o; keys are key_shift * q + noise (diagonal q·k bounded away from 0)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q = rand(B, T, H, D)
    k = key_shift * q + rand(B, T, H, D)
    v = rand(B, T, H, E)
    g = -decay * torch.rand(B, T, H, generator=gen, dtype=F64)
    S0 = rand(B, H, D, E) if initial else None
    scale = 0.7
    o = la_forward_ref(q, k, v, g, S0, scale=scale)[0]
    return dict(q=q, k=k, v=v, g=g, S0=S0, o=o, scale=scale)


def _require(check):
    assert check.passed, check.describe()


def _knowns(c, unknown):
    return {Unknown.V: (c["q"], c["k"]), Unknown.K: (c["q"], c["v"]), Unknown.Q: (c["k"], c["v"])}[unknown]


@pytest.mark.parametrize("initial", [True, False], ids=["S0", "no-S0"])
@pytest.mark.parametrize("unknown", list(Unknown), ids=lambda u: u.name)
def test_linear_map_reproduces_forward(unknown, initial):
    c = _case(initial=initial)
    a, b = _knowns(c, unknown)
    m = la_linear_map(unknown, a, b, c["o"], c["g"], c["S0"], scale=c["scale"])
    truth = c[unknown.value]
    _require(compare("o", m.apply(truth), c["o"], REF, dtype=F64))


@pytest.mark.parametrize("initial", [True, False], ids=["S0", "no-S0"])
def test_type1_dense_matches_substitution(initial):
    c = _case(initial=initial, key_shift=1.0)
    args = (c["q"], c["k"], c["o"], c["g"], c["S0"])
    dense = la_solve_v_dense_ref(*args, scale=c["scale"])
    _require(compare("v", la_solve_v_substitution_ref(*args, scale=c["scale"]), dense, REF, dtype=F64))
    _require(compare("v", dense, c["v"], REF, dtype=F64))  # nonsingular: V is recovered


def test_type1_substitution_names_singular_step():
    c = _case()
    k = c["k"].clone()
    k[1, 4, 0] = 0.0
    with pytest.raises(IqaVerifyError, match=r"t=4: q_t·k_t = 0"):
        la_solve_v_substitution_ref(c["q"], k, c["o"], c["g"], c["S0"], scale=c["scale"])


@pytest.mark.parametrize("shape", [(6, 3, 4), (4, 5, 3)], ids=["E>=D", "T<D-rank-deficient"])
@pytest.mark.parametrize("initial", [True, False], ids=["S0", "no-S0"])
def test_type3_dense_matches_per_step(shape, initial):
    T, D, E = shape
    c = _case(T=T, D=D, E=E, initial=initial)
    args = (c["k"], c["v"], c["o"], c["g"], c["S0"])
    dense = la_solve_q_dense_ref(*args, scale=c["scale"])
    _require(compare("q", la_solve_q_per_step_ref(*args, scale=c["scale"]), dense, REF, dtype=F64))
    back = la_forward_ref(dense, c["k"], c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    _require(compare("o", back, c["o"], REF, dtype=F64))


def test_type3_rank_deficient_is_min_norm_not_recovered():
    """S_0 = 0 and t < D: O round-trips, Q is the row-space projection of the truth, not the truth."""
    c = _case(T=4, D=5, E=4, initial=False)
    m = la_linear_map(Unknown.Q, c["k"], c["v"], c["o"], c["g"], None, scale=c["scale"])
    rank = torch.linalg.matrix_rank(m.matrix)
    assert bool((rank < m.matrix.shape[-1]).all())
    q_hat = m.solve(c["o"])
    projected = m.solve(m.apply(c["q"]))  # pinv(A) A q: projection onto the row space
    _require(compare("q", q_hat, projected, REF, dtype=F64))
    assert not compare("q", q_hat, c["q"], REF, dtype=F64).passed
    assert bool((q_hat.norm(dim=(1, 3)) < c["q"].norm(dim=(1, 3))).all())


def test_type2_dense_round_trip_and_recovery():
    c = _case(T=5, D=3, E=2)
    args = (c["q"], c["v"], c["o"], c["g"], c["S0"])
    k_hat = la_solve_k_dense_ref(*args, scale=c["scale"])
    back = la_forward_ref(c["q"], k_hat, c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    _require(compare("o", back, c["o"], REF, dtype=F64))
    # identifiable (full column rank) with D = 1, E = 3: K is recovered exactly
    c = _case(T=5, D=1, E=3, seed=3)
    m = la_linear_map(Unknown.K, c["q"], c["v"], c["o"], c["g"], c["S0"], scale=c["scale"])
    assert bool((torch.linalg.matrix_rank(m.matrix) == m.matrix.shape[-1]).all())
    _require(compare("k", m.solve(c["o"]), c["k"], REF, dtype=F64))


def test_type2_recursion_exact_for_e1():
    c = _case(T=7, D=3, E=1)
    k_rec = la_solve_k_recursion_ref(c["q"], c["v"], c["o"], c["g"], c["S0"], scale=c["scale"])
    back = la_forward_ref(c["q"], k_rec, c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    _require(compare("o", back, c["o"], REF, dtype=F64))


@pytest.mark.parametrize("E", [2, 4])
def test_type2_recursion_fails_for_e_above_1(E):
    c = _case(T=8, D=3, E=E, seed=1)
    k_rec = la_solve_k_recursion_ref(c["q"], c["v"], c["o"], c["g"], c["S0"], scale=c["scale"])
    back = la_forward_ref(c["q"], k_rec, c["v"], c["g"], c["S0"], scale=c["scale"])[0]
    rel = (back - c["o"]).norm(dim=(1, 3)) / c["o"].norm(dim=(1, 3))  # per batch and head
    assert bool((rel > 0.1).all()), rel


def test_sympy_type1_substitution():
    assert type1_substitution_proof(T=3, D=2, E=2)


def test_sympy_type3_closed_form():
    assert type3_closed_form_2x2()


def test_sympy_type2_stationarity():
    assert type2_stationarity_derivation(D=2, E=2)


def test_sympy_type2_recursion_exact_e1_only():
    assert type2_recursion_exact_e1(T=3, D=2, E=1)
    assert not type2_recursion_exact_e1(T=2, D=2, E=2)


def test_sympy_type2_counterexample_matches_float64():
    ce = type2_recursion_counterexample()
    assert float(ce.relative_error) > 0.1
    tensor = lambda rows: torch.tensor([[float(x) for x in r] for r in rows], dtype=F64)[None, :, None, :]  # noqa: E731
    q, k, v, o = tensor(ce.q), tensor(ce.k_true), tensor(ce.v), tensor(ce.o)
    g = torch.log(torch.tensor([float(x) for x in ce.lam], dtype=F64))[None, :, None]
    _require(compare("o", la_forward_ref(q, k, v, g)[0], o, REF, dtype=F64))  # consistent
    k_rec = la_solve_k_recursion_ref(q, v, o, g)
    _require(compare("k", k_rec, tensor(ce.k_recursion), REF, dtype=F64))
    back = la_forward_ref(q, k_rec, v, g)[0]
    _require(compare("o_rec", back, tensor(ce.o_recursion), REF, dtype=F64))
    assert sp.simplify(ce.relative_error - sp.sqrt(66) / 33) == 0
