"""Type1 inverse (family ``la-solve-v``) in Triton: V from Q, K, O by chunked forward substitution.

Contract (SPEC §2)::

    la_solve_v_triton(q, k, o, g, initial_state=None, *, scale=1.0) -> v
      q, k: [B, T, H, D]   o: [B, T, H, E]   g: [B, T, H] (<= 0)   initial_state: [B, H, D, E] or None
      v: the minimum-norm least-squares solution of  la_forward(q, k, v, g, initial_state)[0] = o

Same math as :func:`iqa_verify.kernels.la_solve_v.la_solve_v` (its reference beside it, same
signature). One Triton program per (batch, head) walks chunks of ``BT`` steps carrying the [D, E]
state S in registers; per chunk (local steps i, j, ``b`` the inclusive cumulative log-decay)::

    L   = (Q K^T) * exp(b_i - b_j)  (i > j; masked to -inf before the exp)     pivots p_i = q_i . k_i
    R   = O / scale - diag(exp(b)) Q S
    V   = L^{-1} R with L = diag(p) (I - A), A strictly lower (nilpotent):
          (I - A)^{-1} = (I + A)(I + A^2)(I + A^4)(I + A^8) for BT = 16 — four doublings of matrix
          products instead of BT sequential row steps — then one step of iterative refinement
          (V += L^{-1}(R - L V) with the same factors) for a rounding-level backward error
    S  <- exp(b_last) S + (K * exp(b_last - b))^T V

Singular steps (``|q_t . k_t| <= D eps sum |q_t[i] k_t[i]|``) and substitution overflow are detected
per (batch, head); those batch-heads fall back to the PyTorch kernel's dense minimum-norm least squares
(``pinv``, differentiable by autograd), the others keep the Triton result.

Backward (a ``torch.autograd.Function``): V solves ``F(V; q, k, g, S_0) = O`` with F = la_forward's o,
so with ``A = dF/dV`` and the incoming cotangent w: ``u = A^{-T} w`` is again a Type1 solve, run
backwards in time with q and k swapped (``u_t = (w_t / scale - exp(g_{t+1}) R^T k_t) / (q_t . k_t)``,
``R <- exp(g_{t+1}) R + q_t u_t^T``), by the same Triton kernel on time-reversed inputs; then
``dO = u`` and ``d(q, k, g, S_0) = -vjp`` of la_forward at V with cotangent u, by the Triton
backward of :mod:`iqa_verify.triton.la_forward`. The backward runs in the accumulation dtype (float32 for
bf16/fp16 inputs): an ill-conditioned system's adjoint u can pass fp16's range where every gradient fits it.
"""

from iqa_verify.triton.mode import apply_interpret_mode, block_sizes, overflow_expected

apply_interpret_mode()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.autograd.function import FunctionCtx, once_differentiable  # noqa: E402

from iqa_verify.contracts import check_la_solve_inputs, state_dtype_for  # noqa: E402
from iqa_verify.kernels.la_solve_v import _least_squares_heads, _singular_steps  # noqa: E402
from iqa_verify.triton.la_forward import la_bwd_launch, la_fwd_launch  # noqa: E402
from iqa_verify.triton.rounding import to_output  # noqa: E402

__all__ = ["SOLVE_CHUNK", "la_solve_v_triton", "la_solve_v_triton_reference"]

SOLVE_CHUNK = 16
"""Steps per chunk (a power of two): the in-chunk inverse costs log2(SOLVE_CHUNK) doublings."""

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _unit_lower_solve(a, x, LOG_BT: tl.constexpr, ACC: tl.constexpr):
    """(I - a)^{-1} x for strictly lower a [BT, BT] (nilpotent: a^BT = 0), BT = 2^LOG_BT:
    the product (I + a)(I + a^2)(I + a^4)... applied to x [BT, BE] by LOG_BT doublings."""
    p = a
    for _ in tl.static_range(LOG_BT):
        x += tl.dot(p, x, input_precision="ieee", out_dtype=ACC)
        p = tl.dot(p, p, input_precision="ieee", out_dtype=ACC)
    return x


