"""Linear attention with decay (family ``la-forward``) in Triton: chunked forward and hand-written backward.

Same contract, chunk decomposition and backward formulas as the PyTorch kernel
:func:`iqa_verify.kernels.la_forward_chunked.la_forward_chunked` (its reference beside it, with the same
signature, is :func:`iqa_verify.kernels.la_forward_recurrent.la_forward_recurrent`). One Triton program
per (batch, head) walks the chunks of ``BT`` steps in order, keeping the [D, E] state in registers::

    per chunk, local steps i, j < BT, S_in the state entering it:
      b_i      = sum_{t <= i} g_t                    (masked steps past T have g = 0)
      M_ij     = exp(b_i - b_j) for i >= j, 0 above   (masked to -inf in log space before the exp)
      O        = scale * ( [(Q K^T) * M] V + diag(exp(b)) Q S_in )
      S_out    = exp(b_last) S_in + (K * exp(b_last - b))^T V

The forward also writes every S_in to a [B*H, N, D, E] buffer that the backward reads; the backward
walks the chunks in reverse carrying dU = dL/dS_out (starting from d final_state)::

      dP  = scale dO V^T           dQd = scale dO S_in^T          dS_in = scale (Q exp(b))^T dO
      dV  = scale P^T dO + Kd dU   dQ  = (dP * M) K + dQd exp(b)  dK    = (dP * M)^T Q + (V dU^T) exp(b_last - b)
      db_i = dQd_i . Qd_i + sum_j dG_ij - sum_j dG_ji (+ <dU, S_in> exp(b_last) at the chunk's last row),
      dG = dP * P off the diagonal;  dl_j = (V dU^T)_j . Kd_j
      dg_t = sum_{i >= t} db_i + sum_{j < t} dl_j;    dU <- exp(b_last) dU + dS_in;  dS_0 = the final dU

Loads take the strides of the actual tensors (non-contiguous views are fine) and mask steps past T
(ragged last chunk) and the padding of D and E to powers of two. Tiles are upcast to the
accumulation dtype (float32 for bf16/fp16/fp32, float64 for float64) before every ``tl.dot``
(``input_precision="ieee"``: no TF32); outputs are stored in the input dtype, the final state in the
accumulation dtype. See :mod:`iqa_verify.triton.mode` for running on CPU through the interpreter.
"""

from iqa_verify.triton.mode import apply_interpret_mode, block_sizes

apply_interpret_mode()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.autograd.function import FunctionCtx, once_differentiable  # noqa: E402

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for  # noqa: E402
from iqa_verify.triton.rounding import to_output  # noqa: E402

__all__ = ["la_forward_triton", "la_forward_triton_reference", "chunk_size_for"]

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def chunk_size_for(T: int) -> int:
    """Steps per chunk: a power of two in [16, 64] covering short sequences in one chunk."""
    return min(64, block_sizes(T)[0])


@triton.jit
def _la_fwd_kernel(
    q, k, v, g, s0, o, states, final,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_e,
    sg_b, sg_t, sg_h,
    ss_b, ss_h, ss_d, ss_e,
    so_b, so_t, so_h, so_e,
    T, H, D, E, N, scale,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_O: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i_b = pid // H
    i_h = pid % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    md = offs_d < D
    me = offs_e < E
    mde = md[:, None] & me[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    incl = offs_t[None, :] <= offs_t[:, None]  # [i, j]: j <= i (inclusive prefix sums)
    st_off = offs_d[:, None].to(tl.int64) * E + offs_e[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_b * ss_b + i_h * ss_h + offs_d[:, None] * ss_d + offs_e[None, :] * ss_e,
                    mask=mde, other=0.0).to(ACC)
    else:
        S = tl.zeros((BD, BE), dtype=ACC)
    for n in range(N):
        t = (n * BT + offs_t).to(tl.int64)
        mt = t < T
        bq = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                     mask=mt[:, None] & md[None, :], other=0.0).to(ACC)
        bk = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :] * sk_d,
                     mask=mt[:, None] & md[None, :], other=0.0).to(ACC)
        bv = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_e[None, :] * sv_e,
                     mask=mt[:, None] & me[None, :], other=0.0).to(ACC)
        bg = tl.load(g + i_b * sg_b + i_h * sg_h + t * sg_t, mask=mt, other=0.0).to(ACC)
        b = tl.sum(tl.where(incl, bg[None, :], 0.0), 1)  # inclusive cumulative log-decay
        b_last = tl.sum(bg, 0)
        tl.store(states + (pid * N + n) * D * E + st_off, S, mask=mde)
        decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        p = tl.dot(bq, tl.trans(bk), input_precision="ieee", out_dtype=ACC) * decay
        if STORE_O:
            qd = bq * tl.exp(b)[:, None]
            out = tl.dot(p, bv, input_precision="ieee", out_dtype=ACC)
            out += tl.dot(qd, S, input_precision="ieee", out_dtype=ACC)
            tl.store(o + i_b * so_b + i_h * so_h + t[:, None] * so_t + offs_e[None, :] * so_e,
                     to_output(scale * out, o.dtype.element_ty), mask=mt[:, None] & me[None, :])
        kd = bk * tl.exp(b_last - b)[:, None]
        S = tl.exp(b_last) * S + tl.dot(tl.trans(kd), bv, input_precision="ieee", out_dtype=ACC)
    tl.store(final + pid * D * E + st_off, S, mask=mde)


