"""The delta-forward float64 reference, its sympy closed forms, and the same-precision baseline.

- sympy proves the product form and the WY / UT form (the chunked kernels' algebra) identical;
- the lambdified closed form (values and sympy.diff gradients, dbeta and dg included) checks the reference;
- special cases by hand: beta = 0 is la-forward without writes, beta = 1 with a unit key replaces the key's
  value exactly; g = None equals g = 0;
- the baseline keeps the dtypes of SPEC §5; bad inputs raise IqaVerifyError naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.properties.delta_forward.cases import Beta, DeltaCase, Decay, Keys, build_delta_inputs
from iqa_verify.reference.delta_forward import delta_forward_baseline, delta_forward_recurrent_ref
from iqa_verify.reference.delta_forward_sympy import closed_form, prove_forms_identical

F64 = torch.float64
REF_TOL = tolerance(Kind.REFERENCE, F64)
CPU = torch.device("cpu")


def _values_and_grads(inputs: dict, cots, scale: float) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    o, S = delta_forward_recurrent_ref(*[leaves.get(n) for n in inputs], scale=scale)
    grads = torch.autograd.grad([o, S], list(leaves.values()), list(cots))
    return {"out/o": o.detach(), "out/final_state": S.detach()} | {f"grad/d{n}": g for n, g in zip(leaves, grads)}


def _assert_close(got: dict, want: dict) -> None:
    checks = [compare(p, got[p], want[p], REF_TOL, dtype=F64) for p in want]
    assert all(c.passed for c in checks), "\n".join(c.describe() for c in checks if not c.passed)


@pytest.mark.parametrize(("T", "D", "E"), [(2, 2, 1), (3, 1, 1)])
def test_sympy_product_form_equals_wy_form(T: int, D: int, E: int) -> None:
    assert prove_forms_identical(T, D, E) == ()


@pytest.mark.parametrize("keys", list(Keys))
def test_closed_form_matches_reference(keys: Keys, gen: torch.Generator) -> None:
    T, D, E = 3, 2, 1
    spec = DeltaCase(B=1, T=T, H=1, D=D, E=E, keys=keys, decay=Decay.MILD, initial_state=True, scale=0.5, seed=17)
    inputs = build_delta_inputs(spec, F64, CPU)
    cots = (torch.randn(1, T, 1, E, generator=gen, dtype=F64), torch.randn(1, 1, D, E, generator=gen, dtype=F64))
    got = _values_and_grads(inputs, cots, spec.scale)
    h = {n: t[0, :, 0].numpy() for n, t in inputs.items() if n != "initial_state"}
    oracle = closed_form(T, D, E)(h["q"], h["k"], h["v"], h["beta"], h["g"], inputs["initial_state"][0, 0].numpy(),
                                  spec.scale, cots[0][0, :, 0].numpy(), cots[1][0, 0].numpy())
    per_time = lambda x: torch.from_numpy(x.copy()).unsqueeze(0).unsqueeze(2)  # noqa: E731 [T, ...] -> [1, T, 1, ...]
    want = {"out/o": per_time(oracle["o"]), "grad/dq": per_time(oracle["dq"]), "grad/dk": per_time(oracle["dk"]),
            "grad/dv": per_time(oracle["dv"]), "grad/dbeta": per_time(oracle["dbeta"]), "grad/dg": per_time(oracle["dg"]),
            "out/final_state": torch.from_numpy(oracle["final_state"])[None, None],
            "grad/dinitial_state": torch.from_numpy(oracle["dinitial_state"])[None, None]}
    _assert_close(got, want)


def test_beta_zero_only_decays_the_state() -> None:
    spec = DeltaCase(B=1, T=9, H=2, D=3, E=2, beta=Beta.ZERO, decay=Decay.MILD, initial_state=True, seed=3)
    x = build_delta_inputs(spec, F64, CPU)
    o, S = delta_forward_recurrent_ref(*x.values())
    decay = torch.exp(x["g"].cumsum(1))  # [B, T, H]
    want_o = torch.einsum("bthd,bhde->bthe", x["q"], x["initial_state"]) * decay[..., None]
    _assert_close({"o": o, "S": S}, {"o": want_o, "S": x["initial_state"] * decay[:, -1, :, None, None]})


def test_beta_one_with_a_unit_key_stores_the_value_exactly() -> None:
    spec = DeltaCase(B=1, T=5, H=1, D=3, E=2, beta=Beta.ONE, initial_state=True, seed=4)
    x = build_delta_inputs(spec, F64, CPU)
    _, S = delta_forward_recurrent_ref(*x.values())
    read = torch.einsum("bhd,bhde->bhe", x["k"][:, -1], S)  # S_T^T k_T = v_T when beta_T = 1, ‖k_T‖ = 1
    _assert_close({"read": read}, {"read": x["v"][:, -1]})


def test_no_decay_equals_zero_log_decay() -> None:
    spec = DeltaCase(B=2, T=12, H=2, D=3, E=2, decay=Decay.ZERO, initial_state=True, seed=5)
    x = build_delta_inputs(spec, F64, CPU)
    with_g = delta_forward_recurrent_ref(*x.values())
    without = delta_forward_recurrent_ref(**dict(x, g=None))
    _assert_close(dict(zip("oS", with_g)), dict(zip("oS", without)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_baseline_dtypes_and_accuracy(dtype: torch.dtype) -> None:
    x = build_delta_inputs(DeltaCase(B=1, T=50, H=2, D=4, E=3, decay=Decay.MILD, initial_state=True, seed=6), dtype, CPU)
    o, S = delta_forward_baseline(*x.values())
    assert o.dtype == dtype and S.dtype == (torch.float32 if dtype != torch.float32 else dtype)
    assert compare("out/o", o, delta_forward_recurrent_ref(*x.values())[0], tolerance(Kind.VALUE, dtype), dtype=dtype).passed


@pytest.mark.parametrize(("bad", "says"), [
    (lambda x: dict(x, beta=x["beta"][..., None]), "beta.shape"),
    (lambda x: dict(x, g=x["g"][:, :-1]), "g.shape"),
    (lambda x: dict(x, initial_state=x["initial_state"][:, :, :-1]), "initial_state.shape"),
    (lambda x: dict(x, beta=x["beta"].float()), "beta"),
], ids=["beta-4d", "g-short", "state-short", "beta-dtype"])
def test_bad_inputs_name_the_argument(bad, says: str) -> None:
    x = bad(build_delta_inputs(DeltaCase(B=1, T=4, H=1, D=3, E=2, decay=Decay.MILD, initial_state=True), F64, CPU))
    for fn in (delta_forward_recurrent_ref, delta_forward_baseline):
        with pytest.raises(IqaVerifyError, match=says):
            fn(*x.values())