@triton.jit
def _solve_v_kernel(
    q, k, o, g, s0, piv, v,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    so_b, so_t, so_h, so_e,
    sg_b, sg_t, sg_h,
    ss_b, ss_h, ss_d, ss_e,
    T, H, D, E, N, scale,
    BT: tl.constexpr, LOG_BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, HAS_S0: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i_b = pid // H
    i_h = pid % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    md = offs_d < D
    me = offs_e < E
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[None, :] <= offs_t[:, None]
    if HAS_S0:
        S = tl.load(s0 + i_b * ss_b + i_h * ss_h + offs_d[:, None] * ss_d + offs_e[None, :] * ss_e,
                    mask=md[:, None] & me[None, :], other=0.0).to(ACC)
    else:
        S = tl.zeros((BD, BE), dtype=ACC)
    for n in range(N):
        t = (n * BT + offs_t).to(tl.int64)
        mt = t < T
        m_te = mt[:, None] & me[None, :]
        bq = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                     mask=mt[:, None] & md[None, :], other=0.0).to(ACC)
        bk = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :] * sk_d,
                     mask=mt[:, None] & md[None, :], other=0.0).to(ACC)
        bo = tl.load(o + i_b * so_b + i_h * so_h + t[:, None] * so_t + offs_e[None, :] * so_e,
                     mask=m_te, other=0.0).to(ACC)
        bg = tl.load(g + i_b * sg_b + i_h * sg_h + t * sg_t, mask=mt, other=0.0).to(ACC)
        bp = tl.load(piv + pid * T + t, mask=mt, other=1.0)  # padded steps: identity rows
        b = tl.sum(tl.where(incl, bg[None, :], 0.0), 1)
        b_last = tl.sum(bg, 0)
        decay = tl.exp(tl.where(strict, b[:, None] - b[None, :], float("-inf")))
        low = tl.dot(bq, tl.trans(bk), input_precision="ieee", out_dtype=ACC) * decay
        rhs = bo / scale - tl.exp(b)[:, None] * tl.dot(bq, S, input_precision="ieee", out_dtype=ACC)
        # L V = R with L = diag(p) (I - A): V = (I + A)(I + A^2)(I + A^4)... R / p, then one step of
        # iterative refinement with the same factors (restores a rounding-level backward error).
        a = -low / bp[:, None]
        sol = _unit_lower_solve(a, rhs / bp[:, None], LOG_BT, ACC)
        res = rhs - bp[:, None] * sol - tl.dot(low, sol, input_precision="ieee", out_dtype=ACC)
        sol += _unit_lower_solve(a, res / bp[:, None], LOG_BT, ACC)
        tl.store(v + ((i_b * T + t[:, None]) * H + i_h) * E + offs_e[None, :], to_output(sol, v.dtype.element_ty), mask=m_te)
        kd = bk * tl.exp(b_last - b)[:, None]
        S = tl.exp(b_last) * S + tl.dot(tl.trans(kd), sol, input_precision="ieee", out_dtype=ACC)


def _solve_launch(q, k, o, g, initial_state, pivots, scale: float) -> torch.Tensor:
    """v [B, T, H, E] (dtype of q, contiguous) by substitution with the given pivots [B*H, T] (acc dtype)."""
    B, T, H, D = q.shape
    E = o.shape[-1]
    acc = state_dtype_for(q.dtype)
    BD, BE = block_sizes(D, E)
    N = triton.cdiv(T, SOLVE_CHUNK)
    v = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device)
    s0 = initial_state if initial_state is not None else pivots
    s0_strides = tuple(initial_state.stride()) if initial_state is not None else (0, 0, 0, 0)
    with overflow_expected():  # ill-conditioned heads overflow; detected by the caller, solved by pinv
        _solve_v_kernel[(B * H,)](
            q, k, o, g, s0, pivots, v,
            *q.stride(), *k.stride(), *o.stride(), *g.stride(), *s0_strides,
            T, H, D, E, N, float(scale),
            BT=SOLVE_CHUNK, LOG_BT=SOLVE_CHUNK.bit_length() - 1, BD=BD, BE=BE, HAS_S0=initial_state is not None,
            ACC=_TL_ACC[acc],
        )
    return v


