"""Packed batches (cu_seqlens) for la-solve-v: contract errors, the per-sequence reference, the built-in kernels."""

from __future__ import annotations

import pytest
import torch

from iqa_verify.contracts import check_la_solve_inputs
from iqa_verify.errors import IqaVerifyError
from iqa_verify.kernels.la_solve_v import la_solve_v, la_solve_v_sequential
from iqa_verify.reference.la_inverse import la_solve_v_dense_ref

F64 = torch.float64


def _inputs(T=11, H=2, D=3, E=2, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, D, generator=gen, dtype=F64)
    k = 2 * q / q.pow(2).sum(-1, keepdim=True) + 0.1 * torch.randn(1, T, H, D, generator=gen, dtype=F64)
    o = torch.randn(1, T, H, E, generator=gen, dtype=F64)
    g = -torch.rand(1, T, H, generator=gen, dtype=F64)
    return [x.to(dtype) for x in (q, k, o, g)]


def _cu(*c):
    return torch.tensor(c, dtype=torch.int64)


BAD = [
    ("cu-not-tensor", dict(cu=[0, 3]), "cu_seqlens=[0, 3]: must be an int64 tensor"),
    ("cu-int32", dict(cu=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens"),
    ("cu-not-from-0", dict(cu=_cu(1, 3)), "must start at 0"),
    ("cu-not-increasing", dict(cu=_cu(0, 3, 3)), "strictly increasing"),
    ("cu-past-T", dict(cu=_cu(0, 12)), "<= T=11"),
    ("batch-2", dict(cu=_cu(0, 3), batch=2), "B=2: a packed batch"),
    ("state-rows", dict(cu=_cu(0, 3, 11), state=torch.zeros(1, 2, 3, 2, dtype=F64)), "initial_state"),
]


@pytest.mark.parametrize("spec, says", [(m, s) for _, m, s in BAD], ids=[i for i, _, _ in BAD])
def test_packed_contract_errors(spec, says) -> None:
    q, k, o, g = _inputs()
    if spec.get("batch"):
        q, k, o, g = (torch.cat([x, x]) for x in (q, k, o, g))
    with pytest.raises(IqaVerifyError) as err:
        check_la_solve_inputs({"q": q, "k": k, "o": o}, g, spec.get("state"), spec["cu"])
    assert says in str(err.value)


def test_reference_is_per_sequence_and_zero_at_padding() -> None:
    q, k, o, g = _inputs()
    s0 = torch.randn(3, 2, 3, 2, dtype=F64)
    cu = _cu(0, 1, 4, 9)
    v = la_solve_v_dense_ref(q, k, o, g, s0, scale=0.5, cu_seqlens=cu)
    for i, (a, b) in enumerate([(0, 1), (1, 4), (4, 9)]):
        alone = la_solve_v_dense_ref(q[:, a:b], k[:, a:b], o[:, a:b], g[:, a:b], s0[i:i + 1], scale=0.5)
        torch.testing.assert_close(v[:, a:b], alone, rtol=0, atol=0)
    assert bool((v[:, 9:] == 0).all())


@pytest.mark.parametrize("kernel", [la_solve_v, la_solve_v_sequential], ids=["chunked", "sequential"])
def test_builtin_packed_equals_reference_with_zero_padding_gradients(kernel) -> None:
    q, k, o, g = _inputs(T=80)
    s0 = torch.randn(2, 2, 3, 2, dtype=F64)
    cu = _cu(0, 70, 77)  # one sequence past a 64-step chunk, one shorter; 3 padding steps
    leaves = [x.clone().requires_grad_() for x in (q, k, o, g, s0)]
    v = kernel(*leaves, scale=2.0, cu_seqlens=cu)
    want = la_solve_v_dense_ref(q, k, o, g, s0, scale=2.0, cu_seqlens=cu)
    torch.testing.assert_close(v[:, :77], want[:, :77], rtol=1e-9, atol=1e-9)
    v.sum().backward()
    for x in leaves[:4]:
        assert bool((x.grad[:, 77:] == 0).all())