@triton.jit
def _la_bwd_kernel(
    q, k, v, g, do, dfinal, states, dq, dk, dv, dg, ds0,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_e,
    sg_b, sg_t, sg_h,
    sdo_b, sdo_t, sdo_h, sdo_e,
    sdf_b, sdf_h, sdf_d, sdf_e,
    T, H, D, E, N, scale,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    HAS_S0: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i_b = pid // H
    i_h = pid % H
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    md = offs_d < D
    me = offs_e < E
    mde = md[:, None] & me[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    incl = offs_t[None, :] <= offs_t[:, None]
    st_off = offs_d[:, None].to(tl.int64) * E + offs_e[None, :]
    dU = tl.load(dfinal + i_b * sdf_b + i_h * sdf_h + offs_d[:, None] * sdf_d + offs_e[None, :] * sdf_e,
                 mask=mde, other=0.0).to(ACC)
    for r in range(N):
        n = N - 1 - r
        t = (n * BT + offs_t).to(tl.int64)
        mt = t < T
        m_td = mt[:, None] & md[None, :]
        m_te = mt[:, None] & me[None, :]
        bq = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d, mask=m_td, other=0.0).to(ACC)
        bk = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :] * sk_d, mask=m_td, other=0.0).to(ACC)
        bv = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_e[None, :] * sv_e, mask=m_te, other=0.0).to(ACC)
        bdo = tl.load(do + i_b * sdo_b + i_h * sdo_h + t[:, None] * sdo_t + offs_e[None, :] * sdo_e,
                      mask=m_te, other=0.0).to(ACC)
        bg = tl.load(g + i_b * sg_b + i_h * sg_h + t * sg_t, mask=mt, other=0.0).to(ACC)
        s_in = tl.load(states + (pid * N + n) * D * E + st_off, mask=mde, other=0.0)
        b = tl.sum(tl.where(incl, bg[None, :], 0.0), 1)
        b_last = tl.sum(bg, 0)
        eb = tl.exp(b)
        to_end = tl.exp(b_last - b)
        decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        p = tl.dot(bq, tl.trans(bk), input_precision="ieee", out_dtype=ACC) * decay
        qd = bq * eb[:, None]
        kd = bk * to_end[:, None]
        dp = scale * tl.dot(bdo, tl.trans(bv), input_precision="ieee", out_dtype=ACC)
        dqd = scale * tl.dot(bdo, tl.trans(s_in), input_precision="ieee", out_dtype=ACC)
        dvv = scale * tl.dot(tl.trans(p), bdo, input_precision="ieee", out_dtype=ACC)
        dvv += tl.dot(kd, dU, input_precision="ieee", out_dtype=ACC)
        ds_in = scale * tl.dot(tl.trans(qd), bdo, input_precision="ieee", out_dtype=ACC)
        da = dp * decay
        dkd = tl.dot(bv, tl.trans(dU), input_precision="ieee", out_dtype=ACC)
        dqq = tl.dot(da, bk, input_precision="ieee", out_dtype=ACC) + dqd * eb[:, None]
        dkk = tl.dot(tl.trans(da), bq, input_precision="ieee", out_dtype=ACC) + dkd * to_end[:, None]
        dgam = tl.where(offs_t[:, None] != offs_t[None, :], dp * p, 0.0)
        db = tl.sum(dqd * qd, 1) + tl.sum(dgam, 1) - tl.sum(dgam, 0)
        carried = tl.sum(tl.sum(dU * s_in, 1), 0) * tl.exp(b_last)
        db += tl.where(offs_t == BT - 1, carried, 0.0)
        dl = tl.sum(dkd * kd, 1)
        # dg_t = sum_{i >= t} db_i + sum_{j < t} dl_j, as masked sums (exact, no cancellation)
        dgg = tl.sum(tl.where(offs_t[None, :] >= offs_t[:, None], db[None, :], 0.0), 1)
        dgg += tl.sum(tl.where(offs_t[None, :] < offs_t[:, None], dl[None, :], 0.0), 1)
        # outputs are contiguous [B, T, H, *]
        row_d = ((i_b * T + t) * H + i_h) * D
        row_e = ((i_b * T + t) * H + i_h) * E
        tl.store(dq + row_d[:, None] + offs_d[None, :], to_output(dqq, dq.dtype.element_ty), mask=m_td)
        tl.store(dk + row_d[:, None] + offs_d[None, :], to_output(dkk, dk.dtype.element_ty), mask=m_td)
        tl.store(dv + row_e[:, None] + offs_e[None, :], to_output(dvv, dv.dtype.element_ty), mask=m_te)
        tl.store(dg + (i_b * T + t) * H + i_h, to_output(dgg, dg.dtype.element_ty), mask=mt)
        dU = tl.exp(b_last) * dU + ds_in
    if HAS_S0:
        tl.store(ds0 + pid * D * E + st_off, to_output(dU, ds0.dtype.element_ty), mask=mde)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def la_fwd_launch(q, k, v, g, initial_state, scale: float, *, store_o: bool = True):
    """Run the forward kernel: (o [B, T, H, E] input dtype (None if not store_o), final [B, H, D, E] acc,
    states [B*H, N, D, E] acc: the state entering each chunk, chunk size BT)."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    BT = chunk_size_for(T)
    BD, BE = block_sizes(D, E)
    N = triton.cdiv(T, BT)
    o = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device) if store_o else q.new_empty(1, 1, 1, 1)
    states = torch.empty(B * H, N, D, E, dtype=acc, device=q.device)
    final = torch.empty(B, H, D, E, dtype=acc, device=q.device)
    s0 = initial_state if initial_state is not None else final  # not read when HAS_S0 is False
    _la_fwd_kernel[(B * H,)](
        q, k, v, g, s0, o, states, final,
        *_strides(q), *_strides(k), *_strides(v), *_strides(g), *_strides(s0), *_strides(o),
        T, H, D, E, N, float(scale),
        BT=BT, BD=BD, BE=BE, HAS_S0=initial_state is not None, STORE_O=store_o, ACC=_TL_ACC[acc],
    )
    return (o if store_o else None), final, states, BT


def la_bwd_launch(q, k, v, g, states, d_o, d_final, has_initial: bool, scale: float, BT: int):
    """Run the backward kernel: (dq, dk, dv, dg in the input dtype, dS0 or None)."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    acc = state_dtype_for(q.dtype)
    BD, BE = block_sizes(D, E)
    N = states.shape[1]
    dq = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device)
    dg = torch.empty(B, T, H, dtype=q.dtype, device=q.device)
    ds0 = torch.empty(B, H, D, E, dtype=q.dtype, device=q.device) if has_initial else dg
    if d_final is None:
        d_final = torch.zeros(B, H, D, E, dtype=acc, device=q.device)
    if d_o is None:
        d_o = torch.zeros(B, T, H, E, dtype=q.dtype, device=q.device)
    _la_bwd_kernel[(B * H,)](
        q, k, v, g, d_o, d_final, states, dq, dk, dv, dg, ds0,
        *_strides(q), *_strides(k), *_strides(v), *_strides(g), *_strides(d_o), *_strides(d_final),
        T, H, D, E, N, float(scale),
        BT=BT, BD=BD, BE=BE, HAS_S0=has_initial, ACC=_TL_ACC[acc],
    )
    return dq, dk, dv, dg, (ds0 if has_initial else None)