class _SolveV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, q, k, o, g, initial_state, scale, pivots, bad):  # type: ignore[override]
        v = _solve_launch(q, k, o, g, initial_state, pivots, scale)
        overflow = ~torch.isfinite(v).all(-1).all(1)  # [B, H]
        bad = bad | overflow
        v = torch.where(bad[:, None, :, None], torch.zeros((), dtype=v.dtype, device=v.device), v)
        ctx.save_for_backward(q, k, g, initial_state, v, pivots)
        ctx.scale = float(scale)
        ctx.mark_non_differentiable(bad)
        return v, bad

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, w, _d_bad):  # type: ignore[override]
        q_in, k_in, g_in, s0_in, v_in, pivots = ctx.saved_tensors
        scale = ctx.scale
        B, T, H, _ = q_in.shape
        # in the accumulation dtype throughout: the adjoint u of an ill-conditioned system can pass fp16's range
        # where every gradient fits it (u rounded to fp16 gave inf, then inf - inf = NaN in dq, dk, dg)
        acc = state_dtype_for(q_in.dtype)
        q, k, g, v, w = (x.to(acc) for x in (q_in, k_in, g_in, v_in, w))
        initial_state = s0_in.to(acc) if s0_in is not None else None
        # adjoint solve A^T u = w: backwards in time, q and k swapped, decay g_{t+1}
        g_next = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=1)
        flip = lambda x: x.flip(1)  # noqa: E731
        piv_rev = pivots.reshape(B, H, T).flip(-1).reshape(B * H, T).contiguous()
        u = flip(_solve_launch(flip(k), flip(q), flip(w), flip(g_next), None, piv_rev, scale))
        _, _, states, BT = la_fwd_launch(q, k, v, g, initial_state, scale, store_o=False)
        dq, dk, _, dg, ds0 = la_bwd_launch(q, k, v, g, states, -u, None, initial_state is not None, scale, BT)
        ds0 = ds0.to(s0_in.dtype) if ds0 is not None else None  # only with an initial state
        return dq.to(q_in.dtype), dk.to(k_in.dtype), u.to(q_in.dtype), dg.to(g_in.dtype), ds0, None, None, None


def la_solve_v_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """Type1: V from Q, K, O by chunked forward substitution in Triton.

    Args:
        q, k: [B, T, H, D]; o: [B, T, H, E]; g: [B, T, H] log-decay (<= 0); initial_state: [B, H, D, E] or None.
        scale: the forward's output scale (nonzero).

    Returns:
        v: [B, T, H, E] in the input dtype (float32 accumulation for bf16/fp16): the minimum-norm
        least-squares solution; batch-heads with a singular step or an overflowing substitution are
        solved by dense ``pinv`` in PyTorch. Differentiable in q, k, o, g and initial_state.
    """
    check_la_solve_inputs({"q": q, "k": k, "o": o}, g, initial_state)
    acc = state_dtype_for(q.dtype)
    B, T, H, D = q.shape
    Q, K = (x.to(acc).transpose(1, 2) for x in (q, k))  # [B, H, T, D]
    with torch.no_grad():  # the pivots are constants of the kernel; v's dependence on q . k is in the backward
        diag, singular = _singular_steps(Q, K)
        bad = singular.any(-1)  # [B, H]
        pivots = torch.where(bad.unsqueeze(-1), torch.ones_like(diag), diag).reshape(B * H, T).contiguous()
    v, bad = _SolveV.apply(q, k, o, g, initial_state, scale, pivots, bad)
    if not bool(bad.any()):
        return v
    O, G = o.to(acc).transpose(1, 2), g.to(acc).transpose(1, 2)
    V = _least_squares_heads(v.to(acc).transpose(1, 2), bad, Q, K, O, G, initial_state, scale, acc)
    return V.transpose(1, 2).to(q.dtype)


def la_solve_v_triton_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    o: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """The reference beside the Triton kernel (same signature): the PyTorch chunked solve
    :func:`iqa_verify.kernels.la_solve_v.la_solve_v`."""
    from iqa_verify.kernels.la_solve_v import la_solve_v

    return la_solve_v(q, k, o, g, initial_state, scale=scale)
