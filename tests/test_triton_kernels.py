"""Small cross-checks of the Triton kernels against the PyTorch ones (interpreter on CPU, compiled on CUDA),
plus the provider and the interpret switch. CUDA-only tests skip when CUDA is unavailable."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.registry import optional_kernels
from iqa_verify.triton import mode
from iqa_verify.triton.mode import InterpretMode, block_sizes, unavailable_reason

needs_triton = pytest.mark.skipif(unavailable_reason() is not None, reason=f"Triton kernels unavailable: {unavailable_reason()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: compiled (non-interpreted) Triton runs need a GPU")
F64 = torch.float64


def _device() -> torch.device:
    return torch.device("cpu" if mode.interpreting() else "cuda")


# ------------------------------------------------------------------------------------ provider and switch


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_results_round_to_nearest_even_as_torch_does(dtype: torch.dtype) -> None:
    """Compiled Triton rounds float32 -> bf16 to nearest even; the interpreter truncated (and garbled subnormals),
    leaving the built-ins' bf16 results up to an ulp off on CPU. Every store goes through ``to_output``: bitwise
    torch's rounding, specials, subnormals, ties and the overflow to inf included."""
    from tests.triton_probes import stored_as

    gen = torch.Generator().manual_seed(0)
    spread = 10.0 ** torch.randint(-44, 39, (3000,), generator=gen).double()
    x = torch.cat([(torch.randn(3000, generator=gen, dtype=F64) * spread).float(),
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895e38, 3.4e38, -3.4e38, 1e-40, -1e-42,
                                 0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 2**-133])])
    got, want = stored_as(x.to(_device()), dtype).cpu(), x.to(dtype)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:5]


def test_provider_lists_one_kernel_per_family() -> None:
    mine = [o for o in optional_kernels() if o.kernel.impl.startswith("iqa_verify.triton.")]
    assert sorted(o.family for o in mine) == ["iqa", "la-forward", "la-solve-v"]
    assert all(o.missing == unavailable_reason() for o in mine)


@pytest.mark.parametrize(("raw", "expected"), [("", InterpretMode.AUTO), ("auto", InterpretMode.AUTO), ("1", InterpretMode.ON),
                                               ("0", InterpretMode.OFF), ("off", InterpretMode.OFF)])
def test_interpret_switch_parses(monkeypatch, raw: str, expected: InterpretMode) -> None:
    monkeypatch.setenv(mode.ENV_VAR, raw)
    assert mode.interpret_mode() is expected


def test_interpret_switch_rejects_unknown_values(monkeypatch) -> None:
    monkeypatch.setenv(mode.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="IQA_TRITON_INTERPRET='maybe': must be auto, 1 or 0"):
        mode.interpret_mode()


