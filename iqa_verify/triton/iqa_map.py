"""Implicit query attention (family ``iqa``) with the map f fused in Triton.

One application of the IQA map, per batch element (SPEC §3; rows i are keys, columns j queries)::

    f(y) = softmax(scale * K (y w_q)^T, dim=-1) V
      y: [B, N, E]   K: [B, N, Dk]   V: [B, N, E]   w_q: [E, Dk]   ->   [B, N, E]

:func:`iqa_map_triton` is a flash-attention-style kernel with the query projection fused: a program
per (batch, block of BM key rows) streams blocks of BN query tokens j, computes ``q_j = y_j w_q`` on
the fly, ``s = scale k_i q_j^T``, an online softmax (running max m_i, sum l_i) and ``acc += p v_j``;
it stores ``f_i = acc / l_i`` and ``lse_i = m_i + log l_i``. Its backward (a ``torch.autograd.Function``)
recomputes ``P = exp(s - lse)`` block by block, with ``delta_i = sum_e dF_ie F_ie``::

    dP = dF V^T      dS = P * (dP - delta)      dK_i = scale sum_j dS_ij q_j
    dV_j = sum_i P_ij dF_i      dQ_j = scale sum_i dS_ij k_i      dy = dQ w_q^T      dw_q = sum_b y^T dQ

(one kernel over key blocks for dK, one over query blocks for dV, dQ and the fused dy; dw_q is a
batched sum in PyTorch). Tiles are upcast to the accumulation dtype before ``tl.dot`` (see
:mod:`iqa_verify.triton.mode`).

:func:`iqa_forward_triton` is the contract kernel: the suite's solver (Anderson) and exact implicit
backward (:class:`~iqa_verify.iqa.backward.Implicit` with an Anderson adjoint) from :mod:`iqa_verify.iqa`,
around this map. The reference beside it is :func:`iqa_verify.iqa.kernel.iqa_forward` (same solver,
PyTorch map).
"""

from iqa_verify.triton.mode import apply_interpret_mode, block_sizes

apply_interpret_mode()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.autograd.function import FunctionCtx, once_differentiable  # noqa: E402

from iqa_verify.contracts import state_dtype_for  # noqa: E402
from iqa_verify.triton.rounding import to_output  # noqa: E402
from iqa_verify.errors import IqaVerifyError  # noqa: E402
from iqa_verify.iqa.backward import Implicit  # noqa: E402
from iqa_verify.contracts import check_iqa_forward_inputs  # noqa: E402
from iqa_verify.iqa.kernel import IqaStats, iqa_default_scale  # noqa: E402
from iqa_verify.iqa.solvers import Anderson  # noqa: E402
from iqa_verify.iqa_claims import IqaKernelInfo  # noqa: E402

