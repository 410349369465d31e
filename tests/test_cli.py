"""The ``iqa-verify`` command line: subprocess runs of ``python -m iqa_verify`` for the real entry point
(few: each pays the torch import), and the usage-error table through ``cli.main`` in-process."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iqa_verify import cli
from iqa_verify.registry import FAMILIES, builtin_kernels, family

REPO_ROOT = Path(__file__).resolve().parent.parent
CHUNKED = "iqa_verify.kernels.la_forward_chunked:la_forward_chunked"
ZOO_BUG = "tests/bug_zoo/la_forward.py:scale_ignored"
VALUES = "la-forward/values"


# a CI job summary is for the project's own runs, not for these test runs
_ENV = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}


def _python(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=_ENV, capture_output=True, text=True, timeout=300)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return _python("-m", "iqa_verify", *argv)


def _as_python(repro: str) -> list[str]:
    """A repro line (``iqa-verify check ...``) as a ``python -m iqa_verify`` command."""
    argv = shlex.split(repro)
    assert argv[0] == "iqa-verify", repro
    return ["-m", "iqa_verify", *argv[1:]]


# ---------------------------------------------------------------------------------- subprocess runs


def test_list_names_families_properties_and_builtin_kernels() -> None:
    run = _cli("list")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for name in FAMILIES:
        fam = family(name)
        assert f"family {name}: {fam.signature}" in out
        for p in fam.properties:
            assert re.search(rf"^  {re.escape(p.id)} +{re.escape(p.title)}$", out, re.M), p.id
        for k in builtin_kernels(name):
            assert f"    {k.impl}  ({k.summary})" in out
    assert CHUNKED in out
    assert "ci (30 examples/property)" in out and "dtypes: float64, float32, bfloat16, float16" in out


def test_check_a_builtin_kernel_on_one_property_exits_0() -> None:
    run = _cli("check", CHUNKED, "--family", "la-forward", "--only", "la-forward/contract", "--seed", "5")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"PASS +la-forward/contract +\d+ examples", run.stderr)
    assert re.search(r"^ +skip +la-forward/values +0 examples", run.stderr, re.M)
    row = [line.split() for line in run.stdout.splitlines() if line.startswith(CHUNKED)]
    assert row == [[CHUNKED, "la-forward", "float32", "cpu", "PASS", "1/1"]]
    assert "reproduce:" not in run.stdout


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    report_dir = tmp_path_factory.mktemp("cli-report")
    return _cli("check", ZOO_BUG, "--family", "la-forward", "--only", VALUES, "--report", str(report_dir)), report_dir


def _repro_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("reproduce: ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("reproduce: ")


def test_a_planted_bug_exits_1_and_prints_the_counterexample_and_repro(zoo_run) -> None:
    run, _ = zoo_run
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"=== {VALUES} FAILED for {ZOO_BUG} (float32, cpu): outputs equal the float64 reference" in run.stdout
    assert "shrunk counterexample: q[1, 1, 1, 1], k[1, 1, 1, 1], v[1, 1, 1, 1], g[1, 1, 1]; decay=mild" in run.stdout
    assert "out/o: 1 of 1 elements (100%) outside tolerance" in run.stdout
    repro = _repro_line(run.stdout)
    assert repro.startswith(
        f"iqa-verify check {ZOO_BUG} --family la-forward --dtype float32 --device cpu --only {VALUES} --case ")
    assert "Traceback" not in run.stdout + run.stderr


def test_the_repro_command_fails_again_on_the_same_case(zoo_run) -> None:
    run, _ = zoo_run
    repro = _repro_line(run.stdout)
    again = _python(*_as_python(repro))
    assert again.returncode == 1, again.stdout + again.stderr
    assert re.search(rf"FAIL +{re.escape(VALUES)} +1 examples", again.stderr)
    assert _repro_line(again.stdout) == repro
    message = lambda out: out[out.index("shrunk counterexample:"):out.index("reproduce:")]  # noqa: E731
    assert message(again.stdout) == message(run.stdout)


def test_report_dir_gets_report_json_markdown_and_the_failing_inputs(zoo_run) -> None:
    run, report_dir = zoo_run
    assert f"report: {report_dir / 'report.md'} and {report_dir / 'report.json'}" in run.stdout
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["schema_version"] == 1 and doc["complete"] is True
    [verdict] = doc["verdicts"]
    assert (verdict["kernel"], verdict["family"], verdict["passed"]) == (ZOO_BUG, "la-forward", False)
    statuses = {r["property_id"]: r["status"] for r in verdict["results"]}
    assert statuses.pop(VALUES) == "failed" and set(statuses.values()) == {"skipped"}
    repro = _repro_line(run.stdout)
    assert f"Reproduce:\n\n```\n{repro}\n```" in (report_dir / "report.md").read_text()
    [saved] = (report_dir / "counterexamples").iterdir()
    assert saved.name == "la-forward--values--la_forward.py.scale_ignored--float32.pt"
    payload = torch.load(saved)
    assert payload["repro"] == repro and set(payload["inputs"]) == {"q", "k", "v", "g", "initial_state"}
    assert payload["inputs"]["q"].shape == (1, 1, 1, 1) and payload["inputs"]["initial_state"] is None


def test_a_usage_error_exits_2_with_one_line_and_no_traceback() -> None:
    run = _cli("check", "no_such_pkg.kernels:la_forward", "--family", "la-forward")
    assert run.returncode == 2
    assert run.stderr == (
        "iqa-verify: error: IMPL module='no_such_pkg.kernels' could not be imported:"
        " ModuleNotFoundError: No module named 'no_such_pkg'\n"
    )
    assert run.stdout == ""


# ---------------------------------------------------------------------------------- usage errors, in-process

_RAISING_FILE = "raising_kernel.py"

def _check(impl: str, *extra: str, family_name: str = "la-forward") -> list[str]:
    return ["check", impl, "--family", family_name, *extra]


USAGE_ERRORS = [
    # id, argv ({tmp} is a folder holding a kernel file that raises at import), message on stderr
    ("impl-without-colon", _check("iqa_verify.kernels.la_forward_chunked"),
     "IMPL='iqa_verify.kernels.la_forward_chunked': expected 'package.module:attr' or 'path/to/file.py:attr'"),
    ("impl-empty-attr", _check("iqa_verify.kernels.la_forward_chunked:"), "expected 'package.module:attr'"),
    ("module-not-importable", _check("no_such_pkg.kernels:la_forward"),
     "IMPL module='no_such_pkg.kernels' could not be imported: ModuleNotFoundError: No module named 'no_such_pkg'"),
    ("file-not-found", _check("missing/kernel.py:la_forward"), "IMPL file='missing/kernel.py': no such file"),
    ("attr-missing", _check("iqa_verify.kernels.la_forward_chunked:la_forward_chunky"),
     "IMPL attr='la_forward_chunky': not found in 'iqa_verify.kernels.la_forward_chunked'; callables there: "),
    ("attr-not-callable", _check("iqa_verify.cli:DTYPES"), "IMPL attr='DTYPES': dict is not callable"),
    ("file-raises-at-import", _check(f"{{tmp}}/{_RAISING_FILE}:la_forward"),
     f"IMPL file='{{tmp}}/{_RAISING_FILE}' could not be imported: RuntimeError: needs a GPU build of mylib"),
    ("unknown-family", _check(CHUNKED, family_name="la-backward"), f"'la-backward': no such family; valid: {', '.join(FAMILIES)}"),
    ("unknown-only", _check(CHUNKED, "--only", "la-forward/valuez"),
     "'la-forward/valuez': no such property in family la-forward; valid: la-forward/contract, la-forward/values"),
    ("unknown-skip", _check(CHUNKED, "--skip", "values"),
     "'values': no such property in family la-forward; valid: la-forward/contract"),
    ("malformed-case", _check(CHUNKED, "--case", '{"B": 1, "T":'), """case='{"B": 1, "T":': not an la case spec ("""),
    ("case-unknown-decay", _check(CHUNKED, "--case", '{"B":1,"T":1,"H":1,"D":1,"E":1,"decay":"fast"}'),
     "not an la case spec ('fast' is not a valid Decay)"),
    ("cuda-unavailable", _check(CHUNKED, "--device", "cuda"), "device='cuda': CUDA is not available on this machine"),
    ("device-unknown", _check(CHUNKED, "--device", "tpu"), "device='tpu': must be cpu or cuda[:N]"),
    ("device-not-cpu-or-cuda", _check(CHUNKED, "--device", "meta"), "device='meta': must be cpu or cuda[:N]"),
    ("report-device-unknown", ["report", "--device", "tpu", "--out", "{tmp}"], "device='tpu': must be cpu or cuda[:N]"),
    ("time-budget-zero", _check(CHUNKED, "--time-budget", "0"), "time_budget=0.0: seconds per property must be > 0"),
    ("report-budget-negative", ["report", "--third-party-budget", "-1", "--out", "{tmp}"],
     "time_budget=-1.0: seconds per property must be > 0"),
    ("report-jobs-zero", ["report", "--jobs", "0", "--out", "{tmp}"], "jobs=0: the number of runs at once must be >= 1"),
    ("report-jobs-in-process", ["report", "--jobs", "2", "--in-process", "--out", "{tmp}"],
     "jobs=2: --in-process runs every kernel in this one process; use --jobs 1"),
    ("bad-dtype", _check(CHUNKED, "--dtype", "float8"), "argument --dtype: invalid choice: 'float8'"),
    ("bad-profile", _check(CHUNKED, "--profile", "nightly"), "argument --profile: invalid choice: 'nightly'"),
    ("family-missing", ["check", CHUNKED], "the following arguments are required: --family"),
    ("no-command", [], "the following arguments are required: command"),
]


@pytest.fixture
def isolated_imports(monkeypatch):
    """Kernel loading adds to sys.path and sys.modules: undo it after each in-process run."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same table on machines with a GPU
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("iqa_verify_user_"):
            del sys.modules[name]


@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=i) for i, a, m in USAGE_ERRORS])
def test_usage_errors_exit_2_with_a_clear_message(argv, message, tmp_path, capsys, isolated_imports) -> None:
    (tmp_path / _RAISING_FILE).write_text('raise RuntimeError("needs a GPU build of mylib")\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE == 2, out + err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in out + err
    assert err.startswith("iqa-verify: error: ") or err.startswith("usage: iqa-verify")
    assert not (tmp_path / "latest").exists()  # nothing was run or written
