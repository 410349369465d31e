"""The regression gate: a baseline, a degraded-but-passing kernel (exit 1, named), an unchanged kernel (exit 0),
and unreadable or incompatible baselines (exit 2, with what is wrong)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iqa_verify.cli import main

CHUNKED = "iqa_verify.kernels.la_forward_chunked:la_forward_chunked"
DEGRADED = str(Path(__file__).parent / "bug_zoo" / "degraded.py") + ":precision_loss_within_tolerance"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "baseline.json"
    assert main(["gate", CHUNKED, "--family", "la-forward", "--write-baseline", str(path)]) == 0
    return path


def test_baseline_file_records_every_property(baseline: Path) -> None:
    doc = json.loads(baseline.read_text())
    assert doc["schema"] == "iqa-verify-baseline" and doc["schema_version"] == 1
    assert {e["property"] for e in doc["entries"]} >= {"la-forward/values", "la-forward/gradients"}
    assert doc["profile"] == "ci" and doc["seed"] == 0 and doc["family"] == "la-forward"


def test_unchanged_kernel_passes_the_gate(baseline: Path, capsys) -> None:
    assert main(["gate", CHUNKED, "--family", "la-forward", "--baseline", str(baseline)]) == 0
    assert "no property regressed" in capsys.readouterr().out


def test_degraded_kernel_passes_check_but_fails_the_gate(baseline: Path, capsys) -> None:
    assert main(["check", DEGRADED, "--family", "la-forward", "--only", "la-forward/values"]) == 0
    capsys.readouterr()
    assert main(["gate", DEGRADED, "--family", "la-forward", "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "la-forward/values (float32): worst error ratio" in out


def test_max_regression_is_respected(baseline: Path) -> None:
    args = ["gate", DEGRADED, "--family", "la-forward", "--baseline", str(baseline), "--max-regression", "1000"]
    assert main(args) == 0


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "b.json"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "no such file", id="missing-file"),
        pytest.param("{not json", "not a readable JSON file", id="invalid-json"),
        pytest.param('{"schema": "other"}', "not an iqa-verify baseline", id="wrong-schema"),
        pytest.param('{"schema": "iqa-verify-baseline", "schema_version": 99}', "schema_version=99", id="future-version"),
        pytest.param('{"schema": "iqa-verify-baseline", "schema_version": 1, "kernel": "k", "family": "la-forward"}',
                     "malformed entry", id="missing-fields"),
        pytest.param(json.dumps({"schema": "iqa-verify-baseline", "schema_version": 1, "kernel": "k", "family": "iqa-x",
                                 "profile": "ci", "seed": 0, "device": "cpu", "entries": []}),
                     "recorded for family 'iqa-x'", id="other-family"),
    ],
)
def test_bad_baseline_is_a_usage_error(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content)
    assert main(["gate", CHUNKED, "--family", "la-forward", "--baseline", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_gate_needs_a_baseline_or_write_baseline(capsys) -> None:
    assert main(["gate", CHUNKED, "--family", "la-forward"]) == 2
    assert "--baseline FILE" in capsys.readouterr().err
