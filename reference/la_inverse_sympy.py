"""Exact (sympy) facts about the inverse forms of linear attention with decay (SPEC §2, §4).

Small symbolic cases, per batch and head (``lambda_t = exp(g_t)`` kept as positive symbols)::

    S_t = lambda_t S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

* :func:`type1_substitution_proof`: the Jacobian of O in V is lower block-triangular with diagonal
  blocks ``scale (q_t · k_t) I_E``, sympy's triangular solve equals the forward-substitution formula
  ``v_t = (o_t / scale - lambda_t S_{t-1}^T q_t) / (q_t · k_t)``, and the forward of that V gives back
  O identically (T <= 3).
* :func:`type3_closed_form_2x2`: for D = E = 2, ``q_t = adj(S_t^T) o_t / (scale det S_t)`` solves
  ``scale S_t^T q_t = o_t`` and equals ``(scale S_t^T)^{-1} o_t`` (= pinv where det S_t != 0).
* :func:`type2_stationarity_derivation`: the design notes' per-step state ``s_t = q_t o_t^T / |q_t|^2``
  derived from the stationarity condition ``q q^T s = q o^T`` of ``min_s ½‖o - s^T q‖^2``: every
  solution is ``s_t + N`` with ``q^T N = 0``, and ``s_t`` is the one of minimum Frobenius norm.
* :func:`type2_recursion_exact_e1`: for E = 1 the recursion
  ``k_t = (s_t - lambda_t s_{t-1}) v_t / |v_t|^2`` (``s_0 = S_0``, ``s_t`` scaled by 1/scale) gives
  ``o_t`` back exactly, for every O (hence every consistent O), T <= 3, D <= 2.
* :func:`type2_recursion_counterexample`: a concrete rational case with E = 2 and consistent O
  where the recursion's round trip is off by tens of percent.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

__all__ = [
    "Type2Counterexample",
    "symbolic_forward",
    "type1_substitution_proof",
    "type2_recursion",
    "type2_recursion_counterexample",
    "type2_recursion_exact_e1",
    "type2_stationarity_derivation",
    "type3_closed_form_2x2",
]


def _vectors(name: str, T: int, n: int) -> list[sp.Matrix]:
    return [sp.Matrix(sp.symbols(f"{name}{t}_0:{n}", real=True)) for t in range(1, T + 1)]


def _decays(T: int) -> list[sp.Symbol]:
    return list(sp.symbols(f"lambda1:{T + 1}", positive=True))


def symbolic_forward(q, k, v, lam, S0, scale) -> list[sp.Matrix]:
    """o_t = scale * S_t^T q_t with S_t = lambda_t S_{t-1} + k_t v_t^T (lists of column vectors; S0 [D, E])."""
    S, out = S0, []
    for q_t, k_t, v_t, lam_t in zip(q, k, v, lam):
        S = lam_t * S + k_t * v_t.T
        out.append(scale * S.T * q_t)
    return out


def _is_zero(expr) -> bool:
    return sp.cancel(sp.together(expr)) == 0


def _all_zero(m: sp.Matrix) -> bool:
    return all(_is_zero(e) for e in m)


def type1_substitution_proof(T: int = 3, D: int = 2, E: int = 2) -> bool:
    """Prove the Type1 facts of the module docstring for symbolic q, k, O, lambda, S_0, scale."""
    q, k, v = _vectors("q", T, D), _vectors("k", T, D), _vectors("v", T, E)
    o = _vectors("o", T, E)
    lam, scale = _decays(T), sp.Symbol("scale", positive=True)
    S0 = sp.Matrix(D, E, sp.symbols(f"s0_0:{D * E}", real=True))
    fwd = sp.Matrix.vstack(*symbolic_forward(q, k, v, lam, S0, scale))
    xs = sp.Matrix.vstack(*v)
    J = fwd.jacobian(xs)  # [T E, T E]
    for t in range(T):
        for j in range(T):
            block = J[t * E:(t + 1) * E, j * E:(j + 1) * E]
            expected = scale * (q[t].T * k[t])[0] * sp.eye(E) if t == j else sp.zeros(E, E)
            if j >= t and not _all_zero(block - expected):
                return False
    offset = fwd.subs({x: 0 for x in xs})
    tri = J.lower_triangular_solve(sp.Matrix.vstack(*o) - offset)
    S, sub = S0, []
    for t in range(T):
        carried = lam[t] * S
        v_t = (o[t] / scale - carried.T * q[t]) / (q[t].T * k[t])[0]
        S = carried + k[t] * v_t.T
        sub.append(v_t)
    sub_vec = sp.Matrix.vstack(*sub)
    if not _all_zero(tri - sub_vec):
        return False
    back = symbolic_forward(q, k, sub, lam, S0, scale)
    return _all_zero(sp.Matrix.vstack(*back) - sp.Matrix.vstack(*o))


def type3_closed_form_2x2() -> bool:
    """Prove the D = E = 2 closed form of Type3 (module docstring) for a symbolic state and output."""
    a, b, c, d = sp.symbols("a b c d", real=True)
    o1, o2 = sp.symbols("o1 o2", real=True)
    scale = sp.Symbol("scale", positive=True)
    S = sp.Matrix([[a, b], [c, d]])  # S_t, [D, E]
    o = sp.Matrix([o1, o2])
    det = a * d - b * c
    q = sp.Matrix([d * o1 - c * o2, -b * o1 + a * o2]) / (scale * det)  # adj(S^T) o / (scale det S)
    solves = _all_zero(scale * S.T * q - o)
    matches_inverse = _all_zero(q - (scale * S.T).inv() * o)
    return solves and matches_inverse


def type2_stationarity_derivation(D: int = 2, E: int = 2) -> bool:
    """Derive ``s_t = q o^T / |q|^2`` from the stationarity condition (module docstring); True if it holds."""
    q = sp.Matrix(sp.symbols(f"q0:{D}", real=True))
    o = sp.Matrix(sp.symbols(f"o0:{E}", real=True))
    cells = sp.symbols(f"x0:{D * E}", real=True)
    X = sp.Matrix(D, E, cells)
    residual = o - X.T * q
    objective = (residual.T * residual)[0] / 2
    gradient = sp.Matrix(D, E, [sp.diff(objective, x) for x in cells])
    if not _all_zero(gradient - q * (X.T * q - o).T):  # dF/dX = q (X^T q - o)^T
        return False
    solutions = sp.linsolve(list(q * q.T * X - q * o.T), list(cells))  # q q^T X = q o^T
    (general,) = solutions
    family = sp.Matrix(D, E, list(general))
    free = sorted(family.free_symbols & set(cells), key=str)
    norm2 = sum(e**2 for e in family)
    best = sp.solve([sp.diff(norm2, f) for f in free], free, dict=True)
    minimum = family.subs(best[0]) if free else family
    s = q * o.T / (q.T * q)[0]
    return _all_zero(minimum - s)


def type2_recursion(q, v, o, lam, S0, scale) -> list[sp.Matrix]:
    """The notes' recursion: s_t = q_t o_t^T / (scale |q_t|^2), k_t = (s_t - lambda_t s_{t-1}) v_t / |v_t|^2."""
    prev, ks = S0, []
    for q_t, v_t, o_t, lam_t in zip(q, v, o, lam):
        s_t = q_t * o_t.T / (scale * (q_t.T * q_t)[0])
        ks.append((s_t - lam_t * prev) * v_t / (v_t.T * v_t)[0])
        prev = s_t
    return ks


