"""Planted bugs in a Triton ``la_forward`` kernel: mistakes GPU kernel authors make, each caught by the suite.

:func:`_zoo_fwd_kernel` is a compact copy of the forward of :mod:`iqa_verify.triton.la_forward` with one
``BUG`` switch (a :class:`Bug` value, a constexpr, so every variant compiles to its own kernel); the
backward is the real Triton backward (:func:`iqa_verify.triton.la_forward.la_bwd_launch`), reading the
per-chunk states the zoo's forward wrote. Each public function is a kernel with the contract's signature::

    IQA_TRITON_INTERPRET=1 iqa-verify check tests/bug_zoo/la_forward_triton.py:mask_off_by_one --family la-forward
"""

from iqa_verify.triton.mode import apply_interpret_mode, block_sizes

apply_interpret_mode()

import enum  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from iqa_verify.contracts import check_la_forward_inputs, state_dtype_for  # noqa: E402
from iqa_verify.triton.la_forward import la_bwd_launch  # noqa: E402
from tests.bug_zoo.planted import PlantedBug  # noqa: E402

__all__ = ["Bug", "BUGS"]


class Bug(enum.IntEnum):
    """NONE: the correct kernel. MASK_OFF_BY_ONE: ``t <= T`` in the k/v load mask (one step past the end
    enters the state). WRONG_STRIDE: v loaded with k's strides (right only when D == E and layouts agree).
    STATE_UNWRITTEN: the per-chunk state buffer for chunk 0 is never written (the author assumed the
    zero-initialised entering state needs no store), so the backward reads scratch memory.
    ACC_IN_INPUT_DTYPE: the carried state and the cumulative log-decay kept in the input dtype between
    chunks (``b_h = b_h.to(k.dtype)``), products still in float32. Planted as casts only, so the
    interpreter (which does bf16 arithmetic on raw uint16 bits) rounds exactly as a GPU would."""

    NONE = 0
    MASK_OFF_BY_ONE = 1
    WRONG_STRIDE = 2
    STATE_UNWRITTEN = 3
    ACC_IN_INPUT_DTYPE = 4


