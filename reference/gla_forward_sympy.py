"""Sympy closed forms of gated linear attention (family ``gla-forward``) for small sizes.

Per batch and head, with symbolic ``q_t, k_t: [D]``, ``v_t: [E]``, log gates ``g_t: [D]``, initial state
``S_0: [D, E]`` and ``scale``::

    recurrence:   S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,   final state S_T
    matrix form:  o_i = scale * ( sum_{j <= i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j + S_0^T (q_i ⊙ exp(b_i)) )
                  S_T = diag(exp(b_T)) S_0 + sum_j (k_j ⊙ exp(b_T - b_j)) v_j^T,   b_i = g_1 + ... + g_i

:func:`prove_forms_identical` shows that the two agree entry by entry; :func:`prove_reduces_to_la` shows
that with ``g_{t,d} = g_t`` for every d the recurrence is ``la-forward``'s (:mod:`iqa_verify.reference.la_forward_sympy`);
:func:`closed_form` lambdifies the values and the ``sympy.diff`` gradients of
``L = sum(dO ⊙ O) + sum(dS ⊙ S_T)`` into a float64 numpy oracle of one (batch, head) problem.
Sizes are limited to ``T <= MAX_T``, ``D, E <= MAX_DIM``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

from iqa_verify.errors import IqaVerifyError, check_at_least
from iqa_verify.reference import la_forward_sympy

__all__ = [
    "MAX_DIM",
    "MAX_T",
    "GLAClosedForm",
    "GLAForms",
    "GLASymbols",
    "closed_form",
    "differing_entries",
    "gla_symbols",
    "matrix_forms",
    "prove_forms_identical",
    "prove_reduces_to_la",
    "recurrent_forms",
]

MAX_T = 3
"""Largest sequence length the closed forms are built for."""
MAX_DIM = 2
"""Largest key (D) and value (E) dimension the closed forms are built for."""


def _check_sizes(T: int, D: int, E: int) -> None:
    for name, value, maximum, what in (("T", T, MAX_T, "sequence length"), ("D", D, MAX_DIM, "key dimension"),
                                       ("E", E, MAX_DIM, "value dimension")):
        check_at_least(name, value, 1, what)
        if value > maximum:
            raise IqaVerifyError(f"{name}={value}: {what} must be <= {maximum} for the sympy closed forms")


def _matrix(name: str, rows: int, cols: int) -> sp.Matrix:
    """A [rows, cols] matrix of real symbols ``name_{r}{c}`` (1-based, as in the math)."""
    return sp.Matrix(rows, cols, lambda r, c: sp.Symbol(f"{name}_{r + 1}{c + 1}", real=True))


@dataclass(frozen=True)
class GLASymbols:
    """Symbols of one (batch, head) problem: q, k, g: [T, D]; v: [T, E]; S0: [D, E]; scale; dO: [T, E]; dS: [D, E].

    q, k, v, S0, scale, dO and dS are the very symbols of :func:`iqa_verify.reference.la_forward_sympy.la_symbols`."""

    T: int
    D: int
    E: int
    q: sp.Matrix
    k: sp.Matrix
    v: sp.Matrix
    g: sp.Matrix
    S0: sp.Matrix
    scale: sp.Symbol
    dO: sp.Matrix
    dS: sp.Matrix

    @property
    def inputs(self) -> dict[str, sp.Matrix]:
        """The differentiable inputs in contract order."""
        return {"q": self.q, "k": self.k, "v": self.v, "g": self.g, "initial_state": self.S0}


@lru_cache(maxsize=None)
def gla_symbols(T: int, D: int, E: int) -> GLASymbols:
    """Real symbols for a problem of size (T, D, E); T <= MAX_T, D, E <= MAX_DIM."""
    _check_sizes(T, D, E)
    la = la_forward_sympy.la_symbols(T, D, E)
    return GLASymbols(T, D, E, la.q, la.k, la.v, _matrix("g", T, D), la.S0, la.scale, la.dO, la.dS)


@dataclass(frozen=True)
class GLAForms:
    """Symbolic outputs of one (batch, head): o [T, E] and final_state S_T [D, E]."""

    o: sp.Matrix
    final_state: sp.Matrix


@lru_cache(maxsize=None)
def recurrent_forms(T: int, D: int, E: int) -> GLAForms:
    """O and S_T by the recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``."""
    s = gla_symbols(T, D, E)
    S = s.S0
    rows = []
    for t in range(T):
        S = sp.diag(*[sp.exp(s.g[t, d]) for d in range(D)]) * S + s.k.row(t).T * s.v.row(t)
        rows.append((s.scale * S.T * s.q.row(t).T).T)
    return GLAForms(o=sp.Matrix.vstack(*rows), final_state=S)


@lru_cache(maxsize=None)
def matrix_forms(T: int, D: int, E: int) -> GLAForms:
    """O and S_T by the matrix form of the module docstring (per-dimension decay ``exp(b_id - b_jd)``)."""
    s = gla_symbols(T, D, E)
    b = [[sum(s.g[: i + 1, d], sp.S.Zero) for d in range(D)] for i in range(T)]
    scores = sp.Matrix(T, T, lambda i, j: sum((s.q[i, d] * s.k[j, d] * sp.exp(b[i][d] - b[j][d]) for d in range(D)),
                                              sp.S.Zero) if i >= j else sp.S.Zero)
    decayed_q = sp.Matrix(T, D, lambda i, d: s.q[i, d] * sp.exp(b[i][d]))
    o = s.scale * (scores * s.v + decayed_q * s.S0)
    state = sp.diag(*[sp.exp(b[-1][d]) for d in range(D)]) * s.S0
    for j in range(T):
        state += sp.Matrix(D, 1, lambda d, _: s.k[j, d] * sp.exp(b[-1][d] - b[j][d])) * s.v.row(j)
    return GLAForms(o=o, final_state=state)


def differing_entries(first: GLAForms, second: GLAForms) -> tuple[str, ...]:
    """The entries (``o[t, e]``, ``final_state[d, e]``, 0-based) where ``simplify(expand(a - b)) != 0``."""
    nonzero = []
    for name in ("o", "final_state"):
        a, b = getattr(first, name), getattr(second, name)
        for r in range(a.rows):
            for c in range(a.cols):
                if sp.simplify(sp.expand(a[r, c] - b[r, c])) != 0:
                    nonzero.append(f"{name}[{r}, {c}]")
    return tuple(nonzero)


def prove_forms_identical(T: int, D: int, E: int) -> tuple[str, ...]:
    """Entries where the recurrence and the matrix form differ at size (T, D, E): empty when proven identical."""
    return differing_entries(recurrent_forms(T, D, E), matrix_forms(T, D, E))


def prove_reduces_to_la(T: int, D: int, E: int) -> tuple[str, ...]:
    """Entries where the recurrence with ``g_{t,d} = g_t`` for all d differs from la-forward's recurrence
    (:func:`iqa_verify.reference.la_forward_sympy.recurrent_forms`): empty when proven equal."""
    s = gla_symbols(T, D, E)
    la = la_forward_sympy.la_symbols(T, D, E)
    same_gate = {s.g[t, d]: la.g[t] for t in range(T) for d in range(D)}
    forms = recurrent_forms(T, D, E)
    reduced = GLAForms(forms.o.subs(same_gate), forms.final_state.subs(same_gate))
    la_forms = la_forward_sympy.recurrent_forms(T, D, E)
    return differing_entries(reduced, GLAForms(la_forms.o, la_forms.final_state))


@dataclass(frozen=True)
class GLAClosedForm:
    """A lambdified float64 oracle of one (batch, head) problem of size (T, D, E).

    ``oracle(q, k, v, g, S0, scale, dO, dS)`` with float64 numpy arrays q, k, g [T, D]; v [T, E]; S0 [D, E];
    dO [T, E]; dS [D, E] returns a dict: ``o`` [T, E], ``final_state`` [D, E] and the gradients of
    ``L = sum(dO ⊙ o) + sum(dS ⊙ final_state)``: ``dq``, ``dk``, ``dg`` [T, D], ``dv`` [T, E], ``dinitial_state`` [D, E].
    """

    T: int
    D: int
    E: int
    function: Callable[..., list]

    def __call__(self, q, k, v, g, S0, scale: float, dO, dS) -> dict[str, np.ndarray]:
        T, D, E = self.T, self.D, self.E
        shapes = {"q": (T, D), "k": (T, D), "v": (T, E), "g": (T, D), "S0": (D, E), "dO": (T, E), "dS": (D, E)}
        arrays = dict(q=q, k=k, v=v, g=g, S0=S0, dO=dO, dS=dS)
        flat = []
        for name, shape in shapes.items():
            x = np.asarray(arrays[name], dtype=np.float64)
            if x.shape != shape:
                raise IqaVerifyError(f"{name}.shape={x.shape}: must be {shape} for this closed form")
            flat.extend(x.reshape(-1))
            if name == "S0":
                flat.append(float(scale))
        values = iter(np.asarray(self.function(*flat), dtype=np.float64))
        out = {}
        for name, shape in (("o", (T, E)), ("final_state", (D, E)), ("dq", (T, D)), ("dk", (T, D)), ("dv", (T, E)),
                            ("dg", (T, D)), ("dinitial_state", (D, E))):
            out[name] = np.array([next(values) for _ in range(shape[0] * shape[1])]).reshape(shape)
        return out


@lru_cache(maxsize=None)
def closed_form(T: int, D: int, E: int) -> GLAClosedForm:
    """The lambdified oracle for size (T, D, E) (derived once, then cached)."""
    s = gla_symbols(T, D, E)
    forms = recurrent_forms(T, D, E)
    loss = sum(s.dO.multiply_elementwise(forms.o), sp.S.Zero) + sum(s.dS.multiply_elementwise(forms.final_state), sp.S.Zero)
    grads = [sym_grad for m in s.inputs.values() for sym_grad in m.applyfunc(lambda x: sp.diff(loss, x))]
    arguments = [*s.q, *s.k, *s.v, *s.g, *s.S0, s.scale, *s.dO, *s.dS]
    function = sp.lambdify(arguments, [*forms.o, *forms.final_state, *grads], modules="numpy", cse=True)
    return GLAClosedForm(T, D, E, function)
