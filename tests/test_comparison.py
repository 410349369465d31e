"""compare() and the tolerance table: what is counted, where the worst element is, what is allowed and why."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from iqa_verify.cli import DTYPES
from iqa_verify.comparison import compare
from iqa_verify.errors import IqaVerifyError
from iqa_verify.registry import family
from iqa_verify.tolerances import TABLE, Kind, Tolerance, tolerance

F64 = torch.float64
TOL32 = tolerance(Kind.VALUE, torch.float32)  # rtol = atol = 2e-5, baseline factor 4


def _allowed(tol: Tolerance, ref: float, scale: float) -> float:
    return tol.rtol * abs(ref) + tol.atol * scale


# ------------------------------------------------------------------------------------------ compare()


def test_identical_tensors_pass_with_ratio_zero(gen: torch.Generator) -> None:
    ref = torch.randn(3, 4, generator=gen, dtype=F64)
    c = compare("out/o", ref.float(), ref.float().double(), TOL32, dtype=torch.float32)
    assert c.passed and c.ratio == 0.0 and c.mismatches == 0 and c.numel == 12
    assert c.describe().startswith("out/o: ok, worst error ratio 0 at ")


def test_mismatches_are_counted_with_their_share() -> None:
    ref = torch.linspace(1.0, 2.0, 10, dtype=F64)
    actual = ref.clone()
    actual[[1, 4, 7]] += 1e-3  # far outside rtol*|ref| + atol*scale ~ 6e-5
    actual[9] += 1e-6  # inside
    c = compare("out/o", actual, ref, TOL32, dtype=torch.float32)
    assert not c.passed
    assert (c.mismatches, c.numel) == (3, 10)
    assert "out/o: 3 of 10 elements (30%) outside tolerance" in c.describe()


def test_worst_ratio_and_worst_relative_difference_with_their_indices() -> None:
    ref = torch.ones(2, 3, dtype=F64)
    ref[0, 1] = 1e-3
    actual = ref.clone()
    actual[1, 2] += 1e-2  # largest abs difference and largest error ratio (250)
    actual[0, 1] += 1e-4  # smaller abs difference, largest relative one (0.1)
    c = compare("grad/dq", actual, ref, TOL32, dtype=torch.float32)
    assert c.worst_index == (1, 2) and c.worst_rel_index == (0, 1)
    assert c.worst_abs == pytest.approx(1e-2)
    assert c.worst_rel == pytest.approx(0.1)
    assert (c.actual_at_worst, c.expected_at_worst) == (pytest.approx(1.01), 1.0)
    assert c.allowed_at_worst == pytest.approx(_allowed(TOL32, 1.0, 1.0))
    assert c.ratio == pytest.approx(1e-2 / _allowed(TOL32, 1.0, 1.0))
    assert c.mismatches == 2
    text = c.describe()
    assert "abs diff 1.000e-02 at [1, 2] (kernel 1.01, reference 1)" in text
    assert "largest abs diff 1.000e-02 at [1, 2]; largest rel diff 1.000e-01 at [0, 1]" in text
    assert c.max_abs_index == (1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_kernel_values_where_the_reference_is_finite_fail(bad: float) -> None:
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    actual = ref.clone()
    actual[1] = bad
    c = compare("out/final_state", actual, ref, TOL32, dtype=torch.float32)
    assert not c.passed and c.nonfinite == 1 and c.mismatches == 1
    assert c.ratio == math.inf and c.worst_index == (1,)
    assert "1 non-finite kernel values where the reference is finite" in c.describe()


def test_non_finite_reference_entries_are_not_compared() -> None:
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=F64)
    actual = torch.tensor([1.0, float("nan"), 5.0], dtype=F64)
    c = compare("out/o", actual, ref, TOL32, dtype=torch.float32)
    assert c.passed and c.numel == 1 and c.nonfinite == 0


@pytest.mark.parametrize(
    ("dtype", "beyond"), [(torch.float32, 1e39), (torch.float16, 1e5), (torch.bfloat16, 1e39)], ids=str
)
def test_reference_entries_beyond_the_dtype_range_are_not_compared_nor_set_the_scale(dtype, beyond) -> None:
    ref = torch.tensor([beyond, 1.0, 0.5], dtype=F64)
    tol = tolerance(Kind.VALUE, dtype)
    ok = torch.tensor([math.inf, 1.0, 0.5], dtype=F64)  # no dtype can hold the first entry: skipped
    c = compare("out/o", ok, ref, tol, dtype=dtype)
    assert c.passed and c.numel == 2 and c.nonfinite == 0
    # The scale of the atol term is that of the comparable entries (1.0), not of the skipped one:
    # an error of 10x the allowance at scale 1 fails.
    off = ok.clone()
    off[2] += 10 * _allowed(tol, 0.5, 1.0)
    c = compare("out/o", off, ref, tol, dtype=dtype)
    assert not c.passed and c.worst_index == (2,) and c.allowed_terms[1] == pytest.approx(tol.atol * 1.0)
    # float64 can represent the entry: it is compared, and inf is then a non-finite failure
    c64 = compare("out/o", ok, ref, tolerance(Kind.VALUE, F64), dtype=F64)
    assert not c64.passed and c64.nonfinite == 1 and c64.numel == 3


def test_the_baseline_term_allows_a_multiple_of_the_baseline_error() -> None:
    ref = torch.ones(4, dtype=F64)
    actual = ref.clone()
    actual[2] += 1e-3
    assert not compare("out/o", actual, ref, TOL32, dtype=torch.float32).passed
    baseline = ref.clone()
    baseline[0] += 3e-4  # factor 4 -> 1.2e-3 extra allowance everywhere
    baseline[3] = float("nan")  # non-finite baseline entries do not count
    c = compare("out/o", actual, ref, TOL32, dtype=torch.float32, baseline=baseline)
    assert c.passed
    assert c.baseline_err == pytest.approx(3e-4)
    assert c.allowed_terms[2] == pytest.approx(TOL32.baseline_factor * 3e-4)
    assert c.allowed_at_worst == pytest.approx(_allowed(TOL32, 1.0, 1.0) + 1.2e-3)
    assert "baseline (same-dtype PyTorch computation) max abs error 3.000e-04" in c.describe()
    # a baseline that is as good as the reference gives no extra allowance
    tight = compare("out/o", actual, ref, TOL32, dtype=torch.float32, baseline=ref.clone())
    assert not tight.passed and tight.baseline_err == 0.0


def test_explicit_scale_replaces_the_tensors_own_scale() -> None:
    ref = torch.zeros(3, dtype=F64)  # a gradient that is exactly zero in theory
    actual = torch.full((3,), 1e-8, dtype=F64)  # round-off
    own = compare("grad/dg", actual, ref, TOL32, dtype=torch.float32)
    assert not own.passed  # judged against its own (zero -> float32 tiny) scale
    assert own.allowed_terms[1] == pytest.approx(TOL32.atol * torch.finfo(torch.float32).tiny)
    sib = compare("grad/dg", actual, ref, TOL32, dtype=torch.float32, scale=1.0)
    assert sib.passed and sib.allowed_terms[1] == pytest.approx(TOL32.atol)
    # scale also tightens: a large tensor judged against a small sibling scale fails
    big = torch.full((3,), 100.0, dtype=F64)
    assert compare("grad/dg", big + 1e-3, big, TOL32, dtype=torch.float32).passed
    assert not compare("grad/dg", big + 1e-1, big, TOL32, dtype=torch.float32, scale=1e-3).passed


def test_shape_mismatch_fails_and_says_which_shape_the_contract_requires() -> None:
    c = compare("out/final_state", torch.zeros(2, 3), torch.zeros(3, 2, dtype=F64), TOL32, dtype=torch.float32)
    assert not c.passed and c.ratio == math.inf
    assert c.describe() == "out/final_state: shape (2, 3) but the contract requires (3, 2)"


def test_describe_names_the_path_the_tolerance_and_its_table_entry() -> None:
    ref = torch.ones(2, 2, dtype=F64)
    tol = tolerance(Kind.GRAD, torch.bfloat16)
    c = compare("grad/dinitial_state", ref + 1.0, ref, tol, dtype=torch.bfloat16)
    text = c.describe()
    assert text.startswith("grad/dinitial_state: 4 of 4 elements (100%) outside tolerance")
    assert "tolerance: rtol=0.04, atol=0.04 (x scale), baseline_factor=8 from tolerances.TABLE[grad, bfloat16]" in text
    assert "allowed there 8.000e-02 = rtol*|ref| 4.00e-02 + atol*scale 4.00e-02 + 8*baseline 0.00e+00" in text


def test_actual_of_another_dtype_and_layout_is_compared_elementwise(gen: torch.Generator) -> None:
    ref = torch.randn(4, 5, generator=gen, dtype=F64)
    actual = ref.t().contiguous().t().to(torch.bfloat16)  # non-contiguous bf16 view
    c = compare("out/o", actual, ref, tolerance(Kind.VALUE, torch.bfloat16), dtype=torch.bfloat16)
    assert c.passed and c.numel == 20
    wrong = actual.clone()
    wrong[3, 4] = -wrong[3, 4] - 1
    c = compare("out/o", wrong, ref, tolerance(Kind.VALUE, torch.bfloat16), dtype=torch.bfloat16)
    assert not c.passed and c.worst_index == (3, 4)


# ------------------------------------------------------------------------------------------ the table


def test_every_kind_and_dtype_in_use_has_a_table_entry() -> None:
    """The CLI runs any family in any of its dtypes, so every comparison kind (bar the float64-only
    REFERENCE) covers them all; and every dtype a family declares is among them."""
    for kind in Kind:
        dtypes = [F64] if kind is Kind.REFERENCE else list(DTYPES.values())
        for dtype in dtypes:
            tol = tolerance(kind, dtype)
            assert tol is TABLE[(kind, dtype)]
            assert tol.source == f"tolerances.TABLE[{kind.value}, {str(dtype).removeprefix('torch.')}]"
    assert set(family("la-forward").dtypes) <= set(DTYPES.values())
    assert tolerance(Kind.REFERENCE, F64).baseline_factor == 0.0  # exact oracles: no baseline allowance


def test_rtol_and_atol_are_given_together_and_gradients_are_looser() -> None:
    for (kind, dtype), tol in TABLE.items():
        assert math.isfinite(tol.rtol) and tol.rtol >= 0, (kind, dtype)
        if kind in (Kind.NATURAL_SCALE, Kind.OPERAND_ROUNDING):  # never a tolerance of its own: a term added to
            # a GRAD or VALUE entry's allowance
            assert tol.rtol > 0 and tol.atol == 0 and tol.baseline_factor == 0, (kind, dtype)
            continue
        assert math.isfinite(tol.atol) and tol.atol > 0, (kind, dtype)  # an all-zero reference never demands exact zeros
        if kind is Kind.VALUE:
            grad = TABLE[(Kind.GRAD, dtype)]
            assert grad.rtol >= tol.rtol and grad.atol >= tol.atol and grad.baseline_factor >= tol.baseline_factor
    with pytest.raises(TypeError):
        Tolerance(1e-3)  # type: ignore[call-arg]  # an rtol without its atol is not a tolerance


def test_lower_precision_never_gets_a_tighter_tolerance() -> None:
    order = [F64, torch.float32, torch.float16, torch.bfloat16]  # eps 2^-52, 2^-23, 2^-10, 2^-7
    for kind in Kind:
        entries = [TABLE[(kind, d)] for d in order if (kind, d) in TABLE]
        for field in ("rtol", "atol"):
            values = [getattr(t, field) for t in entries]
            assert values == sorted(values), (kind, field, values)


@pytest.mark.parametrize(
    ("kind", "dtype", "message"),
    [
        (Kind.VALUE, torch.int32,
         "dtype=torch.int32: no value tolerance; the table covers bfloat16, float16, float32, float64"),
        (Kind.GRAD, torch.complex64, "dtype=torch.complex64: no grad tolerance; the table covers"),
        (Kind.REFERENCE, torch.float32, "dtype=torch.float32: no reference tolerance; the table covers float64"),
    ],
    ids=["value-int32", "grad-complex64", "reference-float32"],
)
def test_unknown_dtype_names_the_dtype(kind: Kind, dtype: torch.dtype, message: str) -> None:
    with pytest.raises(IqaVerifyError, match=re.escape(message)):
        tolerance(kind, dtype)


def test_no_tolerance_literals_outside_the_table() -> None:
    """The one-table rule (STYLE.md): no ``rtol=``/``atol=`` number at a call site in the suite's code."""
    root = Path(__file__).resolve().parent.parent
    literal = re.compile(r"\b[ra]tol\s*=\s*[-+]?[0-9.]")
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for folder in ("iqa_verify", "reference", "properties")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "tolerances.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_natural_scale_term_adds_eps_times_the_terms_and_says_so() -> None:
    nat = tolerance(Kind.NATURAL_SCALE, torch.float32)
    ref = torch.tensor([1e-20, 1e-3], dtype=F64)
    got = torch.tensor([6e-8, 1e-3])
    assert not compare("grad/dg", got, ref, TOL32, dtype=torch.float32).passed
    c = compare("grad/dg", got, ref, TOL32, dtype=torch.float32, natural=torch.tensor([4.0, 0.0], dtype=F64),
                natural_tol=nat)
    assert c.passed and c.natural_at_worst == pytest.approx(nat.rtol * 4.0) and "natural scale" in c.describe()