def type2_recursion_exact_e1(T: int = 3, D: int = 2, E: int = 1) -> bool:
    """Prove that for E = 1 the recursion reproduces every (so every consistent) O: T <= 3, D <= 2 symbolic.

    ``E`` exists so that the claim can be seen to fail: with E = 2 the same check returns False.
    """
    q, v, o = _vectors("q", T, D), _vectors("v", T, E), _vectors("o", T, E)
    lam, scale = _decays(T), sp.Symbol("scale", positive=True)
    S0 = sp.Matrix(D, E, sp.symbols(f"s0_0:{D * E}", real=True))
    k = type2_recursion(q, v, o, lam, S0, scale)
    back = symbolic_forward(q, k, v, lam, S0, scale)
    return _all_zero(sp.Matrix.vstack(*back) - sp.Matrix.vstack(*o))


@dataclass(frozen=True)
class Type2Counterexample:
    """A rational case (T = 2, D = E = 2, S_0 = 0, scale = 1) with consistent O = forward(q, k_true, v).

    Lists of per-step vectors; ``relative_error = ‖O_rec - O‖_F / ‖O‖_F`` exactly, with O_rec the
    forward of the recursion's k.
    """

    q: list[list[sp.Rational]]
    k_true: list[list[sp.Rational]]
    v: list[list[sp.Rational]]
    lam: list[sp.Rational]
    o: list[list[sp.Rational]]
    k_recursion: list[list[sp.Rational]]
    o_recursion: list[list[sp.Rational]]
    relative_error: sp.Expr


def type2_recursion_counterexample() -> Type2Counterexample:
    """The recursion fails for E = 2 on consistent O: see :class:`Type2Counterexample` (error sqrt(66)/33 ≈ 0.246)."""
    R = sp.Rational
    q = [sp.Matrix([1, 0]), sp.Matrix([1, 1])]
    k_true = [sp.Matrix([1, 2]), sp.Matrix([2, -1])]
    v = [sp.Matrix([1, 0]), sp.Matrix([1, 1])]
    lam = [R(1), R(1, 2)]
    S0, scale = sp.zeros(2, 2), sp.Integer(1)
    o = symbolic_forward(q, k_true, v, lam, S0, scale)
    k_rec = type2_recursion(q, v, o, lam, S0, scale)
    o_rec = symbolic_forward(q, k_rec, v, lam, S0, scale)
    diff = sp.Matrix.vstack(*o_rec) - sp.Matrix.vstack(*o)
    ref = sp.Matrix.vstack(*o)
    err = sp.sqrt(sum(e**2 for e in diff) / sum(e**2 for e in ref))
    as_lists = lambda vs: [list(x) for x in vs]  # noqa: E731
    return Type2Counterexample(as_lists(q), as_lists(k_true), as_lists(v), lam, as_lists(o), as_lists(k_rec), as_lists(o_rec), sp.nsimplify(err))