@triton.jit
def _zoo_fwd_kernel(
    q, k, v, g, s0, o, states, final,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e, sg_b, sg_t, sg_h,
    ss_b, ss_h, ss_d, ss_e,
    T, H, D, E, N, scale,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, HAS_S0: tl.constexpr, ACC: tl.constexpr, BUG: tl.constexpr,
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
    if BUG == 2:  # WRONG_STRIDE
        sv_b, sv_t, sv_h, sv_e = sk_b, sk_t, sk_h, sk_d
    if HAS_S0:
        S = tl.load(s0 + i_b * ss_b + i_h * ss_h + offs_d[:, None] * ss_d + offs_e[None, :] * ss_e,
                    mask=mde, other=0.0).to(ACC)
    else:
        S = tl.zeros((BD, BE), dtype=ACC)
    for n in range(N):
        t = (n * BT + offs_t).to(tl.int64)
        mt = t < T
        if BUG == 1:  # MASK_OFF_BY_ONE
            mkv = t <= T
        else:
            mkv = mt
        bq = tl.load(q + i_b * sq_b + i_h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                     mask=mt[:, None] & md[None, :], other=0.0).to(ACC)
        bk = tl.load(k + i_b * sk_b + i_h * sk_h + t[:, None] * sk_t + offs_d[None, :] * sk_d,
                     mask=mkv[:, None] & md[None, :], other=0.0).to(ACC)
        bv = tl.load(v + i_b * sv_b + i_h * sv_h + t[:, None] * sv_t + offs_e[None, :] * sv_e,
                     mask=mkv[:, None] & me[None, :], other=0.0).to(ACC)
        bg = tl.load(g + i_b * sg_b + i_h * sg_h + t * sg_t, mask=mt, other=0.0).to(ACC)
        b = tl.sum(tl.where(incl, bg[None, :], 0.0), 1)
        b_last = tl.sum(bg, 0)
        if BUG == 4:  # ACC_IN_INPUT_DTYPE: the cumulative log-decay rounded to the input dtype
            b = b.to(o.dtype.element_ty).to(ACC)
            b_last = b_last.to(o.dtype.element_ty).to(ACC)
        if BUG == 3:  # STATE_UNWRITTEN: chunk 0's entering state is never stored
            if n > 0:
                tl.store(states + (pid * N + n) * D * E + st_off, S, mask=mde)
        else:
            tl.store(states + (pid * N + n) * D * E + st_off, S, mask=mde)
        decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        p = tl.dot(bq, tl.trans(bk), input_precision="ieee", out_dtype=ACC) * decay
        qd = bq * tl.exp(b)[:, None]
        out = tl.dot(p, bv, input_precision="ieee", out_dtype=ACC) + tl.dot(qd, S, input_precision="ieee", out_dtype=ACC)
        tl.store(o + ((i_b * T + t[:, None]) * H + i_h) * E + offs_e[None, :], (scale * out).to(o.dtype.element_ty),
                 mask=mt[:, None] & me[None, :])
        kd = bk * tl.exp(b_last - b)[:, None]
        S = tl.exp(b_last) * S + tl.dot(tl.trans(kd), bv, input_precision="ieee", out_dtype=ACC)
        if BUG == 4:  # ACC_IN_INPUT_DTYPE: the carried state kept in the input dtype (``b_h.to(k.dtype)``)
            S = S.to(o.dtype.element_ty).to(ACC)
    tl.store(final + pid * D * E + st_off, S.to(ACC), mask=mde)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
ZOO_CHUNK = 16  # a common GPU chunk size; small chunks round the carried state often


class _ZooLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, bug):  # type: ignore[override]
        B, T, H, D = q.shape
        E = v.shape[-1]
        acc = state_dtype_for(q.dtype)
        BT = ZOO_CHUNK
        BD, BE = block_sizes(D, E)
        N = triton.cdiv(T, BT)
        o = torch.empty(B, T, H, E, dtype=q.dtype, device=q.device)
        states = torch.empty(B * H, N, D, E, dtype=acc, device=q.device)
        final = torch.empty(B, H, D, E, dtype=acc, device=q.device)
        s0 = initial_state if initial_state is not None else final
        _zoo_fwd_kernel[(B * H,)](
            q, k, v, g, s0, o, states, final,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(), *s0.stride(),
            T, H, D, E, N, float(scale),
            BT=BT, BD=BD, BE=BE, HAS_S0=initial_state is not None, ACC=_TL_ACC[acc], BUG=int(bug),
        )
        ctx.save_for_backward(q, k, v, g, states)
        ctx.meta = (float(scale), BT, initial_state is not None)
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):  # type: ignore[override]
        q, k, v, g, states = ctx.saved_tensors
        scale, BT, has_initial = ctx.meta
        dq, dk, dv, dg, ds0 = la_bwd_launch(q, k, v, g, states, d_o, d_final, has_initial, scale, BT)
        return dq, dk, dv, dg, ds0, None, None


def _run(q, k, v, g, initial_state, scale, bug: Bug):
    check_la_forward_inputs(q, k, v, g, initial_state)
    return _ZooLinearAttention.apply(q, k, v, g, initial_state, scale, bug)


def correct(q, k, v, g, initial_state=None, *, scale=1.0):
    """The zoo kernel without a bug (holds every property: the planted line is the cause of each failure)."""
    return _run(q, k, v, g, initial_state, scale, Bug.NONE)


def mask_off_by_one(q, k, v, g, initial_state=None, *, scale=1.0):
    return _run(q, k, v, g, initial_state, scale, Bug.MASK_OFF_BY_ONE)


def wrong_stride(q, k, v, g, initial_state=None, *, scale=1.0):
    return _run(q, k, v, g, initial_state, scale, Bug.WRONG_STRIDE)


def state_unwritten(q, k, v, g, initial_state=None, *, scale=1.0):
    return _run(q, k, v, g, initial_state, scale, Bug.STATE_UNWRITTEN)


def acc_in_input_dtype(q, k, v, g, initial_state=None, *, scale=1.0):
    return _run(q, k, v, g, initial_state, scale, Bug.ACC_IN_INPUT_DTYPE)


def _bug(kernel: str, dtype: str, caught_by: tuple[str, ...], kind: str) -> PlantedBug:
    return PlantedBug(__file__, "la-forward", kernel, dtype, caught_by, kind)


def _p(name: str) -> str:
    return f"la-forward/{name}"


BUGS: tuple[PlantedBug, ...] = (
    _bug("mask_off_by_one", "float32", (_p("values"),), "load mask t <= T: one step past the sequence"),
    _bug("wrong_stride", "float32", (_p("values"),), "v addressed with k's strides"),
    _bug("state_unwritten", "float32", (_p("no-uninit-reads"),), "per-chunk state read before it is written"),
    _bug("acc_in_input_dtype", "bfloat16", (_p("values"),), "accumulation in the input dtype (bf16 state)"),
)
