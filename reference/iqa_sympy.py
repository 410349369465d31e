"""Sympy facts about implicit query attention (family ``iqa``, SPEC §3–§4) for small sizes.

Per batch element, with symbolic ``x: [N, Din]``, ``w_q: [E, Dk]``, ``w_k: [Din, Dk]``, ``w_v: [Din, E]``
(or ``V = x``), score scale ``s`` and ``y: [N, E]``::

    K = x w_k,  V = x w_v,  S = s K (y w_q)^T,  p_ij = exp(S_ij) / sum_l exp(S_il),  f(y) = P V

* :func:`prove_softmax_jacobian`: ``∂p/∂z = diag(p) - p p^T`` for ``p = softmax(z)`` (derived by
  ``sympy.diff``, compared entry by entry).
* :func:`prove_consensus`: for *every* input and weight (all entries free symbols) ``y = 1 mean_j(v_j)^T``
  satisfies ``f(y) = y``, and ``∂f/∂w_q = ∂f/∂w_k = 0`` at every ``y`` with equal rows ``y = 1 c^T``
  (c free). So at the consensus point the IFT gradient ``u^T ∂f/∂w_{q,k}`` vanishes for any adjoint u —
  in particular in the contractive case, where consensus is the unique fixed point.
* :func:`two_token_oracle`: N = 2 tokens of dimension 1 (Din = Dk = E = 1). The symbolic Jacobians
  ``∂f/∂y`` and ``∂f/∂θ`` (θ = x_1, x_2, w_q, w_k[, w_v]) are evaluated with mpmath at a fixed point found
  by ``mpmath.findroot`` at 50 digits; the implicit gradient of ``L = <g, y*>`` is
  ``((I - ∂f/∂y)^{-T} g)^T ∂f/∂θ``. An oracle for the float64 reference to ~1e-12.

Derivations are cached per size and variant (:func:`functools.lru_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mpmath
import sympy as sp
import torch

from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = [
    "MAX_SIZE",
    "ORACLE_DPS",
    "ConsensusProof",
    "TwoTokenOracle",
    "iqa_symbolic_map",
    "symbolic_matrix",
    "prove_consensus",
    "prove_softmax_jacobian",
    "two_token_oracle",
]

#: Largest N, Din, Dk, E accepted by the symbolic proofs (keeps each derivation to seconds).
MAX_SIZE = 3
#: Working precision (decimal digits) of the mpmath oracle.
ORACLE_DPS = 50


def symbolic_matrix(name: str, rows: int, cols: int) -> sp.Matrix:
    """A [rows, cols] matrix of real symbols ``name_ij``."""
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}{j}", real=True))


def _softmax_rows(S: sp.Matrix) -> sp.Matrix:
    P = sp.zeros(*S.shape)
    for i in range(S.rows):
        den = sum(sp.exp(S[i, l]) for l in range(S.cols))
        for j in range(S.cols):
            P[i, j] = sp.exp(S[i, j]) / den
    return P


def iqa_symbolic_map(y: sp.Matrix, x: sp.Matrix, w_q: sp.Matrix, w_k: sp.Matrix, w_v: sp.Matrix | None, s) -> sp.Matrix:
    """``f(y) = softmax(s K (y w_q)^T) V`` as a sympy Matrix ``[N, E]``."""
    K = x * w_k
    V = x * w_v if w_v is not None else x
    return _softmax_rows(s * K * (y * w_q).T) * V


@lru_cache(maxsize=None)
def prove_softmax_jacobian(n: int = 3) -> bool:
    """True iff ``jacobian(softmax(z), z) - (diag(p) - p p^T)`` simplifies to zero for symbolic ``z: [n]``."""
    check_at_least("n", n, 1, "softmax length")
    z = sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"z_{i}", real=True))
    p = _softmax_rows(z.T).T
    derived = p.jacobian(z)
    closed = sp.diag(*p) - p * p.T
    return all(sp.simplify(e) == 0 for e in derived - closed)


@dataclass(frozen=True)
class ConsensusProof:
    """What :func:`prove_consensus` established (each True when the simplified difference is 0)."""

    fixed_point: bool
    grad_w_q_zero: bool
    grad_w_k_zero: bool

    @property
    def holds(self) -> bool:
        return self.fixed_point and self.grad_w_q_zero and self.grad_w_k_zero


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_at_least(name, value, 1, "symbolic size")
        if value > MAX_SIZE:
            raise IqaVerifyError(f"{name}={value}: symbolic proofs support sizes <= {MAX_SIZE}")


def _is_zero(e: sp.Expr) -> bool:
    return e == 0 or sp.simplify(sp.expand(e)) == 0


@lru_cache(maxsize=None)
def prove_consensus(N: int = 3, Din: int = 2, Dk: int = 2, E: int = 2, value_projection: bool = True) -> ConsensusProof:
    """Prove SPEC §4 symbolically for all entries free: ``f(1 mean(V)^T) = 1 mean(V)^T`` and
    ``∂f/∂w_q = ∂f/∂w_k = 0`` at ``y = 1 c^T`` for a free ``c: [E]`` (hence at consensus).
    Without a value projection ``E = Din`` (the argument E is ignored)."""
    E = E if value_projection else Din
    _check_sizes(N=N, Din=Din, Dk=Dk, E=E)
    x, wq, wk = symbolic_matrix("x", N, Din), symbolic_matrix("wq", E, Dk), symbolic_matrix("wk", Din, Dk)
    wv = symbolic_matrix("wv", Din, E) if value_projection else None
    s = sp.Symbol("s", real=True)
    V = x * wv if wv is not None else x
    mean = sp.ones(1, N) * V / N
    y_cons = sp.ones(N, 1) * mean
    fixed = all(_is_zero(e) for e in iqa_symbolic_map(y_cons, x, wq, wk, wv, s) - y_cons)

    c = sp.Matrix(1, E, lambda _, j: sp.Symbol(f"c_{j}", real=True))
    y_sym = symbolic_matrix("y", N, E)
    f = iqa_symbolic_map(y_sym, x, wq, wk, wv, s)
    at_equal_rows = dict(zip(y_sym, sp.ones(N, 1) * c))

    def vanishes(w: sp.Matrix) -> bool:
        return all(_is_zero(sp.diff(fe, we).subs(at_equal_rows)) for fe in f for we in w)

    return ConsensusProof(fixed_point=fixed, grad_w_q_zero=vanishes(wq), grad_w_k_zero=vanishes(wk))


@lru_cache(maxsize=None)
def _two_token_forms(value_projection: bool):
    x1, x2, wq, wk, s = sp.symbols("x1 x2 wq wk s", real=True)
    wv = sp.Symbol("wv", real=True) if value_projection else None
    y1, y2 = sp.symbols("y1 y2", real=True)
    y = sp.Matrix([[y1], [y2]])
    f = iqa_symbolic_map(
        y, sp.Matrix([[x1], [x2]]), sp.Matrix([[wq]]), sp.Matrix([[wk]]), sp.Matrix([[wv]]) if wv is not None else None, s
    )
    theta = [x1, x2, wq, wk] + ([wv] if wv is not None else [])
    args = [y1, y2, *theta, s]
    lam = lambda expr: sp.lambdify(args, expr, modules="mpmath")  # noqa: E731
    return lam(f), lam(f.jacobian(y)), lam(f.jacobian(sp.Matrix(theta))), len(theta)


@dataclass(frozen=True)
class TwoTokenOracle:
    """A 50-digit fixed point and implicit gradient for N = 2, Din = Dk = E = 1 (float64 tensors shaped
    like the contract: y [1, 2, 1], x [1, 2, 1], w_q/w_k/w_v [1, 1]); residual: ``max |y - f(y)|``."""

    y: torch.Tensor
    grad_x: torch.Tensor
    grad_w_q: torch.Tensor
    grad_w_k: torch.Tensor
    grad_w_v: torch.Tensor | None
    residual: float


def two_token_oracle(
    x: tuple[float, float], w_q: float, w_k: float, w_v: float | None, scale: float,
    g: tuple[float, float], y0: tuple[float, float],
) -> TwoTokenOracle:
    """Fixed point of the N = 2 scalar problem by ``mpmath.findroot`` from ``y0`` (50 digits) and the
    implicit gradient of ``L = g_1 y_1 + g_2 y_2`` there. ``w_v=None``: values ``V = x``."""
    f, jy, jt, n_theta = _two_token_forms(w_v is not None)
    with mpmath.workdps(ORACLE_DPS):
        theta = [mpmath.mpf(v) for v in (*x, w_q, w_k)] + ([mpmath.mpf(w_v)] if w_v is not None else [])
        s = mpmath.mpf(scale)

        def residual(y1, y2):
            fy = f(y1, y2, *theta, s)
            return [y1 - fy[0], y2 - fy[1]]

        root = mpmath.findroot(residual, [mpmath.mpf(v) for v in y0], tol=mpmath.mpf(10) ** (-2 * ORACLE_DPS + 10))
        y1, y2 = root[0], root[1]
        res = max(abs(r) for r in residual(y1, y2))
        A = mpmath.eye(2) - mpmath.matrix(jy(y1, y2, *theta, s))
        u = mpmath.lu_solve(A.T, mpmath.matrix([mpmath.mpf(g[0]), mpmath.mpf(g[1])]))
        grads = (u.T * mpmath.matrix(jt(y1, y2, *theta, s)))
        gl = [float(grads[0, i]) for i in range(n_theta)]
    t = lambda vals, shape: torch.tensor(vals, dtype=torch.float64).reshape(shape)  # noqa: E731
    return TwoTokenOracle(
        y=t([float(y1), float(y2)], (1, 2, 1)),
        grad_x=t(gl[0:2], (1, 2, 1)),
        grad_w_q=t(gl[2:3], (1, 1)),
        grad_w_k=t(gl[3:4], (1, 1)),
        grad_w_v=t(gl[4:5], (1, 1)) if w_v is not None else None,
        residual=float(res),
    )
