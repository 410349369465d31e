"""Write verdicts as ``report.json`` (versioned schema) and ``report.md``, atomically.

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

from iqa_verify.outcomes import PropertyResult, Status, Verdict

__all__ = ["SCHEMA_VERSION", "write_report", "verdict_to_dict", "render_markdown", "summary_rows"]

SCHEMA_VERSION = 1


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
        ran = [r for r in v.results if r.status is not Status.SKIPPED]
        ok = sum(r.status is Status.PASSED for r in ran)
        ratios = [r.worst_ratio for r in ran if r.worst_ratio is not None]
        verdict = "PASS" if v.passed else ("INCOMPLETE" if not v.complete else "FAIL")
        rows.append([v.kernel, v.family, v.dtype, v.device, verdict, f"{ok}/{len(ran)}",
                     f"{max(ratios):.3g}" if ratios else ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def render_markdown(verdicts: Sequence[Verdict], meta: dict[str, Any]) -> str:
    lines = [f"# iqa-verify report — {meta.get('run_id', '')}", ""]
    lines.append(f"Profile `{meta.get('profile')}`, seed {meta.get('seed')}, torch {meta['environment']['torch']}, "
                 f"created {meta.get('created')}." + ("" if meta.get("complete", True) else " **Interrupted: incomplete.**"))
    lines += ["", "Error ratio = worst |kernel − float64 reference| / allowed (≤ 1 passes); see README, tolerance policy.", ""]
    lines += _table(["kernel", "family", "dtype", "device", "verdict", "properties", "worst ratio"], summary_rows(verdicts))
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
                        [[r.property_id, r.status.label, str(r.examples), f"{r.seconds:.1f}", _ratio(r)] for r in v.results])
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, verdicts: Sequence[Verdict], *, profile: str, seed: int, run_id: str | None = None,
                 complete: bool = True) -> dict[str, Path]:
    """Write report.json and report.md under ``folder``; returns their paths."""
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
    doc = {**meta, "verdicts": [verdict_to_dict(v) for v in verdicts]}
    paths = {"json": folder / "report.json", "md": folder / "report.md"}
    _atomic_write(paths["json"], json.dumps(doc, indent=1, allow_nan=False) + "\n")
    _atomic_write(paths["md"], render_markdown(verdicts, meta))
    return paths