class _LinearAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, q, k, v, g, initial_state, scale):  # type: ignore[override]
        o, final, states, BT = la_fwd_launch(q, k, v, g, initial_state, scale)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.meta = (float(scale), BT, initial_state is not None)
        return o, final

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_o, d_final):  # type: ignore[override]
        q, k, v, g, states = ctx.saved_tensors
        scale, BT, has_initial = ctx.meta
        dq, dk, dv, dg, ds0 = la_bwd_launch(q, k, v, g, states, d_o, d_final, has_initial, scale, BT)
        return dq, dk, dv, dg, ds0, None


def la_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with per-step scalar decay, one Triton program per (batch, head), chunked.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E]; g: [B, T, H] log-decay (<= 0);
        initial_state: [B, H, D, E] or None (zeros); scale: multiplies every output.

    Returns:
        o: [B, T, H, E] in the input dtype; final_state: [B, H, D, E], float32 for bf16/fp16 inputs,
        the input dtype otherwise.

    ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` (chunk form: module docstring).
    Differentiable once in q, k, v, g and initial_state; inputs may be non-contiguous and are never modified.
    """
    check_la_forward_inputs(q, k, v, g, initial_state)
    return _LinearAttentionTriton.apply(q, k, v, g, initial_state, scale)


def la_forward_triton_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference beside the Triton kernel (same signature): the PyTorch loop over time,
    :func:`iqa_verify.kernels.la_forward_recurrent.la_forward_recurrent`."""
    from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent

    return la_forward_recurrent(q, k, v, g, initial_state, scale=scale)
