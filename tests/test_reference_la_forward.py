"""The la-forward float64 references, their sympy closed forms, and the same-precision baseline.

- sympy proves the recurrence and the matrix form identical at small sizes;
- the lambdified closed forms (values and sympy.diff gradients) check both float64 references;
- the two references agree with each other at larger sizes in every decay regime, strong decay included;
- the baseline keeps the dtypes of SPEC §5 and stays close to the reference;
- bad inputs raise IqaVerifyError naming the argument.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import sympy as sp
import torch

from iqa_verify.comparison import TensorCheck, compare
from iqa_verify.contracts import state_dtype_for
from iqa_verify.errors import IqaVerifyError
from iqa_verify.tolerances import Kind, tolerance
from iqa_verify.reference.la_forward import (
    la_forward_baseline,
    la_forward_matrix_ref,
    la_forward_recurrent_ref,
    la_forward_ref,
)
from iqa_verify.reference.la_forward_sympy import (
    LAForms,
    closed_form,
    differing_entries,
    la_symbols,
    loss_gradients,
    matrix_forms,
    prove_forms_identical,
    recurrent_forms,
)

F64 = torch.float64
LAForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
REFERENCES = pytest.mark.parametrize(
    "reference", [la_forward_recurrent_ref, la_forward_matrix_ref], ids=["recurrent", "matrix"]
)
PATHS = ("out/o", "out/final_state", "grad/dq", "grad/dk", "grad/dv", "grad/dg", "grad/dS0")


class Regime(enum.Enum):
    """How the log-decay g [B, T, H] is drawn."""

    NO_DECAY = "g=0"
    SOME_ZERO = "g=0 on some steps"
    MILD = "mild"
    STRONG = "strong"


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: reproducible, and different for every test case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, dtype=F64, generator=gen)


def _log_decay(shape: tuple[int, ...], regime: Regime, gen: torch.Generator) -> torch.Tensor:
    if regime is Regime.NO_DECAY:
        return torch.zeros(shape, dtype=F64)
    if regime is Regime.MILD:
        return _uniform(shape, -0.5, 0.0, gen)
    if regime is Regime.STRONG:  # cumulative -40 * T: far below exp underflow (-745) for T >= 20
        return _uniform(shape, -60.0, -20.0, gen)
    decay = _uniform(shape, -60.0, 0.0, gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.4, torch.zeros_like(decay), decay)


@dataclass(frozen=True)
class Problem:
    """One random la-forward input and loss cotangents.

    q, k: [B, T, H, D]; v, dO: [B, T, H, E]; g: [B, T, H]; S0, dS: [B, H, D, E] (S0 may be None).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    S0: torch.Tensor | None
    scale: float
    dO: torch.Tensor
    dS: torch.Tensor


def _problem(
    gen: torch.Generator, B: int, T: int, H: int, D: int, E: int, regime: Regime, with_state: bool = True
) -> Problem:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=F64, generator=gen)

    return Problem(
        q=randn(B, T, H, D),
        k=randn(B, T, H, D),
        v=randn(B, T, H, E),
        g=_log_decay((B, T, H), regime, gen),
        S0=randn(B, H, D, E) if with_state else None,
        scale=float(_uniform((), 0.25, 1.5, gen)),
        dO=randn(B, T, H, E),
        dS=randn(B, H, D, E),
    )


