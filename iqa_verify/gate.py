"""The regression gate: compare a run's worst error ratios with a recorded baseline.

A baseline file records, for one kernel and family, the worst error ratio (error / allowed, <= 1
passes) of every property in every dtype it was run in, with the profile and seed that produced them.
The gate re-runs the same examples (same profile and seed) and fails a property whose ratio grew by
more than ``max_regression`` (relative), ignoring ratios below :data:`RATIO_FLOOR` — growth from 0.001
to 0.003 of the allowance is noise, not a regression.

Schema (JSON, ``schema_version`` 1)::

    {"schema": "iqa-verify-baseline", "schema_version": 1, "kernel": "pkg.mod:fn", "family": "la-forward",
     "profile": "ci", "seed": 0, "device": "cpu",
     "entries": [{"dtype": "float32", "property": "la-forward/values", "worst_ratio": 0.011}, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from iqa_verify.errors import IqaVerifyError
from iqa_verify.outcomes import Status, Verdict

__all__ = [
    "BASELINE_SCHEMA",
    "BASELINE_VERSION",
    "DEFAULT_MAX_REGRESSION",
    "RATIO_FLOOR",
    "Baseline",
    "BaselineEntry",
    "Regression",
    "baseline_from_verdicts",
    "find_regressions",
    "load_baseline",
    "write_baseline",
]

BASELINE_SCHEMA = "iqa-verify-baseline"
BASELINE_VERSION = 1
DEFAULT_MAX_REGRESSION = 0.5
"""Default allowed relative growth of a property's worst error ratio (0.5: +50%)."""
RATIO_FLOOR = 0.05
"""Ratios below this share of the allowance are not judged for regression."""


@dataclass(frozen=True)
class BaselineEntry:
    dtype: str
    property: str
    worst_ratio: float | None


@dataclass(frozen=True)
class Baseline:
    kernel: str
    family: str
    profile: str
    seed: int
    device: str
    entries: tuple[BaselineEntry, ...]

    def ratio(self, dtype: str, property_id: str) -> float | None:
        for e in self.entries:
            if e.dtype == dtype and e.property == property_id:
                return e.worst_ratio
        return None

    def dtypes(self) -> list[str]:
        return sorted({e.dtype for e in self.entries})


@dataclass(frozen=True)
class Regression:
    property: str
    dtype: str
    before: float
    after: float
    max_regression: float

    def describe(self) -> str:
        growth = (self.after / self.before - 1.0) * 100 if self.before > 0 else float("inf")
        return (f"{self.property} ({self.dtype}): worst error ratio {self.before:.3g} -> {self.after:.3g}"
                f" (+{growth:.0f}%), more than the allowed +{self.max_regression * 100:.0f}%")


def baseline_from_verdicts(verdicts: Sequence[Verdict]) -> Baseline:
    if not verdicts:
        raise IqaVerifyError("verdicts=[]: nothing to record in a baseline")
    v0 = verdicts[0]
    entries = tuple(
        BaselineEntry(v.dtype, r.property_id, r.worst_ratio)
        for v in verdicts for r in v.results if r.status is Status.PASSED
    )
    return Baseline(v0.kernel, v0.family, v0.profile, v0.seed, v0.device, entries)


def write_baseline(path: Path, baseline: Baseline) -> None:
    doc = {"schema": BASELINE_SCHEMA, "schema_version": BASELINE_VERSION, **asdict(baseline)}
    doc["entries"] = [asdict(e) for e in baseline.entries]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def load_baseline(path: Path) -> Baseline:
    """Read a baseline; an :class:`IqaVerifyError` says what is wrong with an unreadable or incompatible file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IqaVerifyError(f"baseline={str(path)!r}: no such file (record one with --write-baseline)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IqaVerifyError(f"baseline={str(path)!r}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != BASELINE_SCHEMA:
        raise IqaVerifyError(f"baseline={str(path)!r}: not an iqa-verify baseline (schema must be {BASELINE_SCHEMA!r})")
    if doc.get("schema_version") != BASELINE_VERSION:
        raise IqaVerifyError(f"baseline={str(path)!r}: schema_version={doc.get('schema_version')!r}, this iqa-verify"
                             f" reads version {BASELINE_VERSION}; record a new baseline with --write-baseline")
    try:
        entries = tuple(BaselineEntry(str(e["dtype"]), str(e["property"]),
                                      None if e["worst_ratio"] is None else float(e["worst_ratio"]))
                        for e in doc["entries"])
        return Baseline(str(doc["kernel"]), str(doc["family"]), str(doc["profile"]), int(doc["seed"]),
                        str(doc["device"]), entries)
    except (KeyError, TypeError, ValueError) as exc:
        raise IqaVerifyError(f"baseline={str(path)!r}: malformed entry ({type(exc).__name__}: {exc})") from None


def find_regressions(verdicts: Sequence[Verdict], baseline: Baseline, max_regression: float) -> list[Regression]:
    """Properties whose worst error ratio grew by more than ``max_regression`` against ``baseline``."""
    out = []
    for v in verdicts:
        for r in v.results:
            before = baseline.ratio(v.dtype, r.property_id)
            if before is None or r.worst_ratio is None or r.status is not Status.PASSED:
                continue
            if r.worst_ratio > RATIO_FLOOR and r.worst_ratio > max(before, RATIO_FLOOR) * (1.0 + max_regression):
                out.append(Regression(r.property_id, v.dtype, before, r.worst_ratio, max_regression))
    return out
