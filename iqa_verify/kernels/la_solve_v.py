"""Type1 inverse of linear attention with decay (family ``la-solve-v``): solve for V by chunked forward substitution.

Contract (SPEC §2)::

    la_solve_v(q, k, o, g, initial_state=None, *, scale=1.0, cu_seqlens=None) -> v
      q, k: [B, T, H, D]   o: [B, T, H, E]   g: [B, T, H] (<= 0)   initial_state: [B, H, D, E] or None
      cu_seqlens: int64 [N + 1] or None (a packed batch, SPEC §6: B = 1, initial_state [N, H, D, E])
      v: the minimum-norm least-squares solution of  la_forward(q, k, v, g, initial_state)[0] = o

Per batch and head the system is lower triangular, ``O / scale - diag(alpha) Q S_0 = P V`` with
``P = (Q K^T) ⊙ M`` (diagonal ``q_t · k_t``), so forward substitution gives V.

Singular systems. Step t is singular when ``|q_t · k_t| <= D eps Σ_i |q_t[i] k_t[i]|`` (the dot
product is zero to within its own rounding error; ``eps`` of the accumulation dtype). The default
:attr:`SingularPolicy.LEAST_SQUARES` returns the contract's answer for such a (batch, head): the dense
minimum-norm least squares ``pinv(P) (O / scale - diag(alpha) Q S_0)`` over the whole sequence
(O(T^3) for that batch-head only); the same is done where substitution overflows. Never NaN/inf for
finite inputs. :attr:`SingularPolicy.RAISE` raises :class:`~iqa_verify.errors.IqaVerifyError` naming
the first such step instead (``t=5: q_t·k_t = 0 ...``).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F

from iqa_verify.contracts import check_la_solve_inputs, state_dtype_for
from iqa_verify.errors import IqaVerifyError, check_at_least

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SingularPolicy",
    "check_chunk_size",
    "la_solve_v",
    "la_solve_v_sequential",
    "segment_log_decay",
    "to_chunks",
]

DEFAULT_CHUNK_SIZE = 64



class SingularPolicy(enum.Enum):
    """What :func:`la_solve_v` does on a singular step (``q_t · k_t = 0`` to rounding)."""

    LEAST_SQUARES = "return the minimum-norm least-squares solution (dense pinv for that batch-head)"
    RAISE = "raise IqaVerifyError naming the first singular step"


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise IqaVerifyError(f"chunk_size={chunk_size!r}: chunk size must be an integer")
    check_at_least("chunk_size", chunk_size, 1, "chunk size")


def to_chunks(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...], zero-padding time to N * C steps."""
    pad = n_chunks * chunk - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
    return x.reshape(*x.shape[:2], n_chunks, chunk, *x.shape[3:])