def _values_and_grads(fn: LAForward, p: Problem, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """o, S_T and the autograd gradients of L = sum(dO ⊙ o) + sum(dS ⊙ S_T) in q, k, v, g, S0."""
    inputs = [x.detach().to(dtype).requires_grad_() for x in (p.q, p.k, p.v, p.g)]
    S0 = None if p.S0 is None else p.S0.detach().to(dtype).requires_grad_()
    o, state = fn(*inputs, S0, scale=p.scale)
    loss = (o.to(F64) * p.dO).sum() + (state.to(F64) * p.dS).sum()
    wrt = inputs + ([] if S0 is None else [S0])
    grads = torch.autograd.grad(loss, wrt)
    return dict(zip(PATHS, (o, state, *grads)))  # without grad/dS0 when S0 is None


def _assert_passed(checks: list[TensorCheck]) -> None:
    failing = [c for c in checks if not c.passed]
    assert not failing, "\n".join(c.describe() for c in failing)


def _compare_all(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[TensorCheck]:
    assert actual.keys() == expected.keys()
    tol = tolerance(Kind.REFERENCE, F64)
    return [compare(path, actual[path], expected[path], tol, dtype=F64) for path in expected]


# --- sympy: the two forms are one function ------------------------------------------------------------


@pytest.mark.parametrize("T, D, E", [(1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 2), (3, 1, 2), (3, 2, 1), (3, 2, 2)])
def test_sympy_recurrence_equals_matrix_form(T: int, D: int, E: int) -> None:
    proof = prove_forms_identical(T, D, E)
    assert proof.identical, f"T={T}, D={D}, E={E}: forms differ at {proof.nonzero}"


def test_sympy_proof_detects_a_wrong_form() -> None:
    """A matrix form that forgets the first step's decay is caught, entry by entry."""
    s = la_symbols(2, 1, 1)
    right = matrix_forms(2, 1, 1)
    first_decay_dropped = {s.g[0]: 0}
    wrong = LAForms(right.o.subs(first_decay_dropped), right.final_state.subs(first_decay_dropped))
    assert differing_entries(recurrent_forms(2, 1, 1), wrong) == ("o[0, 0]", "o[1, 0]", "final_state[0, 0]")


def test_sympy_gradients_match_hand_derivation_at_T1() -> None:
    """T = D = E = 1: o = scale q (e^g S0 + k v), S = e^g S0 + k v, so with c = scale q dO + dS:
    dL/dg = e^g S0 c, dL/dS0 = e^g c, dL/dq = scale dO (e^g S0 + k v), dL/dk = v c, dL/dv = k c."""
    s = la_symbols(1, 1, 1)
    grads = loss_gradients(1, 1, 1)
    q, k, v, g, S0, dO, dS = s.q[0], s.k[0], s.v[0], s.g[0], s.S0[0], s.dO[0], s.dS[0]
    c = s.scale * q * dO + dS
    expected = {
        "dg": sp.exp(g) * S0 * c,
        "dS0": sp.exp(g) * c,
        "dq": s.scale * dO * (sp.exp(g) * S0 + k * v),
        "dk": v * c,
        "dv": k * c,
    }
    for name, formula in expected.items():
        assert sp.simplify(getattr(grads, name)[0] - formula) == 0, name


# --- closed forms vs both float64 references ----------------------------------------------------------


@REFERENCES
@pytest.mark.parametrize("T, D, E", [(1, 1, 1), (2, 2, 1), (3, 1, 2), (3, 2, 2)])
@pytest.mark.parametrize("regime", [Regime.MILD, Regime.STRONG, Regime.SOME_ZERO], ids=lambda r: r.name)
def test_closed_form_matches_reference(
    reference: LAForward, T: int, D: int, E: int, regime: Regime, gen: torch.Generator
) -> None:
    p = _problem(gen, B=2, T=T, H=2, D=D, E=E, regime=regime)
    exact = closed_form(T, D, E)(
        *(x.numpy() for x in (p.q, p.k, p.v, p.g, p.S0)), p.scale, p.dO.numpy(), p.dS.numpy()
    )
    expected = {path: torch.from_numpy(x) for path, x in zip(PATHS, exact)}
    _assert_passed(_compare_all(_values_and_grads(reference, p), expected))


# --- recurrence vs matrix form at larger sizes, every regime ------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 65])
@pytest.mark.parametrize("with_state", [True, False], ids=["S0", "noS0"])
@pytest.mark.parametrize("regime", list(Regime), ids=lambda r: r.name)
def test_recurrence_and_matrix_form_agree(T: int, with_state: bool, regime: Regime, gen: torch.Generator) -> None:
    p = _problem(gen, B=2, T=T, H=3, D=4, E=5, regime=regime, with_state=with_state)
    matrix = _values_and_grads(la_forward_matrix_ref, p)
    recurrent = _values_and_grads(la_forward_recurrent_ref, p)
    for path, x in matrix.items():
        assert x.dtype == F64 and bool(torch.isfinite(x).all()), f"{path}: non-finite or not float64"
    _assert_passed(_compare_all(matrix, recurrent))


def test_cumulative_log_decay_of_minus_1e4_stays_finite(gen: torch.Generator) -> None:
    """g = -50 on every one of 200 steps: b_T = -1e4, exp(b_T) == 0.0 and exp(-b_T) == inf in float64."""
    p = _problem(gen, B=1, T=200, H=2, D=3, E=2, regime=Regime.MILD)
    p = Problem(p.q, p.k, p.v, torch.full_like(p.g, -50.0), p.S0, p.scale, p.dO, p.dS)
    assert float(p.g.sum(1).max()) == -1e4
    matrix = _values_and_grads(la_forward_ref, p)
    for path, x in matrix.items():
        assert bool(torch.isfinite(x).all()), f"{path}: non-finite values"
    _assert_passed(_compare_all(matrix, _values_and_grads(la_forward_recurrent_ref, p)))


def test_references_leave_inputs_untouched_and_accept_views(gen: torch.Generator) -> None:
    """Non-contiguous [B, T, H, *] views give the results of contiguous copies and are not modified."""
    B, T, H, D, E = 2, 5, 3, 2, 3
    base = _problem(gen, B, T, H, D, E, Regime.MILD)
    views = Problem(
        *(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (base.q, base.k, base.v)),
        base.g.transpose(1, 2).contiguous().transpose(1, 2),
        base.S0.transpose(-1, -2).contiguous().transpose(-1, -2),
        base.scale,
        base.dO,
        base.dS,
    )
    assert not views.q.is_contiguous() and not views.S0.is_contiguous()
    before = [x.clone() for x in (views.q, views.k, views.v, views.g, views.S0)]
    for fn in (la_forward_recurrent_ref, la_forward_matrix_ref, la_forward_baseline):
        _assert_passed(_compare_all(_values_and_grads(fn, views), _values_and_grads(fn, base)))
    for x, saved in zip((views.q, views.k, views.v, views.g, views.S0), before):
        assert torch.equal(x, saved)


# --- the same-precision baseline ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["S0", "noS0"])
def test_baseline_dtypes_and_accuracy(dtype: torch.dtype, with_state: bool, gen: torch.Generator) -> None:
    p = _problem(gen, B=2, T=33, H=2, D=4, E=3, regime=Regime.MILD, with_state=with_state)
    low = Problem(
        *(x.to(dtype) for x in (p.q, p.k, p.v, p.g)),
        None if p.S0 is None else p.S0.to(dtype),
        p.scale,
        p.dO,
        p.dS,
    )
    baseline = _values_and_grads(la_forward_baseline, low, dtype)
    assert baseline["out/o"].dtype == dtype
    assert baseline["out/final_state"].dtype == state_dtype_for(dtype)
    for path, x in baseline.items():
        if path.startswith("grad/"):
            assert x.dtype == dtype, f"{path}: dtype {x.dtype}, expected the input dtype {dtype}"
        assert bool(torch.isfinite(x).all()), f"{path}: non-finite values"
    o_ref, state_ref = la_forward_ref(low.q, low.k, low.v, low.g, low.S0, scale=p.scale)
    tol = tolerance(Kind.VALUE, dtype)
    _assert_passed(
        [
            compare("out/o", baseline["out/o"], o_ref, tol, dtype=dtype),
            compare("out/final_state", baseline["out/final_state"], state_ref, tol, dtype=dtype),
        ]
    )


def test_baseline_in_float64_matches_the_reference(gen: torch.Generator) -> None:
    """In float64 the straightforward cumsum form agrees with the segment-sum reference to round-off."""
    p = _problem(gen, B=1, T=9, H=2, D=3, E=2, regime=Regime.MILD)
    baseline = la_forward_baseline(p.q, p.k, p.v, p.g, p.S0, scale=p.scale)
    reference = la_forward_ref(p.q, p.k, p.v, p.g, p.S0, scale=p.scale)
    tol = tolerance(Kind.REFERENCE, torch.float64)
    for name, b, r in zip(("o", "final_state"), baseline, reference):
        check = compare(name, b, r, tol, dtype=torch.float64)
        assert check.passed, check.describe()


def test_baseline_decay_gradient_has_the_cumsum_cancellation(gen: torch.Generator) -> None:
    """Under strong decay the straightforward form's dg is off by far more than round-off (the reason the
    tolerance rule measures it): a baseline as accurate as the reference would make correct cumsum-based
    kernels fail."""
    p = _problem(gen, B=1, T=65, H=2, D=3, E=2, regime=Regime.STRONG)
    grads = []
    for fn in (la_forward_baseline, la_forward_ref):
        g = p.g.clone().requires_grad_()
        o, s = fn(p.q, p.k, p.v, g, p.S0, scale=p.scale)
        (o.sum() + s.sum()).backward()
        grads.append(g.grad)
    tol = tolerance(Kind.REFERENCE, torch.float64)
    assert not compare("grad/dg", grads[0], grads[1], tol, dtype=torch.float64).passed


def test_baseline_error_is_that_of_its_precision(gen: torch.Generator) -> None:
    """The float32 baseline is measurably wrong (not a float64 computation in disguise) but within float32."""
    p = _problem(gen, B=1, T=65, H=2, D=8, E=8, regime=Regime.MILD)
    low = [x.float() for x in (p.q, p.k, p.v, p.g, p.S0)]
    o, _ = la_forward_baseline(*low, scale=p.scale)
    o_ref, _ = la_forward_ref(*low, scale=p.scale)
    err = float((o.double() - o_ref).abs().max() / o_ref.abs().max())
    assert 1e-9 < err < 1e-5, f"float32 baseline relative error {err:.3e}"


# --- input validation ---------------------------------------------------------------------------------


def _valid(B: int = 2, T: int = 3, H: int = 2, D: int = 4, E: int = 5) -> dict[str, torch.Tensor | None]:
    return {
        "q": torch.zeros(B, T, H, D, dtype=F64),
        "k": torch.zeros(B, T, H, D, dtype=F64),
        "v": torch.zeros(B, T, H, E, dtype=F64),
        "g": torch.zeros(B, T, H, dtype=F64),
        "initial_state": torch.zeros(B, H, D, E, dtype=F64),
    }


BAD_INPUTS = {
    "T=0": ({**_valid(T=0)}, "T=0"),
    "g-missing-heads": ({**_valid(), "g": torch.zeros(2, 3, dtype=F64)}, "g.shape=(2, 3)"),
    "g-transposed": ({**_valid(), "g": torch.zeros(2, 2, 3, dtype=F64)}, "g.shape=(2, 2, 3)"),
    "k-float32": ({**_valid(), "k": torch.zeros(2, 3, 2, 4)}, "k.dtype=torch.float32"),
    "g-float32": ({**_valid(), "g": torch.zeros(2, 3, 2)}, "g.dtype=torch.float32"),
    "initial_state-DE-swapped": (
        {**_valid(), "initial_state": torch.zeros(2, 2, 5, 4, dtype=F64)},
        "initial_state.shape=(2, 2, 5, 4)",
    ),
    "q-integer": ({**_valid(), "q": torch.zeros(2, 3, 2, 4, dtype=torch.int64)}, "q.dtype=torch.int64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize(
    "fn",
    [la_forward_recurrent_ref, la_forward_matrix_ref, la_forward_baseline],
    ids=["recurrent", "matrix", "baseline"],
)
def test_bad_inputs_name_the_argument(case: str, fn: LAForward) -> None:
    args, expected = BAD_INPUTS[case]
    with pytest.raises(IqaVerifyError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        fn(args["q"], args["k"], args["v"], args["g"], args["initial_state"])


@pytest.mark.parametrize(
    "sizes, expected", [((0, 1, 1), "T=0"), ((4, 1, 1), "T=4"), ((1, 3, 1), "D=3"), ((1, 1, 3), "E=3")], ids=str
)
def test_sympy_sizes_are_checked(sizes: tuple[int, int, int], expected: str) -> None:
    with pytest.raises(IqaVerifyError, match=expected):
        closed_form(*sizes)


def test_closed_form_checks_array_shapes(gen: torch.Generator) -> None:
    p = _problem(gen, B=1, T=2, H=1, D=1, E=2, regime=Regime.MILD)
    arrays = [x.numpy() for x in (p.q, p.k, p.v, p.g, p.S0)]
    arrays[3] = arrays[3][:, :1]  # g with T=1
    with pytest.raises(IqaVerifyError, match="g.shape"):
        closed_form(2, 1, 2)(*arrays, p.scale, p.dO.numpy(), p.dS.numpy())
