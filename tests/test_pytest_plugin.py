"""The pytest plugin: ``pytest --iqa-impl IMPL --iqa-family F`` runs one item per property x kernel x dtype."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from iqa_verify.registry import FAMILIES, family
from tests.bug_zoo import la_forward as zoo

pytest_plugins = ["pytester"]

FAM = family("la-forward")
ZOO_BUG = f"{zoo.__file__}:decay_ratio_of_cumprod"  # NaN from exp(b_i) / exp(b_j) under strong decay
CHUNKED = "iqa_verify.kernels.la_forward_chunked:la_forward_chunked"
# the properties the planted bug breaks (0/0 = NaN in outputs and gradients under strong decay); the others hold
REF_FAILS = {"la-forward/values", "la-forward/gradients", "la-forward/finite"}
# the reference-free ones see the NaN too, where the other run of the same kernel is finite
ZOO_FAILS = REF_FAILS | {"la-forward/state-handoff", "la-forward/causality"}
# no cu_seqlens keyword: not varlen-capable, reported n/a (a skipped item)
ZOO_NA = {"la-forward/varlen-values", "la-forward/varlen-gradients", "la-forward/varlen-one-by-one"}


def _args(*impls: str, junit: Path) -> list[str]:
    return ["-p", "no:cacheprovider", *(a for i in impls for a in ("--iqa-impl", i)), "--iqa-family", "la-forward",
            "--iqa-dtype", "float32", f"--junitxml={junit}", "-rf"]


def _junit_outcomes(path: Path) -> dict[str, tuple[str, str]]:
    """testcase name -> (outcome, failure text) from a JUnit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        failure = case.find("failure")
        outcome = "failed" if failure is not None else ("skipped" if case.find("skipped") is not None else "passed")
        out[case.get("name")] = (outcome, failure.text if failure is not None else "")
    return out


def _expected(short: str, fails: set[str], na: set[str] = frozenset()) -> dict[str, str]:
    return {f"{p.id}[{short}-float32]": ("failed" if p.id in fails else "skipped" if p.id in na else "passed")
            for p in FAM.properties}


def test_one_item_per_property_with_the_right_failures_and_counterexamples(pytester: pytest.Pytester) -> None:
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest(*_args(ZOO_BUG, CHUNKED, junit=junit))
    result.assert_outcomes(passed=2 * len(FAM.properties) - len(ZOO_FAILS) - len(ZOO_NA), failed=len(ZOO_FAILS),
                           skipped=len(ZOO_NA))
    outcomes = _junit_outcomes(junit)
    expected = {**_expected("decay_ratio_of_cumprod", ZOO_FAILS, ZOO_NA), **_expected("la_forward_chunked", set())}
    assert {name: o for name, (o, _) in outcomes.items()} == expected  # the correct built-in passes all
    for pid in sorted(REF_FAILS):
        text = outcomes[f"{pid}[decay_ratio_of_cumprod-float32]"][1]
        head = text.splitlines()[0]
        assert head.startswith(f"{pid} failed for {ZOO_BUG} (") and "float32" in head and "cpu" in head
        assert "shrunk counterexample: q[1, " in text and "decay=underflow" in text
        repro = f"reproduce: iqa-verify check {ZOO_BUG} --family la-forward --dtype float32 --device cpu --only {pid}"
        assert f"{repro} --case '" in text
        result.stdout.fnmatch_lines([f"FAILED *{pid}[[]decay_ratio_of_cumprod-float32[]]*"])
    result.stdout.fnmatch_lines(["*non-finite*where the*reference is finite*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_xdist_gives_the_same_outcomes(pytester: pytest.Pytester) -> None:
    """The same items and outcomes with ``-n 2`` as in a serial run (a cheap planted bug that fails fast)."""
    impl = f"{zoo.__file__}:last_partial_chunk_dropped"
    serial, parallel = pytester.path / "serial.xml", pytester.path / "xdist.xml"
    pytester.runpytest(*_args(impl, junit=serial))
    result = pytester.runpytest(*_args(impl, junit=parallel), "-n", "2")
    result.stdout.fnmatch_lines(["*2 workers*"])
    outcomes = {name: o for name, (o, _) in _junit_outcomes(parallel).items()}
    assert outcomes == {name: o for name, (o, _) in _junit_outcomes(serial).items()}
    assert set(outcomes) == set(_expected("last_partial_chunk_dropped", set()))
    assert outcomes["la-forward/values[last_partial_chunk_dropped-float32]"] == "failed"
    assert outcomes["la-forward/contract[last_partial_chunk_dropped-float32]"] == "passed"
    assert all("reproduce: iqa-verify check" in text for o, text in _junit_outcomes(parallel).values() if o == "failed")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iqa-impl", CHUNKED], "--iqa-impl needs --iqa-family (see `iqa-verify list`)"),
        (["--iqa-impl", CHUNKED, "--iqa-family", "la-backward"], f"'la-backward': no such family; valid: {', '.join(FAMILIES)}"),
        (["--iqa-impl", "no_such_pkg:la_forward", "--iqa-family", "la-forward"],
         "IMPL module='no_such_pkg' could not be imported: ModuleNotFoundError: No module named 'no_such_pkg'"),
        (["--iqa-impl", "iqa_verify.kernels.la_forward_chunked", "--iqa-family", "la-forward"],
         "IMPL='iqa_verify.kernels.la_forward_chunked': expected 'package.module:attr' or 'path/to/file.py:attr'"),
    ],
    ids=["impl-without-family", "unknown-family", "module-not-importable", "impl-without-colon"],
)
def test_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: {message}" in result.stderr.str()


def test_no_iqa_items_without_iqa_impl(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--iqa-family", "la-forward")
    result.assert_outcomes(passed=1)