def test_switch_off_without_cuda_makes_the_kernels_unavailable(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(mode.ENV_VAR, "0")
    monkeypatch.setattr(mode, "_cuda_available", lambda: False)
    reason = unavailable_reason()
    assert reason is not None and ("needs CUDA" in reason or "needs triton" in reason)


def test_block_sizes_are_powers_of_two_at_least_16() -> None:
    assert block_sizes(1, 16, 17, 100) == (16, 16, 32, 128)


# ------------------------------------------------------------------------------------ la-forward


def _la_inputs(gen, B, T, H, D, E, dtype, *, s0=True, transposed=False):
    dev = _device()
    q, k = (torch.randn(B, H, T, D, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, T, E, generator=gen, dtype=F64)
    g = -0.2 * torch.rand(B, H, T, generator=gen, dtype=F64)
    S0 = torch.randn(B, H, D, E, generator=gen, dtype=F64) if s0 else None

    def lay(x):
        x = x.to(dev, dtype).transpose(1, 2)
        return x if transposed else x.contiguous()

    return lay(q), lay(k), lay(v), lay(g), (S0.to(dev, dtype) if s0 else None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@needs_triton
@pytest.mark.parametrize(("T", "transposed"), [(1, False), (37, True), (70, False)])
def test_la_forward_triton_matches_the_recurrent_kernel_in_float64(gen, T: int, transposed: bool) -> None:
    from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent
    from iqa_verify.triton.la_forward import la_forward_triton

    ins = _la_inputs(gen, 2, T, 2, 3, 5, F64, transposed=transposed)
    leaves = [x.detach().requires_grad_() for x in ins]
    ref_leaves = [x.detach().clone().requires_grad_() for x in ins]
    o, S = la_forward_triton(*leaves, scale=0.5)
    o_r, S_r = la_forward_recurrent(*ref_leaves, scale=0.5)
    assert _rel(o, o_r) < 1e-12 and _rel(S, S_r) < 1e-12
    cot_o, cot_s = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad([o, S], leaves, [cot_o, cot_s])
    grads_r = torch.autograd.grad([o_r, S_r], ref_leaves, [cot_o, cot_s])
    for name, a, b in zip("q k v g S0".split(), grads, grads_r):
        assert _rel(a, b) < 1e-11, name


@needs_triton
def test_la_forward_triton_bf16_keeps_dtypes_and_float32_state(gen) -> None:
    from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent
    from iqa_verify.triton.la_forward import la_forward_triton

    ins = _la_inputs(gen, 1, 40, 2, 4, 4, torch.bfloat16)
    o, S = la_forward_triton(*ins)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_r, S_r = la_forward_recurrent(*(x.double() for x in ins))
    assert _rel(o, o_r) < 2e-2 and _rel(S, S_r) < 1e-5


@needs_triton
def test_la_forward_triton_does_not_modify_its_inputs(gen) -> None:
    from iqa_verify.triton.la_forward import la_forward_triton

    ins = _la_inputs(gen, 1, 20, 1, 2, 3, torch.float32, transposed=True)
    before = [x.clone() for x in ins]
    la_forward_triton(*ins)
    assert all(torch.equal(a, b) for a, b in zip(ins, before))


# ------------------------------------------------------------------------------------ la-solve-v


@needs_triton
@pytest.mark.parametrize("singular", [False, True], ids=["regular", "singular-head"])
def test_la_solve_v_triton_matches_the_pytorch_solve(gen, singular: bool) -> None:
    from iqa_verify.kernels.la_solve_v import la_solve_v
    from iqa_verify.triton.la_solve_v import la_solve_v_triton

    q, k, _, g, S0 = _la_inputs(gen, 2, 21, 2, 4, 3, F64)
    k = 3 * q / (q * q).sum(-1, keepdim=True) + 0.1 * k  # well-conditioned pivots
    if singular:
        q = q.clone()
        q[1, 4, 0] = 0.0  # q_t = 0: a singular step in batch 1, head 0
    o = torch.randn(2, 21, 2, 3, generator=gen, dtype=F64).to(q.device)
    leaves = [x.detach().requires_grad_() for x in (q, k, o, g, S0)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, o, g, S0)]
    v = la_solve_v_triton(*leaves, scale=2.0)
    v_r = la_solve_v(*ref_leaves, scale=2.0)
    assert _rel(v, v_r) < 1e-10
    w = torch.randn_like(v)
    for name, a, b in zip("q k o g S0".split(), torch.autograd.grad(v, leaves, w), torch.autograd.grad(v_r, ref_leaves, w)):
        assert _rel(a, b) < 1e-9, name


# ------------------------------------------------------------------------------------ iqa map


@needs_triton
@pytest.mark.parametrize("N", [1, 5, 40])
def test_iqa_map_triton_matches_the_pytorch_map(gen, N: int) -> None:
    from iqa_verify.iqa.kernel import iqa_map
    from iqa_verify.triton.iqa_map import iqa_map_triton

    dev = _device()
    y, v = (torch.randn(2, N, 5, generator=gen, dtype=F64).to(dev) for _ in range(2))
    k = torch.randn(2, N, 3, generator=gen, dtype=F64).to(dev)
    w = torch.randn(5, 3, generator=gen, dtype=F64).to(dev)
    leaves = [x.requires_grad_() for x in (y, k, v, w)]
    f, f_r = iqa_map_triton(*leaves, 0.7), iqa_map(*leaves, 0.7)
    assert _rel(f, f_r) < 1e-12
    cot = torch.randn_like(f)
    for name, a, b in zip("y k v w_q".split(), torch.autograd.grad(f, leaves, cot), torch.autograd.grad(f_r, leaves, cot)):
        # N = 1: dy is exactly 0 in theory (a softmax over one query): judged on an absolute scale of 1
        assert float((a - b).abs().max()) <= 1e-11 * max(1.0, float(b.abs().max())), name


@needs_triton
def test_iqa_forward_triton_matches_the_pytorch_kernel(gen) -> None:
    from iqa_verify.triton.iqa_map import iqa_forward_triton, iqa_forward_triton_reference

    dev = _device()
    x = torch.randn(2, 4, 3, generator=gen, dtype=F64).to(dev).requires_grad_()
    w_q, w_k = (0.4 * torch.randn(3, 2, generator=gen, dtype=F64).to(dev).requires_grad_() for _ in range(2))
    y, y_r = iqa_forward_triton(x, w_q, w_k), iqa_forward_triton_reference(x, w_q, w_k)
    assert _rel(y, y_r) < 1e-10
    cot = torch.randn_like(y)
    gr = torch.autograd.grad(y, [x, w_q, w_k], cot)
    gr_r = torch.autograd.grad(y_r, [x, w_q, w_k], cot)
    for name, a, b in zip("x w_q w_k".split(), gr, gr_r):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(b.abs().max())), name


# ------------------------------------------------------------------------------------ CUDA only


@needs_cuda
@needs_triton
def test_compiled_la_forward_on_cuda_matches_the_chunked_kernel(gen, monkeypatch) -> None:
    if mode.interpreting():
        pytest.skip("IQA_TRITON_INTERPRET forces the interpreter: this test checks the compiled kernels")
    from iqa_verify.kernels.la_forward_chunked import la_forward_chunked
    from iqa_verify.triton.la_forward import la_forward_triton

    ins = _la_inputs(gen, 2, 300, 4, 64, 64, torch.bfloat16)
    o, S = la_forward_triton(*ins)
    o_r, S_r = la_forward_chunked(*ins)
    assert _rel(o, o_r) < 2e-2 and _rel(S, S_r) < 1e-4


@needs_cuda
@needs_triton
def test_compiled_iqa_map_on_cuda_matches_the_pytorch_map(gen) -> None:
    if mode.interpreting():
        pytest.skip("IQA_TRITON_INTERPRET forces the interpreter: this test checks the compiled kernels")
    from iqa_verify.iqa.kernel import iqa_map
    from iqa_verify.triton.iqa_map import iqa_map_triton

    y, v = (torch.randn(4, 200, 64, generator=gen).cuda() for _ in range(2))
    k = torch.randn(4, 200, 32, generator=gen).cuda()
    w = 0.1 * torch.randn(64, 32, generator=gen).cuda()
    assert _rel(iqa_map_triton(y, k, v, w, 0.2), iqa_map(y, k, v, w, 0.2)) < 1e-5
