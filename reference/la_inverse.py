"""Float64 references for the inverse forms of linear attention with decay (SPEC §2).

The forward map (SPEC §1), per batch and head, with Q, K: [T, D], V, O: [T, E], S_0: [D, E]::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t
    O   = scale * ( [(Q K^T) ⊙ M] V + diag(alpha) Q S_0 ),   alpha_i = exp(b_i),  b = cumsum(g)
    M_ij = exp(sum_{j < s <= i} g_s)  for i >= j,  0 above the diagonal

is affine in each of V, K and Q separately: ``vec(O) = A vec(X) + c`` with ``vec`` row-major over
``[T, n]`` (index ``t * n + i``). :func:`la_linear_map` builds ``A`` [B, H, T*E, T*n] and ``c``
[B, H, T*E] explicitly; the dense references return the minimum-norm least-squares solution
``pinv(A) (vec(O) - c)`` (the contract of every inverse kernel):

* Type1, unknown V (n = E):  ``A = scale * P ⊗ I_E``, ``P = (Q K^T) ⊙ M`` lower triangular with
  diagonal ``q_t · k_t``;  ``c = scale * vec(diag(alpha) Q S_0)``.
* Type2, unknown K (n = D):  ``A[(t, e), (j, d)] = scale * M_tj * v_j[e] * q_t[d]``;  same ``c``.
* Type3, unknown Q (n = D):  block diagonal, ``A[(t, e), (t, d)] = scale * S_t[d, e]``;  ``c = 0``.

Structured references (same results where both apply):

* :func:`la_solve_v_substitution_ref`: forward substitution
  ``v_t = (o_t / scale - exp(g_t) S_{t-1}^T q_t) / (q_t · k_t)``, one step at a time.
* :func:`la_solve_q_per_step_ref`: ``q_t = pinv(scale * S_t^T) o_t`` per step.
* :func:`la_solve_k_recursion_ref`: the design notes' Type2 recursion (exact for E = 1 only):
  ``s_t = q_t o_t^T / (scale |q_t|^2)``, ``k_t = (s_t - exp(g_t) s_{t-1}) v_t / |v_t|^2``, ``s_0 = S_0``.

Every function takes inputs of any one floating dtype, computes in float64 and returns float64; all
are differentiable by autograd. Pseudo-inverses use torch's default cut-off (singular values below
``eps(float64) * max(m, n) * sigma_max`` count as zero). Dense references are O((T n)^3): small sizes only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from iqa_verify.errors import IqaVerifyError

__all__ = [
    "LinearMap",
    "Unknown",
    "la_linear_map",
    "la_solve_k_dense_ref",
    "la_solve_k_recursion_ref",
    "la_solve_q_dense_ref",
    "la_solve_q_per_step_ref",
    "la_solve_v_dense_ref",
    "la_solve_v_substitution_ref",
    "la_states_ref",
]

F64 = torch.float64


class Unknown(enum.Enum):
    """Which input of the forward is solved for: V (Type1), K (Type2) or Q (Type3)."""

    V = "v"
    K = "k"
    Q = "q"


@dataclass(frozen=True)
class LinearMap:
    """``vec(O) = matrix @ vec(X) + offset`` per batch and head (row-major ``vec`` over time, then dim).

    unknown: which input X is; matrix: [B, H, T*E, T*n]; offset: [B, H, T*E]; n: the unknown's last
    dimension (E for V, D for K and Q); e: the output's last dimension E. float64.
    """

    unknown: Unknown
    matrix: torch.Tensor
    offset: torch.Tensor
    n: int
    e: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """O = A X + c: x [B, T, H, n] -> o [B, T, H, E] (float64)."""
        B, T, H, _ = x.shape
        flat = x.to(F64).transpose(1, 2).reshape(B, H, T * self.n, 1)
        o = (self.matrix @ flat).squeeze(-1) + self.offset
        return o.reshape(B, H, T, self.e).transpose(1, 2)

    def rhs(self, o: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
        """b = vec(O) - c: o [B, T, H, E] -> [B, H, T*E], formed in ``dtype`` (float64 by default; o and c are
        rounded to it first, so a lower dtype carries the cancellation error a kernel working in it pays)."""
        B, T, H, E = o.shape
        return o.to(dtype).transpose(1, 2).reshape(B, H, T * E) - self.offset.to(dtype)

    def solve(self, o: torch.Tensor) -> torch.Tensor:
        """Minimum-norm least squares ``pinv(A) (vec(O) - c)``: o [B, T, H, E] -> x [B, T, H, n].

        Multiplying by an explicitly formed pseudo-inverse leaves a residual of ``eps kappa ‖b‖`` (each entry of
        ``pinv(A)`` is off by ``eps / sigma_min``), not the ``eps ‖A‖ ‖x‖`` of a backward-stable solve: at
        kappa ~1e11 that is 1e5 times what a correct kernel leaves, and the properties would read it as an
        inconsistent part of o. One step of refinement, ``x += pinv(A) (b - A x)``, brings it to rounding
        level; in exact arithmetic the step adds ``pinv(A)(I - A pinv(A)) b = 0`` (minimum-norm least squares
        included), so the answer and its autograd derivatives are those of ``pinv(A) b``."""
        B, T, H, _ = o.shape
        pinv, b = torch.linalg.pinv(self.matrix), self.rhs(o).unsqueeze(-1)
        x = pinv @ b
        x = x + pinv @ (b - self.matrix @ x)
        return x.squeeze(-1).reshape(B, H, T, self.n).transpose(1, 2)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, T, ...] in float64."""
    return x.to(F64).transpose(1, 2)


