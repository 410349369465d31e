"""Planted bugs in inverse-form solvers (``la-solve-v``, ``la-solve-k``, ``la-solve-q``); each must be caught
by ``iqa-verify check`` in the ci profile, by the properties listed in :data:`BUGS`.

Every bug is a plausible mistake planted in a small, otherwise correct solver: forward substitution for
V (:func:`_substitute`), per-step least squares for Q (:func:`_per_step`), a dense least-squares solve
for K (:func:`_dense_k`). Each public function has its family's contract signature, so a person can
run one by hand::

    iqa-verify check tests/bug_zoo/la_inverse.py:v_decay_forgotten --family la-solve-v
"""

from __future__ import annotations

import torch

from iqa_verify.contracts import state_dtype_for
from iqa_verify.kernels.la_solve_k import la_solve_k_recursion
from iqa_verify.reference.la_inverse import Unknown, la_linear_map
from tests.bug_zoo.planted import PlantedBug

__all__ = ["BUGS"]


def _heads_first(acc, *xs):
    return tuple(x.to(acc).transpose(1, 2) for x in xs)  # [B, T, H, *] -> [B, H, T, *]


def _substitute(q, k, o, g, initial_state, scale, bug: str = ""):
    """Type1 forward substitution with ``bug`` planted; singular steps (q_t·k_t = 0) are redone by the
    dense minimum-norm least squares of the whole batch-head, unless the bug says otherwise::

        v_t = (o_t / scale - exp(g_t) S_{t-1}^T q_t) / (q_t · k_t),   S_t = exp(g_t) S_{t-1} + k_t v_t^T
    """
    acc = state_dtype_for(q.dtype)
    Q, K, O = _heads_first(acc, q, k, o)
    G = g.to(acc).transpose(1, 2)
    B, H, T, D = Q.shape
    E = O.shape[-1]
    S = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    if initial_state is not None and bug != "initial-state-ignored":
        S = initial_state.to(acc)
    pivot = (Q * K).sum(-1)  # [B, H, T]
    if bug == "wrong-pivot":  # |q_t| |k_t| in place of q_t · k_t
        pivot = Q.norm(dim=-1) * K.norm(dim=-1)
    singular = (Q * K).sum(-1).abs() <= D * torch.finfo(acc).eps * (Q * K).abs().sum(-1)
    if bug == "pivot-detached":  # the pivots taken as constants of the solve: dq, dk lose the -v_t / (q_t·k_t) term
        pivot = pivot.detach()
    safe = pivot if bug == "exact-inverse" else torch.where(singular, torch.ones_like(pivot), pivot)
    lam = torch.ones_like(G) if bug == "decay-forgotten" else torch.exp(G)
    rhs_scale = 1.0 if bug == "scale-ignored" else scale
    out = []
    for t in range(T):
        carried = lam[..., t, None, None] * S
        v_t = (O[..., t, :] / rhs_scale - (Q[..., t, None, :] @ carried).squeeze(-2)) / safe[..., t, None]
        if bug == "singular-step-zeroed":  # a least-squares fix-up that is not minimum-norm
            v_t = torch.where(singular[..., t, None], torch.zeros_like(v_t), v_t)
        S = carried + K[..., t, :, None] * v_t[..., None, :]
        if bug == "state-in-input-dtype":  # the carried state stored in the input dtype every step
            S = S.to(q.dtype).to(acc)
        out.append(v_t)
    V = torch.stack(out, dim=2)
    if bug not in ("exact-inverse", "singular-step-zeroed"):
        V = _dense_heads(V, singular.any(-1), Unknown.V, q, k, o, g, initial_state, scale, acc)
    return V.transpose(1, 2).to(q.dtype)


def _dense_heads(X, bad, unknown, a, b, o, g, initial_state, scale, acc):
    """Replace the batch-heads in ``bad`` [B, H] by the dense minimum-norm least-squares solution."""
    if not bool(bad.any()):
        return X
    lm = la_linear_map(unknown, a, b, o, g, initial_state, scale=scale)
    x = torch.linalg.pinv(lm.matrix.to(acc)) @ lm.rhs(o).to(acc).unsqueeze(-1)
    B, H, T, n = X.shape
    return torch.where(bad[..., None, None], x.reshape(B, H, T, n), X)


