"""Sympy closed forms of the (gated) delta rule (family ``delta-forward``) for small sizes.

Per batch and head, with symbolic ``q_t, k_t: [D]``, ``v_t: [E]``, ``beta_t``, log-decay ``g_t``, ``S_0: [D, E]``::

    product form:  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
    WY / UT form:  S_t = exp(b_t) S_0 + sum_{j <= t} exp(b_t - b_j) k_j u_j^T,   b_t = g_1 + ... + g_t
                   u_t = beta_t (v_t - exp(b_t) S_0^T k_t - sum_{j < t} exp(b_t - b_j) (k_t . k_j) u_j)
                   i.e. (I + A) U = diag(beta) (V - diag(exp(b)) K S_0),  A_tj = beta_t exp(b_t - b_j) k_t . k_j (j < t)

:func:`prove_forms_identical` shows the two agree (the chunked kernels' algebra); :func:`closed_form`
lambdifies the values and ``sympy.diff`` gradients of ``L = sum(dO ⊙ O) + sum(dS ⊙ S_T)`` (with respect to
q, k, v, beta, g, S_0) into a float64 numpy oracle of one (batch, head) problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = ["MAX_DIM", "MAX_T", "DeltaClosedForm", "DeltaForms", "closed_form", "delta_symbols",
           "prove_forms_identical", "recurrent_forms", "wy_forms"]

MAX_T = 3
MAX_DIM = 2


def _matrix(name: str, rows: int, cols: int) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda r, c: sp.Symbol(f"{name}_{r + 1}{c + 1}", real=True))


@dataclass(frozen=True)
class DeltaSymbols:
    """q, k: [T, D]; v: [T, E]; beta, g: [T, 1]; S0: [D, E]; scale; dO: [T, E]; dS: [D, E]."""

    T: int
    D: int
    E: int
    q: sp.Matrix
    k: sp.Matrix
    v: sp.Matrix
    beta: sp.Matrix
    g: sp.Matrix
    S0: sp.Matrix
    scale: sp.Symbol
    dO: sp.Matrix
    dS: sp.Matrix


@lru_cache(maxsize=None)
def delta_symbols(T: int, D: int, E: int) -> DeltaSymbols:
    """Real symbols for size (T, D, E); T <= MAX_T, D, E <= MAX_DIM."""
    for name, value, maximum in (("T", T, MAX_T), ("D", D, MAX_DIM), ("E", E, MAX_DIM)):
        check_at_least(name, value, 1, "size")
        if value > maximum:
            raise IqaVerifyError(f"{name}={value}: must be <= {maximum} for the sympy closed forms")
    col = lambda name: sp.Matrix(T, 1, lambda t, _: sp.Symbol(f"{name}_{t + 1}", real=True))  # noqa: E731
    return DeltaSymbols(T, D, E, _matrix("q", T, D), _matrix("k", T, D), _matrix("v", T, E), col("beta"), col("g"),
                        _matrix("S0", D, E), sp.Symbol("scale", real=True), _matrix("dO", T, E), _matrix("dS", D, E))


@dataclass(frozen=True)
class DeltaForms:
    o: sp.Matrix
    final_state: sp.Matrix


@lru_cache(maxsize=None)
def recurrent_forms(T: int, D: int, E: int) -> DeltaForms:
    """O and S_T by the product form ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``."""
    s = delta_symbols(T, D, E)
    S, rows = s.S0, []
    for t in range(T):
        k_t = s.k.row(t).T
        S = sp.exp(s.g[t]) * (sp.eye(D) - s.beta[t] * k_t * k_t.T) * S + s.beta[t] * k_t * s.v.row(t)
        rows.append((s.scale * S.T * s.q.row(t).T).T)
    return DeltaForms(sp.Matrix.vstack(*rows), S)


@lru_cache(maxsize=None)
def wy_forms(T: int, D: int, E: int) -> DeltaForms:
    """O and S_T by the WY / UT form of the module docstring."""
    s = delta_symbols(T, D, E)
    b = [sum(s.g[: t + 1], sp.S.Zero) for t in range(T)]
    u: list[sp.Matrix] = []
    for t in range(T):
        k_t = s.k.row(t).T
        acc = s.v.row(t).T - sp.exp(b[t]) * s.S0.T * k_t
        for j in range(t):
            acc -= sp.exp(b[t] - b[j]) * (k_t.T * s.k.row(j).T)[0] * u[j]
        u.append(s.beta[t] * acc)
    states = [sp.exp(b[t]) * s.S0 + sum((sp.exp(b[t] - b[j]) * s.k.row(j).T * u[j].T for j in range(t + 1)),
                                        sp.zeros(D, E)) for t in range(T)]
    o = sp.Matrix.vstack(*[(s.scale * states[t].T * s.q.row(t).T).T for t in range(T)])
    return DeltaForms(o, states[-1])


def prove_forms_identical(T: int, D: int, E: int) -> tuple[str, ...]:
    """Entries (``o[t, e]``, ``final_state[d, e]``) where the product and WY forms differ: empty when proven equal."""
    first, second = recurrent_forms(T, D, E), wy_forms(T, D, E)
    nonzero = []
    for name in ("o", "final_state"):
        a, b = getattr(first, name), getattr(second, name)
        for r in range(a.rows):
            for c in range(a.cols):
                if sp.simplify(sp.expand(a[r, c] - b[r, c])) != 0:
                    nonzero.append(f"{name}[{r}, {c}]")
    return tuple(nonzero)


@dataclass(frozen=True)
class DeltaClosedForm:
    """``oracle(q, k, v, beta, g, S0, scale, dO, dS)`` on one (batch, head): q, k [T, D]; v [T, E]; beta, g [T];
    S0 [D, E]; dO [T, E]; dS [D, E] -> dict of ``o``, ``final_state``, ``dq``, ``dk``, ``dv``, ``dbeta``, ``dg``,
    ``dinitial_state`` (float64 numpy, the shapes of the corresponding inputs)."""

    T: int
    D: int
    E: int
    function: Callable[..., list]

    def __call__(self, q, k, v, beta, g, S0, scale: float, dO, dS) -> dict[str, np.ndarray]:
        T, D, E = self.T, self.D, self.E
        shapes = (("q", q, (T, D)), ("k", k, (T, D)), ("v", v, (T, E)), ("beta", beta, (T,)), ("g", g, (T,)),
                  ("S0", S0, (D, E)), ("dO", dO, (T, E)), ("dS", dS, (D, E)))
        flat = []
        for name, x, shape in shapes:
            x = np.asarray(x, dtype=np.float64)
            if x.shape != shape:
                raise IqaVerifyError(f"{name}.shape={x.shape}: must be {shape} for this closed form")
            flat.extend(x.reshape(-1))
            if name == "S0":
                flat.append(float(scale))
        values = iter(np.asarray(self.function(*flat), dtype=np.float64))
        out = {}
        for name, shape in (("o", (T, E)), ("final_state", (D, E)), ("dq", (T, D)), ("dk", (T, D)), ("dv", (T, E)),
                            ("dbeta", (T,)), ("dg", (T,)), ("dinitial_state", (D, E))):
            out[name] = np.array([next(values) for _ in range(int(np.prod(shape)))]).reshape(shape)
        return out


@lru_cache(maxsize=None)
def closed_form(T: int, D: int, E: int) -> DeltaClosedForm:
    """The lambdified oracle for size (T, D, E) (derived once, then cached)."""
    s = delta_symbols(T, D, E)
    forms = recurrent_forms(T, D, E)
    loss = sum(s.dO.multiply_elementwise(forms.o), sp.S.Zero) + sum(s.dS.multiply_elementwise(forms.final_state), sp.S.Zero)
    grads = [sp.diff(loss, x) for m in (s.q, s.k, s.v, s.beta, s.g, s.S0) for x in m]
    arguments = [*s.q, *s.k, *s.v, *s.beta, *s.g, *s.S0, s.scale, *s.dO, *s.dS]
    function = sp.lambdify(arguments, [*forms.o, *forms.final_state, *grads], modules="numpy", cse=True)
    return DeltaClosedForm(T, D, E, function)
