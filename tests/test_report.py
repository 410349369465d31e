"""write_report: a versioned, strictly valid report.json and a readable report.md, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from iqa_verify import report
from iqa_verify.comparison import compare, shape_mismatch
from iqa_verify.outcomes import Counterexample, PropertyResult, Status, Verdict
from iqa_verify.report import SCHEMA_VERSION, write_report
from iqa_verify.tolerances import Kind, tolerance

KERNEL = "tests/bug_zoo/la_forward.py:decay_ratio_of_cumprod"
REPRO = (
    f"iqa-verify check {KERNEL} --family la-forward --dtype float32 --device cpu --only la-forward/finite"
    """ --case '{"B":1,"T":2}'"""
)


def _nan_check():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    return compare("out/o", torch.tensor([1.0, float("nan")]), ref, tolerance(Kind.VALUE, torch.float32),
                   dtype=torch.float32)


def _verdict(*, complete: bool = True) -> Verdict:
    nan_check = _nan_check()
    ok_check = compare("out/o", torch.ones(2), torch.ones(2, dtype=torch.float64),
                       tolerance(Kind.VALUE, torch.float32), dtype=torch.float32)
    counterexample = Counterexample(
        spec_json='{"B":1,"T":2}', regime="decay=underflow, S0 None, contiguous", shapes="q[1, 2, 1, 1], g[1, 2, 1]",
        message="values differ | from the float64 reference\n" + nan_check.describe(),
        checks=(nan_check, shape_mismatch("out/final_state", torch.zeros(2), (1,))), repro=REPRO,
    )
    return Verdict(
        kernel=KERNEL, family="la-forward", dtype="float32", device="cpu", profile="ci", seed=3, complete=complete,
        results=[
            PropertyResult("la-forward/values", "outputs equal the float64 reference", Status.PASSED, 36, 1.25,
                           worst_ratio=0.5, worst=(ok_check,)),
            PropertyResult("la-forward/finite", "finite wherever the float64 reference is finite", Status.FAILED, 12,
                           0.5, worst_ratio=float("inf"), worst=counterexample.checks, counterexample=counterexample),
            PropertyResult("la-forward/gradients", "gradients", Status.ERROR, 1, 0.1,
                           error="Traceback (most recent call last):\nZeroDivisionError: division by zero\n"),
            PropertyResult("la-forward/contract", "contract", Status.SKIPPED, 0, 0.0),
        ],
    )


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant} in report.json")

    return json.loads(text, parse_constant=refuse)


def test_report_json_is_strict_json_with_schema_version_and_per_property_fields(tmp_path) -> None:
    paths = write_report(tmp_path / "run", [_verdict()], profile="ci", seed=3)
    assert (paths["json"], paths["md"]) == (tmp_path / "run" / "report.json", tmp_path / "run" / "report.md")
    doc = _strict_json(paths["json"].read_text())
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    meta = (doc["tool"], doc["run_id"], doc["profile"], doc["seed"], doc["complete"])
    assert meta == ("iqa-verify", "run", "ci", 3, True)
    assert doc["environment"]["torch"] == torch.__version__
    [v] = doc["verdicts"]
    assert (v["kernel"], v["family"], v["dtype"], v["device"], v["passed"], v["complete"]) == (
        KERNEL, "la-forward", "float32", "cpu", False, True)
    by_id = {r["property_id"]: r for r in v["results"]}
    assert [r["status"] for r in v["results"]] == ["passed", "failed", "error", "skipped"]
    passed, failed = by_id["la-forward/values"], by_id["la-forward/finite"]
    assert (passed["examples"], passed["seconds"], passed["worst_ratio"]) == (36, 1.25, 0.5)
    assert passed["counterexample"] is None
    assert passed["worst"][0]["path"] == "out/o" and passed["worst"][0]["passed"] is True
    assert passed["worst"][0]["tolerance"]["source"] == "tolerances.TABLE[value, float32]"
    assert failed["worst_ratio"] == "inf"  # non-finite numbers become strings, never NaN/Infinity literals
    c = failed["counterexample"]
    assert (c["spec_json"], c["repro"], c["inputs_path"]) == ('{"B":1,"T":2}', REPRO, None)
    nan_check, shape_check = c["checks"]
    assert nan_check["ratio"] == "inf" and nan_check["nonfinite"] == 1 and nan_check["worst_index"] == [1]
    assert nan_check["actual_at_worst"] == "nan"
    assert shape_check["note"] == "shape (2,) but the contract requires (1,)"
    assert by_id["la-forward/gradients"]["error"].endswith("ZeroDivisionError: division by zero\n")


def test_report_markdown_has_the_summary_table_and_every_failure_with_its_repro(tmp_path) -> None:
    md = write_report(tmp_path, [_verdict(), _verdict()], profile="ci", seed=3, run_id="r1")["md"].read_text()
    assert md.startswith("# iqa-verify report — r1\n")
    header = "| kernel | family | dtype | device | verdict | properties | worst ratio |\n|---|---|---|---|---|---|---|\n"
    assert header in md
    assert md.count(f"| {KERNEL} | la-forward | float32 | cpu | FAIL | 1/3 | inf |") == 2
    assert md.count("### la-forward/finite — ") == 2 and md.count("### la-forward/gradients — ") == 2
    assert md.count(f"Reproduce:\n\n```\n{REPRO}\n```") == 2
    assert "Shrunk counterexample: q[1, 2, 1, 1], g[1, 2, 1]; decay=underflow, S0 None, contiguous" in md
    assert "ZeroDivisionError: division by zero" in md
    assert "| la-forward/values | passed | 36 | 1.2 | 0.5 |" in md
    assert "Interrupted" not in md


def test_a_passing_verdict_has_no_failures_section(tmp_path) -> None:
    v = _verdict()
    v.results = v.results[:1]
    md = write_report(tmp_path, [v], profile="ci", seed=0)["md"].read_text()
    assert f"| {KERNEL} | la-forward | float32 | cpu | PASS | 1/1 | 0.5 |" in md and "## Failures" not in md


def test_an_interrupted_verdict_is_reported_incomplete(tmp_path) -> None:
    paths = write_report(tmp_path, [_verdict(complete=False)], profile="ci", seed=3)
    doc = _strict_json(paths["json"].read_text())
    assert doc["complete"] is False
    assert doc["verdicts"][0]["complete"] is False and doc["verdicts"][0]["passed"] is False
    md = paths["md"].read_text()
    assert "**Interrupted: incomplete.**" in md and "| INCOMPLETE |" in md
    # an interrupted run of complete verdicts (the next kernel never started) is incomplete too
    doc = _strict_json(write_report(tmp_path, [_verdict()], profile="ci", seed=3, complete=False)["json"].read_text())
    assert doc["complete"] is False


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failure_while_writing_leaves_the_old_report_and_no_temporary_file(tmp_path, monkeypatch, failure) -> None:
    write_report(tmp_path, [_verdict()], profile="ci", seed=1)
    old = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert {"report.json", "report.md"} <= set(old)
    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, *args, **kwargs):
            self.f = real_fdopen(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text: str) -> None:
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise failure

    monkeypatch.setattr(report.os, "fdopen", HalfWritten)
    with pytest.raises(type(failure)):
        write_report(tmp_path, [_verdict(complete=False)], profile="ci", seed=2)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old  # no temporary file left either


def test_third_party_and_time_bounded_runs_are_marked_in_every_format(tmp_path) -> None:
    v = _verdict()
    v.third_party, v.time_budget_s = True, 4.0
    v.results[0] = dataclasses.replace(v.results[0], budget_reached=True)
    paths = write_report(tmp_path, [v], profile="ci", seed=3)
    md = paths["md"].read_text()
    assert f"| {KERNEL} (third-party) | la-forward | float32 | cpu | FAIL (time-bounded) |" in md
    assert "| la-forward/values | passed | 36 (time budget) |" in md and "reported as they are" in md
    doc = _strict_json(paths["json"].read_text())
    assert doc["verdicts"][0]["third_party"] is True and doc["verdicts"][0]["results"][0]["budget_reached"] is True
    page = paths["html"].read_text()
    assert "(third-party)" in page and "36 (time budget)" in page and 'class="FAIL"' in page