def _per_step(k, v, o, g, initial_state, scale, bug: str = ""):
    """Type3 per step with ``bug`` planted: ``q_t = pinv(scale * S_t^T) o_t``, cut-off 64 max(D, E) eps."""
    acc = state_dtype_for(k.dtype)
    K, V, O = _heads_first(acc, k, v, o)
    G = g.to(acc).transpose(1, 2)
    B, H, T, D = K.shape
    E = V.shape[-1]
    S = torch.zeros(B, H, D, E, dtype=acc, device=k.device)
    if initial_state is not None and bug != "initial-state-ignored":
        S = initial_state.to(acc)
    lam = torch.ones_like(G) if bug == "decay-forgotten" else torch.exp(G)
    states = []
    for t in range(T):
        previous = S
        S = lam[..., t, None, None] * S + K[..., t, :, None] * V[..., t, None, :]
        states.append(previous if bug == "state-before-update" else S)
    St = torch.stack(states, dim=2).transpose(-1, -2)  # [B, H, T, E, D]
    if bug != "scale-ignored":
        St = scale * St
    rhs = O.unsqueeze(-1)
    if bug == "exact-inverse":  # normal equations with an inverse: singular when S_t is rank deficient
        Qs = torch.linalg.inv(St.transpose(-1, -2) @ St) @ St.transpose(-1, -2) @ rhs
    else:
        Qs = torch.linalg.pinv(St, rtol=64 * max(D, E) * torch.finfo(acc).eps) @ rhs
    return Qs.squeeze(-1).transpose(1, 2).to(k.dtype)