def segment_log_decay(g: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [..., C, C]: entry (i, j) = sum_{j < s <= i} g_s for i >= j, -inf above the diagonal.

    A cumulative sum of a strictly-lower copy of g (terms of one sign, no cancellation), masked to
    -inf before any exp so that exp gives exact zeros above the diagonal.
    """
    C = g.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=g.device)
    seg = g.unsqueeze(-1).expand(*g.shape, C).masked_fill(~ones.tril(-1), 0.0).cumsum(-2)
    return seg.masked_fill(~ones.tril(), float("-inf"))


def _singular_steps(Q: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diag = q_t · k_t [B, H, T] and the mask of steps where it is zero to rounding [B, H, T]."""
    diag = (Q * K).sum(-1)
    bound = Q.shape[-1] * torch.finfo(Q.dtype).eps * (Q * K).abs().sum(-1)
    return diag, diag.abs() <= bound


def _raise_singular(diag: torch.Tensor, singular: torch.Tensor) -> None:
    b, h, t = (int(i) for i in singular.nonzero()[0])
    raise IqaVerifyError(
        f"t={t}: q_t·k_t = {float(diag[b, h, t]):.3g} is zero to rounding (batch {b}, head {h}); the Type1 system"
        " is singular: pass on_singular=SingularPolicy.LEAST_SQUARES for the minimum-norm least-squares answer"
    )


def _rhs_offset(Q: torch.Tensor, G: torch.Tensor, initial_state: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """diag(alpha) Q S_0 [B, H, T, E] (None without an initial state)."""
    if initial_state is None:
        return None
    return torch.exp(G.cumsum(-1)).unsqueeze(-1) * (Q @ initial_state.to(acc))


def _least_squares_heads(V, bad, Q, K, O, G, initial_state, scale, acc):
    """Replace the batch-heads flagged in ``bad`` [B, H] by pinv(P) (O/scale - diag(alpha) Q S_0)."""
    B, H, T, E = V.shape
    idx = bad.reshape(-1).nonzero().squeeze(-1)
    flat = lambda x: x.reshape(B * H, *x.shape[2:]).index_select(0, idx)  # noqa: E731
    Qs, Ks, Os, Gs = flat(Q), flat(K), flat(O), flat(G)
    ones = torch.ones(T, T, dtype=torch.bool, device=Q.device)
    P = (Qs @ Ks.transpose(-1, -2)) * torch.exp(segment_log_decay(Gs)).masked_fill(~ones.tril(), 0.0)
    R = Os / scale
    if initial_state is not None:
        R = R - flat(_rhs_offset(Q, G, initial_state, acc))
    X = torch.linalg.pinv(P) @ R
    return V.reshape(B * H, T, E).index_put((idx,), X).reshape(B, H, T, E)


def _prepare(q, k, o, g, initial_state, on_singular):
    named = {"q": q, "k": k, "o": o}
    check_la_solve_inputs(named, g, initial_state)
    if not isinstance(on_singular, SingularPolicy):
        raise IqaVerifyError(f"on_singular={on_singular!r}: must be a SingularPolicy")
    acc = state_dtype_for(q.dtype)
    Q, K, O = (x.to(acc).transpose(1, 2) for x in (q, k, o))  # [B, H, T, *]
    G = g.to(acc).transpose(1, 2)  # [B, H, T]
    diag, singular = _singular_steps(Q, K)
    if on_singular is SingularPolicy.RAISE and bool(singular.any()):
        _raise_singular(diag, singular)
    return acc, Q, K, O, G, diag, singular.any(-1)


def _substitute_with_fallback(substitute, acc, Q, K, O, G, diag, bad, initial_state, scale, on_singular, dtype):
    """Run ``substitute(Q, diag, bad)`` -> V [B, H, T, E] and hand the flagged batch-heads to least squares.

    Batch-heads flagged ``bad`` [B, H] (a singular step) enter the substitution with Q = 0 and a unit
    diagonal, so their (discarded) substitution is exactly V = O / scale: finite, with exactly zero
    gradients (a masked-out branch that overflowed would give 0 * inf = NaN in the backward). Heads
    whose substitution overflows are flagged too and the substitution is run once more; so are heads
    whose answer does not fit the output dtype (fp16 tops out at 65504): an exact solve of a system
    that is singular to the output's precision is not an answer the caller can hold, its minimum-norm
    least-squares solution with a float32 rank decision usually is.
    """
    limit = torch.finfo(dtype).max
    def run(bad):
        Qs = torch.where(bad[..., None, None], torch.zeros((), dtype=acc, device=Q.device), Q)
        return substitute(Qs, torch.where(bad.unsqueeze(-1), torch.ones_like(diag), diag), bad)

    V = run(bad)
    overflow = ~(V.abs() <= limit).all(-1)  # [B, H, T]: inf, NaN or beyond the output dtype
    if bool(overflow.any()):
        if on_singular is SingularPolicy.RAISE:
            b, h, t = (int(i) for i in overflow.nonzero()[0])
            raise IqaVerifyError(f"t={t}: forward substitution overflowed (batch {b}, head {h}); the Type1 system is too ill-conditioned")
        bad = bad | overflow.any(-1)
        V = run(bad)
    if bool(bad.any()):
        V = _least_squares_heads(V, bad, Q, K, O, G, initial_state, scale, acc)
    return V.transpose(1, 2).to(dtype)


def _packed(solve, q, k, o, g, initial_state, cu_seqlens, **kwargs) -> torch.Tensor:
    """A packed batch (SPEC §6): ``solve`` restarted at every sequence start ``cu[i]`` from ``initial_state[i]``
    (zeros if None), one unpacked call per sequence on positions ``[cu[i], cu[i+1])``; the substitution is
    sequential in time, so no state crosses a boundary. Padding positions (``>= cu[N]``) get v = 0, computed
    from nothing (their inputs change nothing and receive zero gradients)."""
    check_la_solve_inputs({"q": q, "k": k, "o": o}, g, initial_state, cu_seqlens)
    cu = [int(c) for c in cu_seqlens.tolist()]
    parts = [solve(q[:, a:b], k[:, a:b], o[:, a:b], g[:, a:b],
                   initial_state[i:i + 1] if initial_state is not None else None, **kwargs)
             for i, (a, b) in enumerate(zip(cu, cu[1:]))]
    if cu[-1] < q.shape[1]:
        parts.append(torch.zeros((1, q.shape[1] - cu[-1], *o.shape[2:]), dtype=o.dtype, device=o.device))
    return torch.cat(parts, dim=1)


def la_solve_v(
    q: torch.Tensor,
    k: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_singular: SingularPolicy = SingularPolicy.LEAST_SQUARES,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Type1: V from Q, K, O by block forward substitution over chunks of ``chunk_size`` steps.

    Args:
        q, k: [B, T, H, D]; o: [B, T, H, E]; g: [B, T, H] log-decay (<= 0); initial_state: [B, H, D, E] or None.
        scale: the forward's output scale (nonzero).
        chunk_size: steps per chunk C (an integer >= 1; min(C, T) is used).
        on_singular: see the module docstring (default: minimum-norm least squares).
        cu_seqlens: int64 [N + 1] or None: a packed batch (SPEC §6, B = 1, initial_state [N, H, D, E]); see
            :func:`_packed`.

    Returns:
        v: [B, T, H, E] in the input dtype (float32 accumulation for bf16/fp16).

    Per batch and head, with S_{n-1} the state entering chunk n, local steps i, j and
    ``Gamma_ij = sum_{j < s <= i} g_s``, ``b_i = Gamma_i0``::

        L_n   = (Q_n K_n^T) ⊙ exp(Gamma)         lower triangular, diagonal q_i · k_i
        L_n V_n = O_n / scale - diag(exp(b)) Q_n S_{n-1}        (torch.linalg.solve_triangular)
        S_n   = exp(b_C) S_{n-1} + (K_n ⊙ exp(Gamma_C.))^T V_n

    All L_n are built in one batched product; only the hand-over of S between chunks is a loop. A
    ragged last chunk is padded with identity rows (padded v = 0, the state is unchanged).
    Differentiable by autograd; inputs are never modified.
    """
    check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return _packed(la_solve_v, q, k, o, g, initial_state, cu_seqlens, scale=scale, chunk_size=chunk_size,
                       on_singular=on_singular)
    acc, Q, K, O, G, diag, bad = _prepare(q, k, o, g, initial_state, on_singular)
    B, H, T, D = Q.shape
    E = O.shape[-1]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    Kc, Oc = (to_chunks(x, N, C) for x in (K, O))  # [B, H, N, C, *]
    Gc = to_chunks(G.unsqueeze(-1), N, C).squeeze(-1)  # [B, H, N, C]
    decay = torch.exp(segment_log_decay(Gc))  # [B, H, N, C, C]
    eye = torch.eye(C, dtype=acc, device=q.device)
    pad = (torch.arange(N * C, device=q.device) >= T).to(acc).reshape(N, C)
    into = torch.exp(Gc.cumsum(-1))  # [B, H, N, C] = exp(b_i)
    to_end = decay[..., -1, :].unsqueeze(-1)  # [B, H, N, C, 1] = exp(Gamma_Cj)

    def substitute(Qm, _diag, bad):
        Qc = to_chunks(Qm, N, C)
        L = (Qc @ Kc.transpose(-1, -2)) * decay + torch.diag_embed(pad)  # padded steps: identity rows
        L = torch.where(bad[..., None, None, None], eye, L)  # singular heads are redone by least squares
        S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
        out = []
        for L_n, Q_n, K_n, O_n, into_n, end_n in zip(*(x.unbind(2) for x in (L, Qc, Kc, Oc, into, to_end))):
            R = O_n / scale - into_n.unsqueeze(-1) * (Q_n @ S)
            V_n = torch.linalg.solve_triangular(L_n, R, upper=False)
            S = into_n[..., -1, None, None] * S + (K_n * end_n).transpose(-1, -2) @ V_n
            out.append(V_n)
        return torch.cat(out, dim=2)[:, :, :T]

    return _substitute_with_fallback(substitute, acc, Q, K, O, G, diag, bad, initial_state, scale, on_singular, q.dtype)


def la_solve_v_sequential(
    q: torch.Tensor,
    k: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    on_singular: SingularPolicy = SingularPolicy.LEAST_SQUARES,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Type1 by plain forward substitution, a Python loop over time (the benchmark's baseline)::

        v_t = (o_t / scale - exp(g_t) S_{t-1}^T q_t) / (q_t · k_t),    S_t = exp(g_t) S_{t-1} + k_t v_t^T

    Same arguments, result, dtype rules, singular handling and packed batches as :func:`la_solve_v`.
    """
    if cu_seqlens is not None:
        return _packed(la_solve_v_sequential, q, k, o, g, initial_state, cu_seqlens, scale=scale,
                       on_singular=on_singular)
    acc, Q, K, O, G, diag, bad = _prepare(q, k, o, g, initial_state, on_singular)
    B, H, T, D = Q.shape
    E = O.shape[-1]
    lam = torch.exp(G)

    def substitute(Qm, diag, _bad):
        S = torch.zeros(B, H, D, E, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
        out = []
        for t in range(T):
            carried = lam[..., t, None, None] * S
            v_t = (O[..., t, :] / scale - (Qm[..., t, None, :] @ carried).squeeze(-2)) / diag[..., t, None]
            S = carried + K[..., t, :, None] * v_t[..., None, :]
            out.append(v_t)
        return torch.stack(out, dim=2)

    return _substitute_with_fallback(substitute, acc, Q, K, O, G, diag, bad, initial_state, scale, on_singular, q.dtype)
