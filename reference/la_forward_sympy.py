"""Sympy closed forms of linear attention with decay (family ``la-forward``) for small sizes.

Per batch and head, with symbolic ``q_t, k_t: [D]``, ``v_t: [E]``, log-decay ``g_t``
(``lambda_t = exp(g_t)``), initial state ``S_0: [D, E]`` and ``scale``::

    recurrence:   S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,   final state S_T
    matrix form:  O   = scale * ( [(Q K^T) ⊙ M] V + diag(alpha) Q S_0 )
                  S_T = exp(b_T) S_0 + sum_j exp(b_T - b_j) k_j v_j^T
                  b_i = g_1 + ... + g_i,  alpha_i = exp(b_i),  M_ij = exp(b_i - b_j) [i >= j]

:func:`prove_forms_identical` shows that the two agree entry by entry; :func:`loss_gradients` derives
with ``sympy.diff`` the gradients of ``L = sum(dO ⊙ O) + sum(dS ⊙ S_T)`` (``dO: [T, E]`` and
``dS: [D, E]`` symbolic cotangents); :func:`closed_form` lambdifies values and gradients into a float64
numpy oracle for the references. Sizes are limited to ``T <= MAX_T`` and ``D, E <= MAX_DIM`` so that
every derivation stays well under a second; each is cached per ``(T, D, E)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import sympy as sp

from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = [
    "MAX_DIM",
    "MAX_T",
    "ClosedFormOutputs",
    "FormsEquivalence",
    "LAClosedForm",
    "LAForms",
    "LAGradients",
    "LASymbols",
    "closed_form",
    "differing_entries",
    "la_symbols",
    "loss_gradients",
    "matrix_forms",
    "prove_forms_identical",
    "recurrent_forms",
]

MAX_T = 3
"""Largest sequence length the closed forms are built for (sympy cost grows quickly with T)."""
MAX_DIM = 2
"""Largest key (D) and value (E) dimension the closed forms are built for."""


def _check_size(name: str, value: int, maximum: int, what: str) -> None:
    check_at_least(name, value, 1, what)
    if value > maximum:
        raise IqaVerifyError(f"{name}={value}: {what} must be <= {maximum} for the sympy closed forms")


def _check_sizes(T: int, D: int, E: int) -> None:
    _check_size("T", T, MAX_T, "sequence length")
    _check_size("D", D, MAX_DIM, "key dimension")
    _check_size("E", E, MAX_DIM, "value dimension")


def _matrix(name: str, rows: int, cols: int) -> sp.Matrix:
    """A [rows, cols] matrix of real symbols ``name_{r}{c}`` (1-based, as in the math)."""
    return sp.Matrix(rows, cols, lambda r, c: sp.Symbol(f"{name}_{r + 1}{c + 1}", real=True))


@dataclass(frozen=True)
class LASymbols:
    """The symbols of one (batch, head) problem of size (T, D, E).

    q, k: [T, D]; v: [T, E]; g: [T, 1] (log-decay, lambda_t = exp(g_t)); S0: [D, E]; scale: a scalar;
    dO: [T, E] and dS: [D, E] the cotangents of O and S_T in the loss.
    """

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
    def inputs(self) -> tuple[sp.Matrix | sp.Symbol, ...]:
        """The differentiable inputs in contract order: q, k, v, g, S0."""
        return (self.q, self.k, self.v, self.g, self.S0)

    def arguments(self) -> list[sp.Symbol]:
        """Flat symbol list in oracle order: q, k, v, g, S0 (row-major), scale, dO, dS."""
        flat = [s for m in (self.q, self.k, self.v, self.g, self.S0) for s in m]
        return flat + [self.scale] + list(self.dO) + list(self.dS)


@lru_cache(maxsize=None)
def la_symbols(T: int, D: int, E: int) -> LASymbols:
    """Fresh real symbols for a problem of size (T, D, E); T <= MAX_T, D, E <= MAX_DIM."""
    _check_sizes(T, D, E)
    return LASymbols(
        T=T,
        D=D,
        E=E,
        q=_matrix("q", T, D),
        k=_matrix("k", T, D),
        v=_matrix("v", T, E),
        g=sp.Matrix(T, 1, lambda t, _: sp.Symbol(f"g_{t + 1}", real=True)),
        S0=_matrix("S0", D, E),
        scale=sp.Symbol("scale", real=True),
        dO=_matrix("dO", T, E),
        dS=_matrix("dS", D, E),
    )


@dataclass(frozen=True)
class LAForms:
    """Symbolic outputs of one (batch, head): o [T, E] and final_state S_T [D, E]."""

    o: sp.Matrix
    final_state: sp.Matrix


@lru_cache(maxsize=None)
def recurrent_forms(T: int, D: int, E: int) -> LAForms:
    """O and S_T by the recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``."""
    s = la_symbols(T, D, E)
    S = s.S0
    rows = []
    for t in range(T):
        S = sp.exp(s.g[t]) * S + s.k.row(t).T * s.v.row(t)
        rows.append((s.scale * S.T * s.q.row(t).T).T)
    return LAForms(o=sp.Matrix.vstack(*rows), final_state=S)


@lru_cache(maxsize=None)
def matrix_forms(T: int, D: int, E: int) -> LAForms:
    """O and S_T by the matrix form.

    ``O = scale * ([(Q K^T) ⊙ M] V + diag(alpha) Q S_0)``,
    ``S_T = exp(b_T) S_0 + sum_j exp(b_T - b_j) k_j v_j^T``, with ``b_i = g_1 + ... + g_i``,
    ``alpha_i = exp(b_i)``, ``M_ij = exp(b_i - b_j)`` for ``i >= j`` and 0 above the diagonal.
    """
    s = la_symbols(T, D, E)
    b = [sum(s.g[: i + 1], sp.S.Zero) for i in range(T)]
    M = sp.Matrix(T, T, lambda i, j: sp.exp(b[i] - b[j]) if i >= j else sp.S.Zero)
    alpha = sp.diag(*[sp.exp(bi) for bi in b])
    o = s.scale * ((s.q * s.k.T).multiply_elementwise(M) * s.v + alpha * s.q * s.S0)
    state = sp.exp(b[-1]) * s.S0
    for j in range(T):
        state += sp.exp(b[-1] - b[j]) * s.k.row(j).T * s.v.row(j)
    return LAForms(o=o, final_state=state)


@dataclass(frozen=True)
class FormsEquivalence:
    """Outcome of :func:`prove_forms_identical`: ``identical`` iff every entry difference simplifies to 0.

    nonzero: the entries (``o[t, e]`` or ``final_state[d, e]``, 0-based) whose difference did not vanish.
    """

    T: int
    D: int
    E: int
    identical: bool
    nonzero: tuple[str, ...]


def prove_forms_identical(T: int, D: int, E: int) -> FormsEquivalence:
    """Prove the recurrence and the matrix form identical at size (T, D, E).

    For every entry of O and S_T, checks ``simplify(expand(recurrent - matrix)) == 0`` (the expansion
    first, so that exponentials of sums combine and simplify has an easy job).
    """
    nonzero = differing_entries(recurrent_forms(T, D, E), matrix_forms(T, D, E))
    return FormsEquivalence(T=T, D=D, E=E, identical=not nonzero, nonzero=nonzero)


def differing_entries(first: LAForms, second: LAForms) -> tuple[str, ...]:
    """The entries (``o[t, e]``, ``final_state[d, e]``, 0-based) where ``simplify(expand(a - b)) != 0``."""
    nonzero = []
    for name in ("o", "final_state"):
        a, b = getattr(first, name), getattr(second, name)
        for r in range(a.rows):
            for c in range(a.cols):
                if sp.simplify(sp.expand(a[r, c] - b[r, c])) != 0:
                    nonzero.append(f"{name}[{r}, {c}]")
    return tuple(nonzero)


@dataclass(frozen=True)
class LAGradients:
    """Symbolic gradients of ``L = sum(dO ⊙ O) + sum(dS ⊙ S_T)`` (from the recurrence), per (batch, head).

    dq, dk: [T, D]; dv: [T, E]; dg: [T, 1]; dS0: [D, E]; loss: the scalar L.
    """

    loss: sp.Expr
    dq: sp.Matrix
    dk: sp.Matrix
    dv: sp.Matrix
    dg: sp.Matrix
    dS0: sp.Matrix


@lru_cache(maxsize=None)
def loss_gradients(T: int, D: int, E: int) -> LAGradients:
    """``dL/dq, dL/dk, dL/dv, dL/dg, dL/dS_0`` by ``sympy.diff`` of ``L = sum(dO ⊙ O) + sum(dS ⊙ S_T)``."""
    s = la_symbols(T, D, E)
    forms = recurrent_forms(T, D, E)
    loss = sum(s.dO.multiply_elementwise(forms.o), sp.S.Zero) + sum(
        s.dS.multiply_elementwise(forms.final_state), sp.S.Zero
    )
    grads = [m.applyfunc(lambda sym: sp.diff(loss, sym)) for m in s.inputs]
    return LAGradients(loss, *grads)


class ClosedFormOutputs(NamedTuple):
    """Float64 numpy values from :class:`LAClosedForm`, in the kernel layout.

    o: [B, T, H, E]; final_state: [B, H, D, E]; dq, dk: [B, T, H, D]; dv: [B, T, H, E]; dg: [B, T, H];
    dS0: [B, H, D, E] (gradients of ``L = sum(dO ⊙ o) + sum(dS ⊙ final_state)``).
    """

    o: np.ndarray
    final_state: np.ndarray
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dg: np.ndarray
    dS0: np.ndarray


def _check_array(name: str, x: np.ndarray, shape: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != shape:
        raise IqaVerifyError(f"{name}.shape={tuple(x.shape)}: must be {layout} = {shape}")


@dataclass(frozen=True)
class LAClosedForm:
    """A lambdified float64 oracle for size (T, D, E): values and gradients of the sympy closed forms.

    Call it as ``oracle(q, k, v, g, S0, scale, dO, dS)`` with float64 numpy arrays in the kernel
    layout: q, k [B, T, H, D]; v [B, T, H, E]; g [B, T, H]; S0 [B, H, D, E] or None (zeros); scale a
    float; dO [B, T, H, E]; dS [B, H, D, E] or None (zeros). Returns :class:`ClosedFormOutputs`.
    The expressions are evaluated elementwise over all (batch, head) pairs at once.
    """

    T: int
    D: int
    E: int
    function: Callable[..., list]

    def __call__(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        g: np.ndarray,
        S0: np.ndarray | None,
        scale: float,
        dO: np.ndarray,
        dS: np.ndarray | None = None,
    ) -> ClosedFormOutputs:
        T, D, E = self.T, self.D, self.E
        q = np.asarray(q, dtype=np.float64)
        B, H = (q.shape[0], q.shape[2]) if q.ndim == 4 else (1, 1)
        _check_array("q", q, (B, T, H, D), "[B, T, H, D]")
        S0 = np.zeros((B, H, D, E)) if S0 is None else S0
        dS = np.zeros((B, H, D, E)) if dS is None else dS
        arrays = {"k": k, "v": v, "g": g, "S0": S0, "dO": dO, "dS": dS}
        layouts = {
            "k": ((B, T, H, D), "[B, T, H, D]"),
            "v": ((B, T, H, E), "[B, T, H, E]"),
            "g": ((B, T, H), "[B, T, H]"),
            "S0": ((B, H, D, E), "[B, H, D, E]"),
            "dO": ((B, T, H, E), "[B, T, H, E]"),
            "dS": ((B, H, D, E), "[B, H, D, E]"),
        }
        for name in arrays:
            arrays[name] = np.asarray(arrays[name], dtype=np.float64)
            _check_array(name, arrays[name], *layouts[name])
        k, v, g, S0, dO, dS = (arrays[n] for n in ("k", "v", "g", "S0", "dO", "dS"))

        def per_time(x: np.ndarray) -> list[np.ndarray]:  # [B, T, H, N] -> T*N arrays [B, H], row-major
            return [x[:, t, :, n] for t in range(x.shape[1]) for n in range(x.shape[3])]

        def per_state(x: np.ndarray) -> list[np.ndarray]:  # [B, H, D, E] -> D*E arrays [B, H]
            return [x[:, :, d, e] for d in range(D) for e in range(E)]

        args = (
            per_time(q) + per_time(k) + per_time(v) + [g[:, t, :] for t in range(T)] + per_state(S0)
            + [np.float64(scale)] + per_time(dO) + per_state(dS)
        )
        flat = iter(np.broadcast_to(np.asarray(x, dtype=np.float64), (B, H)) for x in self.function(*args))

        def take_time(n: int) -> np.ndarray:  # T*n arrays [B, H] -> [B, T, H, n]
            return np.stack([np.stack([next(flat) for _ in range(n)], axis=-1) for _ in range(T)], axis=1)

        def take_state() -> np.ndarray:  # D*E arrays [B, H] -> [B, H, D, E]
            return np.stack([np.stack([next(flat) for _ in range(E)], axis=-1) for _ in range(D)], axis=-2)

        o = take_time(E)
        final_state = take_state()
        dq, dk, dv = take_time(D), take_time(D), take_time(E)
        dg = take_time(1)[..., 0]
        dS0 = take_state()
        return ClosedFormOutputs(o, final_state, dq, dk, dv, dg, dS0)


@lru_cache(maxsize=None)
def closed_form(T: int, D: int, E: int) -> LAClosedForm:
    """The lambdified oracle for size (T, D, E) (derived once, then cached)."""
    s = la_symbols(T, D, E)
    forms = recurrent_forms(T, D, E)
    grads = loss_gradients(T, D, E)
    outputs = [
        *forms.o, *forms.final_state, *grads.dq, *grads.dk, *grads.dv, *grads.dg, *grads.dS0,
    ]
    function = sp.lambdify(s.arguments(), outputs, modules="numpy", cse=True)
    return LAClosedForm(T=T, D=D, E=E, function=function)