def _cgls(A, b, steps: int):
    """Conjugate gradients on the normal equations A^T A x = A^T b from x = 0, a fixed number of steps."""
    x = torch.zeros(*A.shape[:-2], A.shape[-1], 1, dtype=A.dtype, device=A.device)
    r = b.clone()
    s = A.transpose(-1, -2) @ r
    p, gamma = s, s.square().sum((-1, -2), keepdim=True)
    for _ in range(steps):
        w = A @ p
        alpha = gamma / w.square().sum((-1, -2), keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
        x, r = x + alpha * p, r - alpha * w
        s = A.transpose(-1, -2) @ r
        gamma_next = s.square().sum((-1, -2), keepdim=True)
        p, gamma = s + gamma_next / gamma.clamp_min(torch.finfo(A.dtype).tiny) * p, gamma_next
    return x


def _dense_k(q, v, o, g, initial_state, scale, bug: str = ""):
    """Type2 by a dense least-squares solve in the accumulation dtype, with ``bug`` planted."""
    acc = state_dtype_for(q.dtype)
    g_used = torch.zeros_like(g) if bug == "decay-forgotten" else g
    s0 = None if bug == "initial-state-ignored" else initial_state
    lm = la_linear_map(Unknown.K, q, v, o, g_used, s0, scale=scale)
    A, b = lm.matrix.to(acc), lm.rhs(o).to(acc).unsqueeze(-1)
    if bug == "exact-inverse":  # (A^T A)^-1 A^T b: the pseudo-inverse is needed when A lacks full column rank
        x = torch.linalg.inv(A.transpose(-1, -2) @ A) @ (A.transpose(-1, -2) @ b)
    elif bug == "stopped-early":  # CGLS capped at half the steps it needs in exact arithmetic
        x = _cgls(A, b, max(1, A.shape[-1] // 2))
    else:
        x = torch.linalg.pinv(A) @ b
    B, T, H, _ = o.shape
    return x.reshape(B, H, T, lm.n).transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------ the zoo: one kernel per bug


def v_decay_forgotten(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "decay-forgotten")


def v_state_in_input_dtype(q, k, o, g, initial_state=None, *, scale=1.0):
    """fp16 inputs, float32 arithmetic, but the state carried between steps is stored in fp16. Where an
    ill-conditioned chain drives the answer past fp16's range (65504), the state it carries overflows with it and
    the next step computes inf - inf: NaN where a correct kernel returns +-inf (the pinned overflow case of
    la-solve-v, so at every seed), and NaN gradients where the backward's states overflow (``finite``)."""
    return _substitute(q, k, o, g, initial_state, scale, "state-in-input-dtype")


def v_state_in_bf16(q, k, o, g, initial_state=None, *, scale=1.0):
    """bf16 inputs, float32 arithmetic, the carried state stored in bf16 every step: each v_t loses eps_bf16 times
    the carried term S_{t-1}^T q_t / (q_t·k_t), about two ulps of v at ci sizes. The normwise bound (kappa ‖x‖
    spread over all T·E entries, on top of one eps_bf16 relative) let it pass (worst ratio 0.86, issue #14);
    the componentwise (Skeel) bound of Type1 catches it."""
    return _substitute(q, k, o, g, initial_state, scale, "state-in-input-dtype")


def v_pivot_detached(q, k, o, g, initial_state=None, *, scale=1.0):
    """Values exact; in the backward the pivots q_t·k_t are constants, so dq and dk miss the term through them.
    Judged by ``gradients`` with the solution-rounding natural scale in the allowance (it must not hide it)."""
    return _substitute(q, k, o, g, initial_state, scale, "pivot-detached")


def v_initial_state_ignored(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "initial-state-ignored")


def v_scale_ignored(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "scale-ignored")


def v_wrong_pivot(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "wrong-pivot")


def v_exact_inverse(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "exact-inverse")


def v_singular_step_zeroed(q, k, o, g, initial_state=None, *, scale=1.0):
    return _substitute(q, k, o, g, initial_state, scale, "singular-step-zeroed")


def q_decay_forgotten(k, v, o, g, initial_state=None, *, scale=1.0):
    return _per_step(k, v, o, g, initial_state, scale, "decay-forgotten")


def q_initial_state_ignored(k, v, o, g, initial_state=None, *, scale=1.0):
    return _per_step(k, v, o, g, initial_state, scale, "initial-state-ignored")


def q_scale_ignored(k, v, o, g, initial_state=None, *, scale=1.0):
    return _per_step(k, v, o, g, initial_state, scale, "scale-ignored")


def q_state_before_update(k, v, o, g, initial_state=None, *, scale=1.0):
    return _per_step(k, v, o, g, initial_state, scale, "state-before-update")


def q_exact_inverse(k, v, o, g, initial_state=None, *, scale=1.0):
    return _per_step(k, v, o, g, initial_state, scale, "exact-inverse")


def k_greedy_recursion(q, v, o, g, initial_state=None, *, scale=1.0):
    """The design notes' step-wise recursion (exact for E = 1 only)."""
    return la_solve_k_recursion(q, v, o, g, initial_state, scale=scale)


def k_decay_forgotten(q, v, o, g, initial_state=None, *, scale=1.0):
    return _dense_k(q, v, o, g, initial_state, scale, "decay-forgotten")


def k_initial_state_ignored(q, v, o, g, initial_state=None, *, scale=1.0):
    return _dense_k(q, v, o, g, initial_state, scale, "initial-state-ignored")


def k_exact_inverse(q, v, o, g, initial_state=None, *, scale=1.0):
    return _dense_k(q, v, o, g, initial_state, scale, "exact-inverse")


def k_stopped_early(q, v, o, g, initial_state=None, *, scale=1.0):
    """CGLS stopped after half the steps it needs: a solver that reports an answer before it has one."""
    return _dense_k(q, v, o, g, initial_state, scale, "stopped-early")


def _b(name: str, family: str, props: tuple[str, ...], kind: str, dtype: str = "float32") -> PlantedBug:
    return PlantedBug(__file__, family, name, dtype, tuple(f"{family}/{p}" for p in props), kind)


V, K, Q = "la-solve-v", "la-solve-k", "la-solve-q"

BUGS: tuple[PlantedBug, ...] = (
    _b("v_decay_forgotten", V, ("backward-error", "o-roundtrip"), "decay of the carried state forgotten"),
    _b("v_initial_state_ignored", V, ("backward-error",), "initial state ignored"),
    _b("v_scale_ignored", V, ("backward-error",), "o not divided by scale"),
    _b("v_wrong_pivot", V, ("backward-error",), "wrong pivot |q_t||k_t| for q_t·k_t"),
    _b("v_exact_inverse", V, ("backward-error", "finite"), "exact inverse where q_t·k_t = 0 needs a pseudo-inverse"),
    _b("v_singular_step_zeroed", V, ("minimum-norm",), "singular step zeroed: a least-squares answer, not minimum-norm"),
    _b("v_pivot_detached", V, ("gradients",), "pivots q_t·k_t taken as constants in the backward"),
    _b("v_state_in_input_dtype", V, ("backward-error", "finite"),
       "state carried in fp16 (accumulation in the input dtype) overflows its range", "float16"),
    _b("v_state_in_bf16", V, ("minimum-norm",),
       "state carried in bf16: a few ulps of v lost at every step (seen componentwise only)", "bfloat16"),
    _b("q_decay_forgotten", Q, ("backward-error",), "state decay forgotten"),
    _b("q_initial_state_ignored", Q, ("backward-error",), "initial state ignored"),
    _b("q_scale_ignored", Q, ("backward-error",), "scale ignored"),
    _b("q_state_before_update", Q, ("backward-error",), "off by one: S_{t-1} used for S_t"),
    _b("q_exact_inverse", Q, ("backward-error",), "normal equations with an exact inverse where S_t is rank deficient"),
    _b("k_greedy_recursion", K, ("o-roundtrip",), "the notes' greedy Type2 recursion (exact for E = 1 only)"),
    _b("k_decay_forgotten", K, ("backward-error",), "decay forgotten"),
    _b("k_initial_state_ignored", K, ("backward-error",), "initial state ignored"),
    _b("k_exact_inverse", K, ("backward-error",), "(A^T A)^-1 A^T b where the map of K lacks full column rank"),
    _b("k_stopped_early", K, ("o-roundtrip",), "iterative solver stopped before convergence"),
)