def _decay_matrix(g: torch.Tensor) -> torch.Tensor:
    """g [B, T, H] -> M [B, H, T, T]: exp(sum_{j < s <= i} g_s) for i >= j, exactly 0 above.

    The exponent is a cumulative sum of a strictly-lower copy of g (never a difference of two
    cumulative sums), masked to -inf above the diagonal before the exp.
    """
    G = g.to(F64).transpose(1, 2)  # [B, H, T]
    T = G.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=G.device)
    seg = torch.where(ones.tril(-1), G.unsqueeze(-1), torch.zeros((), dtype=F64, device=G.device)).cumsum(-2)
    return torch.exp(seg.masked_fill(~ones.tril(), float("-inf")))


def _alpha(g: torch.Tensor) -> torch.Tensor:
    """alpha_t = exp(g_1 + ... + g_t): g [B, T, H] -> [B, H, T]."""
    return torch.exp(g.to(F64).transpose(1, 2).cumsum(-1))


def _initial_offset(q: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None, E: int, scale: float) -> torch.Tensor:
    """c = scale * vec(diag(alpha) Q S_0): [B, H, T*E] (zeros without an initial state)."""
    B, T, H, _ = q.shape
    if initial_state is None:
        return torch.zeros(B, H, T * E, dtype=F64, device=q.device)
    c = scale * _alpha(g).unsqueeze(-1) * (_heads_first(q) @ initial_state.to(F64))  # [B, H, T, E]
    return c.reshape(B, H, T * E)