__all__ = ["iqa_map_triton", "iqa_forward_triton", "iqa_forward_triton_with_stats", "iqa_forward_triton_reference"]

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _iqa_map_fwd_kernel(
    y, k, v, wq, f, lse,
    sy_b, sy_n, sy_e, sk_b, sk_n, sk_d, sv_b, sv_n, sv_e, sw_e, sw_d,
    N, E, DK, scale,
    BM: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, BDK: tl.constexpr, ACC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    offs_i = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)
    offs_e = tl.arange(0, BE)
    offs_d = tl.arange(0, BDK)
    mi = offs_i < N
    me = offs_e < E
    mdk = offs_d < DK
    w = tl.load(wq + offs_e[:, None] * sw_e + offs_d[None, :] * sw_d, mask=me[:, None] & mdk[None, :], other=0.0).to(ACC)
    ki = tl.load(k + i_b * sk_b + offs_i[:, None] * sk_n + offs_d[None, :] * sk_d,
                 mask=mi[:, None] & mdk[None, :], other=0.0).to(ACC)
    m_i = tl.full((BM,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BM,), dtype=ACC)
    acc = tl.zeros((BM, BE), dtype=ACC)
    for j0 in range(0, N, BN):
        offs_j = (j0 + tl.arange(0, BN)).to(tl.int64)
        mj = offs_j < N
        yj = tl.load(y + i_b * sy_b + offs_j[:, None] * sy_n + offs_e[None, :] * sy_e,
                     mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
        vj = tl.load(v + i_b * sv_b + offs_j[:, None] * sv_n + offs_e[None, :] * sv_e,
                     mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
        qj = tl.dot(yj, w, input_precision="ieee", out_dtype=ACC)
        s = scale * tl.dot(ki, tl.trans(qj), input_precision="ieee", out_dtype=ACC)
        s = tl.where(mj[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, vj, input_precision="ieee", out_dtype=ACC)
        m_i = m_new
    out = acc / l_i[:, None]
    rows = i_b * N + offs_i
    tl.store(f + rows[:, None] * E + offs_e[None, :], to_output(out, f.dtype.element_ty), mask=mi[:, None] & me[None, :])
    tl.store(lse + rows, to_output(m_i + tl.log(l_i), lse.dtype.element_ty), mask=mi)


@triton.jit
def _iqa_map_bwd_dk_kernel(
    y, k, v, wq, df, lse, delta, dk,
    sy_b, sy_n, sy_e, sk_b, sk_n, sk_d, sv_b, sv_n, sv_e, sw_e, sw_d, sdf_b, sdf_n, sdf_e,
    N, E, DK, scale,
    BM: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, BDK: tl.constexpr, ACC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    offs_i = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)
    offs_e = tl.arange(0, BE)
    offs_d = tl.arange(0, BDK)
    mi = offs_i < N
    me = offs_e < E
    mdk = offs_d < DK
    w = tl.load(wq + offs_e[:, None] * sw_e + offs_d[None, :] * sw_d, mask=me[:, None] & mdk[None, :], other=0.0).to(ACC)
    ki = tl.load(k + i_b * sk_b + offs_i[:, None] * sk_n + offs_d[None, :] * sk_d,
                 mask=mi[:, None] & mdk[None, :], other=0.0).to(ACC)
    dfi = tl.load(df + i_b * sdf_b + offs_i[:, None] * sdf_n + offs_e[None, :] * sdf_e,
                  mask=mi[:, None] & me[None, :], other=0.0).to(ACC)
    lse_i = tl.load(lse + i_b * N + offs_i, mask=mi, other=0.0)
    dl_i = tl.load(delta + i_b * N + offs_i, mask=mi, other=0.0)
    dki = tl.zeros((BM, BDK), dtype=ACC)
    for j0 in range(0, N, BN):
        offs_j = (j0 + tl.arange(0, BN)).to(tl.int64)
        mj = offs_j < N
        yj = tl.load(y + i_b * sy_b + offs_j[:, None] * sy_n + offs_e[None, :] * sy_e,
                     mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
        vj = tl.load(v + i_b * sv_b + offs_j[:, None] * sv_n + offs_e[None, :] * sv_e,
                     mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
        qj = tl.dot(yj, w, input_precision="ieee", out_dtype=ACC)
        s = scale * tl.dot(ki, tl.trans(qj), input_precision="ieee", out_dtype=ACC)
        p = tl.where(mi[:, None] & mj[None, :], tl.exp(s - lse_i[:, None]), 0.0)
        dp = tl.dot(dfi, tl.trans(vj), input_precision="ieee", out_dtype=ACC)
        ds = p * (dp - dl_i[:, None])
        dki += scale * tl.dot(ds, qj, input_precision="ieee", out_dtype=ACC)
    tl.store(dk + (i_b * N + offs_i)[:, None] * DK + offs_d[None, :], to_output(dki, dk.dtype.element_ty),
             mask=mi[:, None] & mdk[None, :])


@triton.jit
def _iqa_map_bwd_dq_kernel(
    y, k, v, wq, df, lse, delta, dq, dy, dv,
    sy_b, sy_n, sy_e, sk_b, sk_n, sk_d, sv_b, sv_n, sv_e, sw_e, sw_d, sdf_b, sdf_n, sdf_e,
    N, E, DK, scale,
    BM: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, BDK: tl.constexpr, ACC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    offs_j = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    offs_e = tl.arange(0, BE)
    offs_d = tl.arange(0, BDK)
    mj = offs_j < N
    me = offs_e < E
    mdk = offs_d < DK
    w = tl.load(wq + offs_e[:, None] * sw_e + offs_d[None, :] * sw_d, mask=me[:, None] & mdk[None, :], other=0.0).to(ACC)
    yj = tl.load(y + i_b * sy_b + offs_j[:, None] * sy_n + offs_e[None, :] * sy_e,
                 mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
    vj = tl.load(v + i_b * sv_b + offs_j[:, None] * sv_n + offs_e[None, :] * sv_e,
                 mask=mj[:, None] & me[None, :], other=0.0).to(ACC)
    qj = tl.dot(yj, w, input_precision="ieee", out_dtype=ACC)
    dqj = tl.zeros((BN, BDK), dtype=ACC)
    dvj = tl.zeros((BN, BE), dtype=ACC)
    for i0 in range(0, N, BM):
        offs_i = (i0 + tl.arange(0, BM)).to(tl.int64)
        mi = offs_i < N
        ki = tl.load(k + i_b * sk_b + offs_i[:, None] * sk_n + offs_d[None, :] * sk_d,
                     mask=mi[:, None] & mdk[None, :], other=0.0).to(ACC)
        dfi = tl.load(df + i_b * sdf_b + offs_i[:, None] * sdf_n + offs_e[None, :] * sdf_e,
                      mask=mi[:, None] & me[None, :], other=0.0).to(ACC)
        lse_i = tl.load(lse + i_b * N + offs_i, mask=mi, other=0.0)
        dl_i = tl.load(delta + i_b * N + offs_i, mask=mi, other=0.0)
        s = scale * tl.dot(ki, tl.trans(qj), input_precision="ieee", out_dtype=ACC)
        p = tl.where(mi[:, None] & mj[None, :], tl.exp(s - lse_i[:, None]), 0.0)
        dvj += tl.dot(tl.trans(p), dfi, input_precision="ieee", out_dtype=ACC)
        dp = tl.dot(dfi, tl.trans(vj), input_precision="ieee", out_dtype=ACC)
        ds = p * (dp - dl_i[:, None])
        dqj += scale * tl.dot(tl.trans(ds), ki, input_precision="ieee", out_dtype=ACC)
    dyj = tl.dot(dqj, tl.trans(w), input_precision="ieee", out_dtype=ACC)
    rows = i_b * N + offs_j
    tl.store(dq + rows[:, None] * DK + offs_d[None, :], to_output(dqj, dq.dtype.element_ty), mask=mj[:, None] & mdk[None, :])
    tl.store(dy + rows[:, None] * E + offs_e[None, :], to_output(dyj, dy.dtype.element_ty), mask=mj[:, None] & me[None, :])
    tl.store(dv + rows[:, None] * E + offs_e[None, :], to_output(dvj, dv.dtype.element_ty), mask=mj[:, None] & me[None, :])


def _tiles(N: int, E: int, Dk: int) -> tuple[int, int, int]:
    BM = min(64, block_sizes(N)[0])
    BE, BDK = block_sizes(E, Dk)
    return BM, BE, BDK


class _IqaMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, y, k, v, w_q, scale):  # type: ignore[override]
        B, N, E = y.shape
        Dk = k.shape[-1]
        BM, BE, BDK = _tiles(N, E, Dk)
        f = torch.empty(B, N, E, dtype=y.dtype, device=y.device)
        lse = torch.empty(B, N, dtype=y.dtype, device=y.device)
        _iqa_map_fwd_kernel[(B, triton.cdiv(N, BM))](
            y, k, v, w_q, f, lse, *y.stride(), *k.stride(), *v.stride(), *w_q.stride(),
            N, E, Dk, float(scale), BM=BM, BN=BM, BE=BE, BDK=BDK, ACC=_TL_ACC[y.dtype],
        )
        ctx.save_for_backward(y, k, v, w_q, f, lse)
        ctx.scale = float(scale)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_f):  # type: ignore[override]
        y, k, v, w_q, f, lse = ctx.saved_tensors
        B, N, E = y.shape
        Dk = k.shape[-1]
        BM, BE, BDK = _tiles(N, E, Dk)
        delta = (d_f * f).sum(-1).contiguous()  # [B, N]
        dk = torch.empty(B, N, Dk, dtype=y.dtype, device=y.device)
        dq = torch.empty_like(dk)
        dy = torch.empty(B, N, E, dtype=y.dtype, device=y.device)
        dv = torch.empty_like(dy)
        strides = (*y.stride(), *k.stride(), *v.stride(), *w_q.stride(), *d_f.stride())
        meta = dict(BM=BM, BN=BM, BE=BE, BDK=BDK, ACC=_TL_ACC[y.dtype])
        grid = (B, triton.cdiv(N, BM))
        _iqa_map_bwd_dk_kernel[grid](y, k, v, w_q, d_f, lse, delta, dk, *strides, N, E, Dk, ctx.scale, **meta)
        _iqa_map_bwd_dq_kernel[grid](y, k, v, w_q, d_f, lse, delta, dq, dy, dv, *strides, N, E, Dk, ctx.scale, **meta)
        dw_q = torch.einsum("bne,bnd->ed", y, dq)
        return dy, dk, dv, dw_q, None


def iqa_map_triton(y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_q: torch.Tensor, scale: float) -> torch.Tensor:
    """One application of the map, fused in Triton: ``softmax(scale * K (y w_q)^T, dim=-1) V``.

    y: [B, N, E]; k: [B, N, Dk]; v: [B, N, E]; w_q: [E, Dk] -> [B, N, E], all float32 or float64
    (the compute dtype). Differentiable once in y, k, v and w_q (Triton backward)."""
    if y.dtype not in _TL_ACC:
        raise IqaVerifyError(f"y.dtype={y.dtype}: the Triton IQA map computes in float32 or float64")
    return _IqaMap.apply(y, k, v, w_q, scale)


def iqa_forward_triton_with_stats(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, IqaStats]:
    """:func:`iqa_forward_triton` that also returns the :class:`~iqa_verify.iqa.kernel.IqaStats`."""
    sizes = check_iqa_forward_inputs(x, w_q, w_k, w_v, scale)
    s = iqa_default_scale(sizes.Dk) if scale is None else float(scale)
    cd = state_dtype_for(x.dtype)
    xc, wq, wk = x.to(cd), w_q.to(cd), w_k.to(cd)
    k = xc @ wk
    v = xc @ w_v.to(cd) if w_v is not None else xc

    def fn(y: torch.Tensor) -> torch.Tensor:
        return iqa_map_triton(y, k, v, wq, s)

    y, sol, bstats = _BACKWARD.run(fn, v, _SOLVER)
    sol.raise_if_failed("iqa_forward_triton: forward fixed-point solve")
    return y.to(x.dtype), IqaStats(forward=sol, backward=bstats)


_SOLVER = Anderson()
_BACKWARD = Implicit(Anderson())


def iqa_forward_triton(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Implicit query attention with the map in Triton: the fixed point ``y = softmax(scale K (y w_q)^T) V``
    reached from ``V`` by Anderson acceleration; exact implicit gradient (Anderson adjoint).

    x: [B, N, Din]; w_q: [E, Dk]; w_k: [Din, Dk]; w_v: [Din, E] or None -> y: [B, N, E] (dtype and
    device of x; bf16/fp16 computed in float32). Raises ConvergenceError when the solve does not converge."""
    return iqa_forward_triton_with_stats(x, w_q, w_k, w_v, scale=scale)[0]


def iqa_forward_triton_reference(x, w_q, w_k, w_v=None, *, scale=None):
    """The reference beside the Triton kernel (same signature): :func:`iqa_verify.iqa.kernel.iqa_forward`
    with the same solver and backward, PyTorch map."""
    from iqa_verify.iqa.kernel import iqa_forward

    return iqa_forward(x, w_q, w_k, w_v, scale=scale, solver=_SOLVER, backward=_BACKWARD)


# What the kernel declares to the ``iqa`` family: the exact implicit gradient and its call with stats.
iqa_forward_triton.iqa_info = IqaKernelInfo(  # type: ignore[attr-defined]
    backward=_BACKWARD.claim, with_stats=iqa_forward_triton_with_stats)
