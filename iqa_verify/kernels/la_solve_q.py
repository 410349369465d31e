"""Type3 inverse of linear attention with decay (family ``la-solve-q``): solve for Q step by step.

Contract (SPEC §2)::

    la_solve_q(k, v, o, g, initial_state=None, *, scale=1.0) -> q
      k: [B, T, H, D]   v, o: [B, T, H, E]   g: [B, T, H] (<= 0)   initial_state: [B, H, D, E] or None
      q: the minimum-norm least-squares solution of  la_forward(q, k, v, g, initial_state)[0] = o

The system is block diagonal: ``o_t = scale * S_t^T q_t`` with the states S_t known from K, V, so
``q_t = pinv(scale * S_t^T) o_t`` independently per step. With S_0 = 0, S_t has rank <= t: for
t < D the query is not identifiable and the minimum-norm answer is the one in the row space of S_t^T.
"""

from __future__ import annotations

import math

import torch

from iqa_verify.contracts import check_la_solve_inputs, state_dtype_for
from iqa_verify.kernels.la_solve_v import DEFAULT_CHUNK_SIZE, check_chunk_size, segment_log_decay, to_chunks

__all__ = ["RANK_RTOL_ULPS", "la_solve_q", "la_states"]

RANK_RTOL_ULPS = 64
"""Solver setting: singular values of S_t below ``RANK_RTOL_ULPS * max(D, E) * eps * sigma_max`` count as
zero (``eps`` of the accumulation dtype). The states are sums of rounded rank-one terms, so a rank-t
state computed in float32 carries spurious singular values of a few ``eps * sigma_max``; the cut-off
sits above them so that rank-deficient steps get the minimum-norm answer, not an amplified rounding error."""


def la_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Every state of the recurrence, chunk by chunk: [B, H, T, D, E] in the accumulation dtype.

    k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H]; initial_state: [B, H, D, E] or None. In chunk n
    (local steps i, j; ``Gamma_ij = sum_{j < s <= i} g_s``, ``b_i = Gamma_i0``) with S_{n-1} entering::

        S_i = exp(b_i) S_{n-1} + sum_{j <= i} exp(Gamma_ij) k_j v_j^T

    The intra-chunk sums are one batched einsum; only the hand-over between chunks is a loop.
    """
    acc = state_dtype_for(k.dtype)
    K, V = (x.to(acc).transpose(1, 2) for x in (k, v))  # [B, H, T, *]
    G = g.to(acc).transpose(1, 2)
    B, H, T, D = K.shape
    E = V.shape[-1]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    Kc, Vc = to_chunks(K, N, C), to_chunks(V, N, C)
    Gc = to_chunks(G.unsqueeze(-1), N, C).squeeze(-1)  # padded steps: g = 0, k = v = 0
    decay = torch.exp(segment_log_decay(Gc))  # [B, H, N, C, C]
    intra = torch.einsum("bhnij,bhnjd,bhnje->bhnide", decay, Kc, Vc)  # [B, H, N, C, D, E]
    into = torch.exp(Gc.cumsum(-1))[..., None, None]  # [B, H, N, C, 1, 1]
    S = torch.zeros(B, H, D, E, dtype=acc, device=k.device) if initial_state is None else initial_state.to(acc)
    states = []
    for intra_n, into_n in zip(intra.unbind(2), into.unbind(2)):
        block = into_n * S.unsqueeze(2) + intra_n  # [B, H, C, D, E]
        states.append(block)
        S = block[:, :, -1]
    return torch.cat(states, dim=2)[:, :, :T]


def la_solve_q(
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Type3: Q from K, V, O by batched per-step minimum-norm least squares.

    Args:
        k: [B, T, H, D]; v, o: [B, T, H, E]; g: [B, T, H] log-decay (<= 0); initial_state: [B, H, D, E] or None.
        scale: the forward's output scale.
        chunk_size: chunk length for computing the states (:func:`la_states`).

    Returns:
        q: [B, T, H, D] in the input dtype (float32 accumulation for bf16/fp16)::

            q_t = pinv(scale * S_t^T) o_t         one batched pseudo-inverse over [B, H, T] blocks [E, D]

    The pseudo-inverse is cut at :data:`RANK_RTOL_ULPS` (rank-deficient states are safe). Memory is
    O(B H T D E). Differentiable by autograd (torch's pinv backward assumes the rank is locally
    constant); inputs are never modified.
    """
    B, T, H, D, E = check_la_solve_inputs({"k": k, "v": v, "o": o}, g, initial_state)
    check_chunk_size(chunk_size)
    S = la_states(k, v, g, initial_state, chunk_size=chunk_size)  # [B, H, T, D, E]
    acc = S.dtype
    rtol = RANK_RTOL_ULPS * max(D, E) * torch.finfo(acc).eps
    O = o.to(acc).transpose(1, 2).unsqueeze(-1)  # [B, H, T, E, 1]
    Q = torch.linalg.pinv(scale * S.transpose(-1, -2), rtol=rtol) @ O  # [B, H, T, D, 1]
    return Q.squeeze(-1).transpose(1, 2).to(k.dtype)
