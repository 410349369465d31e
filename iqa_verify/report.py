"""Write verdicts as ``report.json`` (versioned schema), ``report.md`` and ``index.html``, atomically.

Files are written to a temporary name in the target folder and renamed into place, so a crash or
Ctrl-C never leaves a half-written report; a run that was interrupted writes what it verified with
``complete: false``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from iqa_verify.diagnostics import Diagnostic, Table
from iqa_verify.outcomes import PropertyResult, Status, Verdict

__all__ = [
    "SCHEMA_VERSION",
    "THIRD_PARTY_NOTE",
    "append_step_summary",
    "render_markdown",
    "summary_rows",
    "verdict_to_dict",
    "write_report",
]

SCHEMA_VERSION = 1

THIRD_PARTY_NOTE = (
    "Third-party kernels (adapters) are reported as they are: their failures are findings about those kernels"
    " and do not decide this run's exit status. \"time-bounded\": a per-property time budget ended the search"
    " early (Triton's interpreter on CPU); the examples column says how many ran."
)


def _plain(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.name.lower()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def verdict_to_dict(v: Verdict) -> dict[str, Any]:
    d = _plain(v)
    d["passed"] = v.passed
    return d


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ratio(r: PropertyResult) -> str:
    return "" if r.worst_ratio is None else f"{r.worst_ratio:.3g}"


def summary_rows(verdicts: Sequence[Verdict]) -> list[list[str]]:
    """One row per verdict: kernel, family, dtype, device, verdict, properties passed, worst error ratio."""
    rows = []
    for v in verdicts:
        ran = [r for r in v.results if r.status not in (Status.SKIPPED, Status.NOT_APPLICABLE)]
        ok = sum(r.status is Status.PASSED for r in ran)
        ratios = [r.worst_ratio for r in ran if r.worst_ratio is not None]
        verdict = "PASS" if v.passed else ("INCOMPLETE" if not v.complete else "FAIL")
        if v.time_bounded:
            verdict += " (time-bounded)"
        kernel = f"{v.kernel} (third-party)" if v.third_party else v.kernel
        rows.append([kernel, v.family, v.dtype, v.device, verdict, f"{ok}/{len(ran)}",
                     f"{max(ratios):.3g}" if ratios else ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def summary_markdown(verdicts: Sequence[Verdict]) -> str:
    """The summary table and one line per failure with its repro: for CI job summaries."""
    lines = _table(["kernel", "family", "dtype", "device", "verdict", "properties", "worst ratio"], summary_rows(verdicts))
    for v in verdicts:
        for r in v.failed():
            repro = f": `{r.counterexample.repro}`" if r.counterexample else ""
            lines.append(f"- **{r.property_id}** failed for `{v.kernel}` ({v.dtype}, {v.device}){repro}")
    return "\n".join(lines) + "\n"


def append_step_summary(verdicts: Sequence[Verdict], title: str = "iqa-verify") -> None:
    """Append the Markdown summary to ``$GITHUB_STEP_SUMMARY`` when it is set (GitHub Actions)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"## {title}\n\n{summary_markdown(verdicts)}\n")


def render_markdown(verdicts: Sequence[Verdict], meta: dict[str, Any],
                    diagnostics: dict[str, Sequence[Diagnostic] | str] | None = None) -> str:
    lines = [f"# iqa-verify report — {meta.get('run_id', '')}", ""]
    lines.append(f"Profile `{meta.get('profile')}`, seed {meta.get('seed')}, torch {meta['environment']['torch']}, "
                 f"created {meta.get('created')}." + ("" if meta.get("complete", True) else " **Interrupted: incomplete.**"))
    lines += ["", "Error ratio = worst |kernel − float64 reference| / allowed (≤ 1 passes); see README, tolerance policy.", ""]
    if any(v.third_party for v in verdicts):
        lines += [THIRD_PARTY_NOTE, ""]
    lines += _table(["kernel", "family", "dtype", "device", "verdict", "properties", "worst ratio"], summary_rows(verdicts))
    for fam, diag in (diagnostics or {}).items():
        tables = [d for d in diag if isinstance(d, Table)] if not isinstance(diag, str) else []
        if isinstance(diag, str):
            lines += ["", f"## {fam}: diagnostics could not be computed", "", "```", diag.strip(), "```"]
        for t in tables:
            lines += ["", f"## {fam}: {t.title}", ""] + _table(list(t.header), [list(r) for r in t.rows])
            if t.note:
                lines += ["", t.note]
        if not isinstance(diag, str) and len(tables) < len(diag):
            lines += ["", f"Charts for {fam} ({len(diag) - len(tables)}) are in index.html."]
    failures = [(v, r) for v in verdicts for r in v.failed()]
    if failures:
        lines += ["", "## Failures", ""]
    for v, r in failures:
        lines += [f"### {r.property_id} — `{v.kernel}` ({v.dtype}, {v.device})", "", f"{r.title}: {r.status.message}.", ""]
        if r.counterexample:
            c = r.counterexample
            lines += [f"Shrunk counterexample: {c.shapes}; {c.regime}", "", "```", c.message, "```", "",
                      "Reproduce:", "", "```", c.repro, "```"]
            if c.inputs_path:
                lines += ["", f"Inputs saved to `{c.inputs_path}`."]
        if r.error:
            lines += ["```", r.error.strip(), "```"]
        lines.append("")
    lines += ["", "## Properties", ""]
    for v in verdicts:
        lines += [f"### `{v.kernel}` — {v.family}, {v.dtype}, {v.device}", ""]
        lines += _table(["property", "status", "examples", "seconds", "worst ratio"],
                        [[r.property_id, r.status.label, r.examples_label, f"{r.seconds:.1f}", _ratio(r)] for r in v.results])
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, verdicts: Sequence[Verdict], *, profile: str, seed: int, run_id: str | None = None,
                 complete: bool = True, diagnostics: dict[str, Sequence[Diagnostic] | str] | None = None,
                 html: bool = True) -> dict[str, Path]:
    """Write report.json, report.md and (unless ``html=False``) index.html under ``folder``; returns their
    paths. ``diagnostics`` maps a family to its charts and tables, or to the error text that stopped them."""
    folder = Path(folder)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "tool": "iqa-verify",
        "run_id": run_id or folder.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile,
        "seed": seed,
        "complete": complete and all(v.complete for v in verdicts),
        "environment": _environment(),
    }
    doc = {**meta, "verdicts": [verdict_to_dict(v) for v in verdicts], "diagnostics": _plain(diagnostics or {})}
    paths = {"json": folder / "report.json", "md": folder / "report.md"}
    _atomic_write(paths["json"], json.dumps(doc, indent=1, allow_nan=False) + "\n")
    _atomic_write(paths["md"], render_markdown(verdicts, meta, diagnostics))
    if html:
        from iqa_verify.html_report import render_html  # matplotlib is imported only when a page is drawn

        paths["html"] = folder / "index.html"
        _atomic_write(paths["html"], render_html(verdicts, meta, diagnostics))
    return paths