def la_states_ref(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """All states ``S_t = alpha_t S_0 + sum_{j <= t} M_tj k_j v_j^T``: [B, H, T, D, E], float64.

    k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    """
    M = _decay_matrix(g)
    S = torch.einsum("bhtj,bhjd,bhje->bhtde", M, _heads_first(k), _heads_first(v))
    if initial_state is not None:
        S = S + _alpha(g)[..., None, None] * initial_state.to(F64).unsqueeze(2)
    return S


def la_linear_map(
    unknown: Unknown,
    a: torch.Tensor,
    b: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> LinearMap:
    """The affine map ``vec(O) = A vec(X) + c`` of the forward in one unknown X.

    The knowns come in the order of the matching solver: ``(q, k)`` for :attr:`Unknown.V`,
    ``(q, v)`` for :attr:`Unknown.K`, ``(k, v)`` for :attr:`Unknown.Q`; o [B, T, H, E] gives E
    (its values are not used); g [B, T, H]; initial_state [B, H, D, E] or None. See the module
    docstring for A and c. Returns a float64 :class:`LinearMap`.
    """
    if not isinstance(unknown, Unknown):
        raise IqaVerifyError(f"unknown={unknown!r}: must be an Unknown (V, K or Q)")
    B, T, H, E = o.shape
    M = _decay_matrix(g)  # [B, H, T, T]
    if unknown is Unknown.V:
        q, k = _heads_first(a), _heads_first(b)
        P = scale * (q @ k.transpose(-1, -2)) * M
        eye = torch.eye(E, dtype=F64, device=o.device)
        A = torch.einsum("bhtj,ef->bhtejf", P, eye).reshape(B, H, T * E, T * E)
        return LinearMap(unknown, A, _initial_offset(a, g, initial_state, E, scale), E, E)
    if unknown is Unknown.K:
        q, v = _heads_first(a), _heads_first(b)
        D = q.shape[-1]
        A = scale * torch.einsum("bhtj,bhje,bhtd->bhtejd", M, v, q).reshape(B, H, T * E, T * D)
        return LinearMap(unknown, A, _initial_offset(a, g, initial_state, E, scale), D, E)
    S = la_states_ref(a, b, g, initial_state)  # [B, H, T, D, E]
    D = S.shape[-2]
    eye = torch.eye(T, dtype=F64, device=o.device)
    A = scale * torch.einsum("tj,bhtde->bhtejd", eye, S).reshape(B, H, T * E, T * D)
    return LinearMap(unknown, A, torch.zeros(B, H, T * E, dtype=F64, device=o.device), D, E)


def la_solve_v_dense_ref(q, k, o, g, initial_state=None, *, scale: float = 1.0, cu_seqlens=None) -> torch.Tensor:
    """Type1 reference: minimum-norm least-squares V of ``la_forward(q, k, V, g, S_0)[0] = o``.

    q, k: [B, T, H, D]; o: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    Returns v [B, T, H, E], float64: ``pinv(scale * P ⊗ I_E) (vec(O) - c)``.

    Packed batch (SPEC §6): with ``cu_seqlens`` int64 [N + 1], B = 1 and initial_state [N, H, D, E] or None.
    The packed system is block diagonal (no state crosses a sequence boundary), so its minimum-norm
    least-squares solution is, sequence by sequence, the minimum-norm solution of sequence i's own system
    on positions ``[cu[i], cu[i+1])`` from ``initial_state[i]``. Padding positions (``>= cu[N]``) belong to no
    system: v there is 0 and depends on nothing (every gradient at padding is exactly 0); a kernel's padding
    outputs are not judged.
    """
    if cu_seqlens is None:
        return la_linear_map(Unknown.V, q, k, o, g, initial_state, scale=scale).solve(o)
    cu = [int(c) for c in cu_seqlens.tolist()]
    parts = []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        s0 = initial_state[i:i + 1] if initial_state is not None else None
        qi, ki, oi, gi = (x[:, a:b] for x in (q, k, o, g))
        parts.append(la_linear_map(Unknown.V, qi, ki, oi, gi, s0, scale=scale).solve(oi))
    T = o.shape[1]
    if cu[-1] < T:
        parts.append(torch.zeros((1, T - cu[-1], *o.shape[2:]), dtype=F64, device=o.device))
    return torch.cat(parts, dim=1)


def la_solve_k_dense_ref(q, v, o, g, initial_state=None, *, scale: float = 1.0) -> torch.Tensor:
    """Type2 reference: minimum-norm least-squares K of ``la_forward(q, K, v, g, S_0)[0] = o``.

    q: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    Returns k [B, T, H, D], float64: ``pinv(A) (vec(O) - c)`` of the (T E) x (T D) system.
    """
    return la_linear_map(Unknown.K, q, v, o, g, initial_state, scale=scale).solve(o)


def la_solve_q_dense_ref(k, v, o, g, initial_state=None, *, scale: float = 1.0) -> torch.Tensor:
    """Type3 reference: minimum-norm least-squares Q of ``la_forward(Q, k, v, g, S_0)[0] = o``.

    k: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    Returns q [B, T, H, D], float64: ``pinv(A) vec(O)`` with A block diagonal (blocks scale * S_t^T).
    """
    return la_linear_map(Unknown.Q, k, v, o, g, initial_state, scale=scale).solve(o)


def la_solve_v_substitution_ref(q, k, o, g, initial_state=None, *, scale: float = 1.0) -> torch.Tensor:
    """Type1 by forward substitution, one step at a time (float64)::

        S_0 = initial_state (zeros if None)
        v_t = (o_t / scale - exp(g_t) S_{t-1}^T q_t) / (q_t · k_t)
        S_t = exp(g_t) S_{t-1} + k_t v_t^T

    q, k: [B, T, H, D]; o: [B, T, H, E]; g: [B, T, H]. Returns v [B, T, H, E], float64. Only for
    non-singular systems: raises IqaVerifyError naming the first step with ``q_t · k_t = 0``.
    """
    Q, K, O = _heads_first(q), _heads_first(k), _heads_first(o)
    lam = torch.exp(g.to(F64)).transpose(1, 2)  # [B, H, T]
    B, H, T, D = Q.shape
    E = O.shape[-1]
    diag = (Q * K).sum(-1)  # [B, H, T]
    zero = (diag == 0).nonzero()
    if len(zero):
        b, h, t = (int(i) for i in zero[0])
        raise IqaVerifyError(f"t={t}: q_t·k_t = 0 (batch {b}, head {h}); the substitution reference needs a non-singular system")
    S = torch.zeros(B, H, D, E, dtype=F64, device=q.device) if initial_state is None else initial_state.to(F64)
    out = []
    for t in range(T):
        carried = lam[..., t, None, None] * S  # exp(g_t) S_{t-1}
        qt = Q[..., t, :]
        vt = (O[..., t, :] / scale - (qt.unsqueeze(-2) @ carried).squeeze(-2)) / diag[..., t, None]
        S = carried + K[..., t, :, None] * vt[..., None, :]
        out.append(vt)
    return torch.stack(out, dim=1)


def la_solve_q_per_step_ref(k, v, o, g, initial_state=None, *, scale: float = 1.0) -> torch.Tensor:
    """Type3 per step: ``q_t = pinv(scale * S_t^T) o_t`` with S_t from :func:`la_states_ref`.

    k: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None.
    Returns q [B, T, H, D], float64 (minimum-norm per step; rank-deficient S_t allowed).
    """
    S = la_states_ref(k, v, g, initial_state)  # [B, H, T, D, E]
    q = torch.linalg.pinv(scale * S.transpose(-1, -2)) @ _heads_first(o).unsqueeze(-1)  # [B, H, T, D, 1]
    return q.squeeze(-1).transpose(1, 2)


def la_solve_k_recursion_ref(q, v, o, g, initial_state=None, *, scale: float = 1.0) -> torch.Tensor:
    """The design notes' Type2 recursion (float64). Exact (reproduces O) for E = 1 only; see SPEC §2::

        s_0 = S_0 (zeros if None)
        s_t = q_t o_t^T / (scale |q_t|^2)                       minimum-norm state fitting o_t alone
        k_t = (s_t - exp(g_t) s_{t-1}) v_t / |v_t|^2            rank-one fit of the state increment

    q: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H]. Returns k [B, T, H, D], float64. For E > 1 the
    increment ``s_t - exp(g_t) s_{t-1}`` is not rank one along v_t and its projection loses the rest,
    so ``la_forward(q, k, v, g)`` differs from O by tens of percent even for consistent O.
    """
    Q, V, O = _heads_first(q), _heads_first(v), _heads_first(o)
    lam = torch.exp(g.to(F64)).transpose(1, 2)  # [B, H, T]
    s = Q.unsqueeze(-1) * O.unsqueeze(-2) / (scale * (Q * Q).sum(-1)[..., None, None])  # [B, H, T, D, E]
    if initial_state is None:
        first = torch.zeros_like(s[:, :, :1])
    else:
        first = initial_state.to(F64).unsqueeze(2)
    prev = torch.cat([first, s[:, :, :-1]], dim=2)  # s_{t-1}
    incr = s - lam[..., None, None] * prev
    k = (incr @ V.unsqueeze(-1)).squeeze(-1) / (V * V).sum(-1, keepdim=True)
    return k.transpose(1, 2)
