"""The HTML report: self-contained, and checked in a real browser (headless Chromium, installed by
scripts/setup.sh): the summary table and the charts render. Also: interrupted runs still write a report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iqa_verify.comparison import TensorCheck
from iqa_verify.diagnostics import Chart, Series, Table
from iqa_verify.outcomes import Counterexample, PropertyResult, Status, Verdict
from iqa_verify.report import write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _verdicts() -> list[Verdict]:
    ok = PropertyResult("la-forward/values", "outputs equal the float64 reference", Status.PASSED, 5, 0.1,
                        worst_ratio=0.04, ratios=(0.01, 0.02, 0.04, 0.0, 0.03))
    check = TensorCheck(path="out/o", passed=False, ratio=12.0, mismatches=3, numel=8, worst_index=(0, 1, 0, 0))
    bad = PropertyResult(
        "la-forward/values", "outputs equal the float64 reference", Status.FAILED, 3, 0.2, worst_ratio=12.0,
        ratios=(0.5, 12.0, 3.0), worst=(check,),
        counterexample=Counterexample('{"T":1}', "decay=mild", "q[1, 1, 1, 1]", "out/o: 3 of 8 elements outside",
                                      (check,), "iqa-verify check x.py:k --family la-forward --case '{\"T\":1}'"))
    return [Verdict("pkg.good:kernel", "la-forward", "float32", "cpu", "ci", 0, [ok]),
            Verdict("pkg.bad:kernel", "la-forward", "bfloat16", "cpu", "ci", 0, [bad])]


DIAGNOSTICS = {"iqa": [Chart("convergence", "iteration", "residual",
                             (Series("plain", (0, 1, 2), (1.0, 0.5, 0.25)), Series("anderson", (0, 1, 2), (1.0, 0.1, 0.01))),
                             logy=True, note="‖y_{t+1} − y_t‖ / ‖y_t‖"),
                       Table("solvability", ("T", "D", "E", "identifiable"), (("4", "2", "2", "yes"),))]}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    write_report(folder, _verdicts(), profile="ci", seed=0, run_id="test-run", diagnostics=DIAGNOSTICS)
    return folder


def test_html_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "index.html").read_text()
    assert "<svg" in page and "Summary: 1 of 2" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must not load anything"
    assert "iqa-verify check x.py:k --family la-forward" in page and "solvability" in page
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["diagnostics"]["iqa"][0]["title"] == "convergence"


def test_markdown_carries_tables_and_failures(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert "| pkg.bad:kernel | la-forward | bfloat16 | cpu | FAIL |" in md
    assert "## iqa: solvability" in md and "iqa-verify check x.py:k" in md


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="headless Chromium not installed (scripts/setup.sh installs it; required in CI)")
def test_report_renders_in_a_real_browser(report_dir: Path, tmp_path: Path) -> None:
    assert CHROMIUM, "CI must have Chromium: scripts/setup.sh installs Debian's chromium package"
    url = (report_dir / "index.html").as_uri()
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<table>" in dom and dom.count("<svg") >= 2, "summary table or charts missing from the rendered page"
    shot = tmp_path / "shot.png"
    subprocess.run([*common, "--window-size=1200,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from PIL import Image  # installed with matplotlib

    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    pass_green = (0xDA, 0xFB, 0xE1)
    assert any(c == pass_green for _, c in colours), "the summary table's PASS cell did not render"


def test_interrupted_check_still_writes_an_incomplete_report(tmp_path: Path) -> None:
    """In-process, a KeyboardInterrupt is the user's (isolated, a kernel raising one fails instead: see
    tests/test_misbehaving_kernels.py, which also interrupts an isolated run with SIGTERM). The kernel gets
    the scale wrong, so ``values`` fails (and is shrunk) before the interrupt comes."""
    kernel = tmp_path / "interrupting.py"
    kernel.write_text(
        "from iqa_verify.kernels.la_forward_recurrent import la_forward_recurrent\n"
        "calls = 0\n"
        "def k(q, k, v, g, initial_state=None, *, scale=1.0):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls > 60:\n"
        "        raise KeyboardInterrupt\n"
        "    return la_forward_recurrent(q, k, v, g, initial_state, scale=2 * scale)\n")
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "-m", "iqa_verify", "check", f"{kernel}:k", "--family", "la-forward",
                           "--only", "la-forward/values", "la-forward/contract", "la-forward/deterministic",
                           "--in-process", "--report", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 130, proc.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["complete"] is False
    assert doc["verdicts"][0]["results"], "what was verified before the interrupt must be in the report"
    assert not list(out.glob(".report*")), "no temporary files left behind"
