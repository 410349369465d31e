"""Independent correct solvers of the inverse forms (SPEC §2), two per family, for calibration.

Written from other formulas than the built-ins (chunked substitution, compressed direct solve, chunked
per-step pinv) and the float64 references (``pinv`` of the dense map): each builds its own system from
the recurrence and solves it with a different routine.

- Type1 (V): the lower-triangular system ``P V = O/scale - diag(alpha) Q S_0``,
  ``P = (Q K^T) ⊙ exp(G_i - G_j)`` (masked before the exp, ``G = cumsum(g)``), solved by a dense
  triangular solve (``solve_triangular``, differentiated by autograd; LAPACK ``gelsd`` minimum-norm
  least squares by the pseudo-inverse of P where some ``q_t·k_t = 0``): in float64 (:func:`la_solve_v_dense_f64`) and in the
  accumulation dtype (:func:`la_solve_v_triangular_acc`).
- Type2 (K): the dense (T E) x (T D) map built from the recurrence, minimum-norm least squares by
  ``gelsd`` (SVD, divide and conquer): float64 (:func:`la_solve_k_dense_f64`), accumulation dtype
  (:func:`la_solve_k_lstsq_acc`).
- Type3 (Q): the states by the textbook recurrence, ``q_t = pinv(scale S_t^T) o_t`` per step with
  torch's default cut-off in float64 (:func:`la_solve_q_per_step_f64`, the issue's "textbook per-step
  pseudo-inverse"), and per-step ``gelsd`` in the accumulation dtype with the states from the closed form
  (:func:`la_solve_q_per_step_svd_acc`).
"""

from __future__ import annotations

import torch

__all__ = [
    "la_solve_k_dense_f64",
    "la_solve_k_lstsq_acc",
    "la_solve_q_per_step_f64",
    "la_solve_q_per_step_svd_acc",
    "la_solve_v_dense_f64",
    "la_solve_v_triangular_acc",
]

F64 = torch.float64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _hf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).transpose(1, 2)  # [B, T, H, *] -> [B, H, T, *]


