"""The gla-forward float64 references, their sympy closed forms, and the same-precision baseline.

- sympy proves the recurrence and the matrix form identical, and the recurrence equal to la-forward's when
  the gate is constant over D;
- the lambdified closed form (values and sympy.diff gradients) checks the default reference;
- the recurrent and matrix references agree in every gate regime, and reduce to la-forward numerically;
- the baseline keeps the dtypes of SPEC §5; bad inputs raise IqaVerifyError naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.gla_forward.cases import Gate, GLACase, build_gla_inputs
from iqa_verify.reference.gla_forward import gla_forward_baseline, gla_forward_matrix_ref, gla_forward_recurrent_ref
from iqa_verify.reference.gla_forward_sympy import closed_form, prove_forms_identical, prove_reduces_to_la
from iqa_verify.reference.la_forward import la_forward_ref

F64 = torch.float64
REF_TOL = tolerance(Kind.REFERENCE, F64)


def _values_and_grads(fn, inputs: dict, cots: tuple[torch.Tensor, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = [leaves.get(n) for n in inputs]
    o, S = fn(*args, scale=scale)
    grads = torch.autograd.grad([o, S], list(leaves.values()), list(cots))
    return {"out/o": o.detach(), "out/final_state": S.detach()} | {f"grad/d{n}": g for n, g in zip(leaves, grads)}


def _assert_close(got: dict, want: dict) -> None:
    checks = [compare(p, got[p], want[p], REF_TOL, dtype=F64) for p in want]
    failing = [c.describe() for c in checks if not c.passed]
    assert not failing, "\n".join(failing)


@pytest.mark.parametrize(("T", "D", "E"), [(2, 2, 1), (3, 1, 2)])
def test_sympy_recurrence_equals_matrix_form(T: int, D: int, E: int) -> None:
    assert prove_forms_identical(T, D, E) == ()


def test_sympy_recurrence_with_constant_gate_is_la_forward() -> None:
    assert prove_reduces_to_la(2, 2, 2) == ()


@pytest.mark.parametrize("gate", [Gate.MILD, Gate.STRONG, Gate.PARTIAL_ZERO])
def test_closed_form_matches_reference(gate: Gate, gen: torch.Generator) -> None:
    T, D, E = 3, 2, 2
    spec = GLACase(B=1, T=T, H=1, D=D, E=E, gate=gate, initial_state=True, scale=0.5, seed=13)
    inputs = build_gla_inputs(spec, F64, torch.device("cpu"))
    cots = (torch.randn(1, T, 1, E, generator=gen, dtype=F64), torch.randn(1, 1, D, E, generator=gen, dtype=F64))
    got = _values_and_grads(gla_forward_recurrent_ref, inputs, cots, spec.scale)
    head = {n: t[0, :, 0].numpy() for n, t in inputs.items() if n != "initial_state"}
    oracle = closed_form(T, D, E)(head["q"], head["k"], head["v"], head["g"], inputs["initial_state"][0, 0].numpy(),
                                  spec.scale, cots[0][0, :, 0].numpy(), cots[1][0, 0].numpy())
    want = {"out/o": oracle["o"][None, :, None], "out/final_state": oracle["final_state"][None, None],
            "grad/dq": oracle["dq"][None, :, None], "grad/dk": oracle["dk"][None, :, None],
            "grad/dv": oracle["dv"][None, :, None], "grad/dg": oracle["dg"][None, :, None],
            "grad/dinitial_state": oracle["dinitial_state"][None, None]}
    _assert_close(got, {p: torch.from_numpy(w.copy()) for p, w in want.items()})


@pytest.mark.parametrize("gate", list(Gate))
def test_recurrence_and_matrix_form_agree(gate: Gate, gen: torch.Generator) -> None:
    spec = GLACase(B=2, T=41, H=2, D=5, E=3, gate=gate, initial_state=True, scale=2.5, seed=7)
    inputs = build_gla_inputs(spec, F64, torch.device("cpu"))
    cots = (torch.randn(2, 41, 2, 3, generator=gen, dtype=F64), torch.randn(2, 2, 5, 3, generator=gen, dtype=F64))
    rec = _values_and_grads(gla_forward_recurrent_ref, inputs, cots, spec.scale)
    mat = _values_and_grads(gla_forward_matrix_ref, inputs, cots, spec.scale)
    _assert_close(rec, mat)
    assert all(bool(torch.isfinite(t).all()) for t in rec.values())


def test_gate_constant_over_dimensions_is_la_forward(gen: torch.Generator) -> None:
    spec = GLACase(B=2, T=30, H=2, D=4, E=3, gate=Gate.SCALAR, initial_state=True, seed=11)
    inputs = build_gla_inputs(spec, F64, torch.device("cpu"))
    cots = (torch.randn(2, 30, 2, 3, generator=gen, dtype=F64), torch.randn(2, 2, 4, 3, generator=gen, dtype=F64))
    gla = _values_and_grads(gla_forward_recurrent_ref, inputs, cots, 1.0)
    la_inputs = dict(inputs, g=inputs["g"][..., 0])
    la = _values_and_grads(la_forward_ref, la_inputs, cots, 1.0)
    la["grad/dg"] = la["grad/dg"][..., None].expand(-1, -1, -1, 4)  # the per-dimension grads sum to la's dg
    gla["grad/dg"] = gla["grad/dg"].sum(-1, keepdim=True).expand(-1, -1, -1, 4)
    _assert_close(gla, la)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_baseline_dtypes_and_accuracy(dtype: torch.dtype) -> None:
    spec = GLACase(B=1, T=50, H=2, D=4, E=3, gate=Gate.MILD, initial_state=True, seed=3)
    inputs = build_gla_inputs(spec, dtype, torch.device("cpu"))
    o, S = gla_forward_baseline(*inputs.values())
    assert o.dtype == dtype and S.dtype == (torch.float32 if dtype != torch.float32 else dtype)
    ref_o, _ = gla_forward_recurrent_ref(*inputs.values())
    assert compare("out/o", o, ref_o, tolerance(Kind.VALUE, dtype), dtype=dtype).passed


@pytest.mark.parametrize(("name", "bad", "says"), [
    ("g", lambda x: dict(x, g=x["g"][..., 0]), "g.shape"),
    ("k", lambda x: dict(x, k=x["k"][:, :-1]), "k.shape"),
    ("initial_state", lambda x: dict(x, initial_state=x["initial_state"].transpose(-1, -2)), "initial_state.shape"),
    ("dtype", lambda x: dict(x, v=x["v"].float()), "v"),
], ids=["g-scalar", "k-short", "state-transposed", "v-dtype"])
def test_bad_inputs_name_the_argument(name: str, bad, says: str) -> None:
    spec = GLACase(B=1, T=4, H=1, D=3, E=2, initial_state=True)
    inputs = bad(build_gla_inputs(spec, F64, torch.device("cpu")))
    for fn in (gla_forward_recurrent_ref, gla_forward_matrix_ref, gla_forward_baseline):
        with pytest.raises(IqaVerifyError, match=says):
            fn(*inputs.values())