def _decay(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """M [B, H, T, T] = exp(G_i - G_j) below the diagonal (masked to -inf before the exp), alpha = exp(G)."""
    G = g.to(dtype).transpose(1, 2).cumsum(-1)
    T = G.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
    M = torch.exp((G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~lower, float("-inf")))
    return M, torch.exp(G)


def _offset(Q, initial_state, alpha, dtype, E):
    """alpha_t Q_t S_0 on [B, H, T, D] (Q already cast once: two casts of one input would sum their gradients
    in the input dtype, where partial sums may overflow fp16 and meet as inf - inf)."""
    B, H, T, _ = Q.shape
    if initial_state is None:
        return torch.zeros(B, H, T, E, dtype=dtype, device=Q.device)
    return alpha.unsqueeze(-1) * (Q @ initial_state.to(dtype))


def _solve_v(q, k, o, g, initial_state, scale, dtype):
    M, alpha = _decay(g, dtype)
    Q, K, O = _hf(q, dtype), _hf(k, dtype), _hf(o, dtype)
    P = (Q @ K.transpose(-1, -2)) * M  # [B, H, T, T], lower triangular, diagonal q_t·k_t
    rhs = O / scale - _offset(Q, initial_state, alpha, dtype, O.shape[-1])
    singular = (torch.diagonal(P, dim1=-2, dim2=-1) == 0).any(-1)  # [B, H]
    V = torch.linalg.solve_triangular(torch.where(singular[..., None, None], torch.eye(P.shape[-1], dtype=dtype), P),
                                      rhs, upper=False)
    if bool(singular.any()):
        V = torch.where(singular[..., None, None], torch.linalg.pinv(P) @ rhs, V)
    return V.transpose(1, 2).to(q.dtype)


def la_solve_v_dense_f64(q, k, o, g, initial_state=None, *, scale=1.0):
    """Type1 by a dense float64 triangular solve of ``P V = O/scale - diag(alpha) Q S_0`` (autograd)."""
    return _solve_v(q, k, o, g, initial_state, scale, F64)


def la_solve_v_triangular_acc(q, k, o, g, initial_state=None, *, scale=1.0):
    """Type1 by the same triangular solve in the accumulation dtype (float32 for bf16/fp16)."""
    return _solve_v(q, k, o, g, initial_state, scale, _acc(q.dtype))


def _solve_k(q, v, o, g, initial_state, scale, dtype):
    M, alpha = _decay(g, dtype)
    Q, V, O = _hf(q, dtype), _hf(v, dtype), _hf(o, dtype)
    B, H, T, D = Q.shape
    E = V.shape[-1]
    # o_t[e] = scale * sum_{j <= t} M_tj v_j[e] (q_t · k_j) + scale * alpha_t (q_t S_0)[e]
    A = torch.einsum("bhtj,bhje,bhtd->bhtejd", M, V, Q) * scale
    A = A.reshape(B, H, T * E, T * D)
    rhs = (O - scale * _offset(Q, initial_state, alpha, dtype, E)).reshape(B, H, T * E, 1)
    if bool(torch.isfinite(rhs).all()):
        x = torch.linalg.lstsq(A, rhs, driver="gelsd").solution  # minimum norm, cut at eps * max(m, n)
    else:  # LAPACK's gelsd rejects non-finite data (an o that overflowed fp16): propagate it instead of raising
        x = torch.linalg.pinv(A) @ rhs
    return x.reshape(B, H, T, D).transpose(1, 2).to(q.dtype)


def la_solve_k_dense_f64(q, v, o, g, initial_state=None, *, scale=1.0):
    """Type2 by float64 minimum-norm least squares (LAPACK gelsd) of the dense map of K."""
    return _solve_k(q, v, o, g, initial_state, scale, F64)


def la_solve_k_lstsq_acc(q, v, o, g, initial_state=None, *, scale=1.0):
    """Type2 by gelsd in the accumulation dtype (float32 for bf16/fp16)."""
    return _solve_k(q, v, o, g, initial_state, scale, _acc(q.dtype))


def la_solve_q_per_step_f64(k, v, o, g, initial_state=None, *, scale=1.0):
    """Type3, the textbook way: states by the recurrence in float64, ``q_t = pinv(scale S_t^T) o_t`` per
    step with torch's default cut-off (``eps * max(D, E) * sigma_max(S_t)``)."""
    K, V, O = _hf(k, F64), _hf(v, F64), _hf(o, F64)
    lam = torch.exp(g.to(F64)).transpose(1, 2)
    B, H, T, D = K.shape
    E = V.shape[-1]
    S = torch.zeros(B, H, D, E, dtype=F64) if initial_state is None else initial_state.to(F64)
    states = []
    for t in range(T):
        S = lam[..., t, None, None] * S + K[..., t, :, None] * V[..., t, None, :]
        states.append(S)
    St = torch.stack(states, dim=2)  # [B, H, T, D, E]; one batched pinv over the steps
    q = (torch.linalg.pinv(scale * St.transpose(-1, -2)) @ O.unsqueeze(-1)).squeeze(-1)
    return q.transpose(1, 2).to(k.dtype)


def la_solve_q_per_step_svd_acc(k, v, o, g, initial_state=None, *, scale=1.0):
    """Type3 in the accumulation dtype: every state from the closed form
    ``S_t = alpha_t S_0 + sum_{j <= t} exp(G_t - G_j) k_j v_j^T``, then per-step gelsd with the cut-off
    ``4 (T + max(D, E)) eps`` (a state is a sum of up to T rounded rank-one terms)."""
    dtype = _acc(k.dtype)
    M, alpha = _decay(g, dtype)
    K, V, O = _hf(k, dtype), _hf(v, dtype), _hf(o, dtype)
    B, H, T, D = K.shape
    E = V.shape[-1]
    S = torch.einsum("bhtj,bhjd,bhje->bhtde", M, K, V)
    if initial_state is not None:
        S = S + alpha[..., None, None] * initial_state.to(dtype).unsqueeze(2)
    rcond = 4 * (T + max(D, E)) * torch.finfo(dtype).eps
    x = torch.linalg.lstsq(scale * S.transpose(-1, -2), O.unsqueeze(-1), rcond=rcond, driver="gelsd").solution
    return x.squeeze(-1).transpose(1, 2).to(k.dtype)
