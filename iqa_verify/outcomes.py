"""Verdicts: what a run of the properties found, in small typed objects the CLI, pytest and reports share."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from iqa_verify.comparison import TensorCheck

__all__ = ["Status", "Counterexample", "PropertyResult", "Verdict"]


class Status(enum.Enum):
    """A property's outcome; each member carries the line a person reads."""

    PASSED = ("passed", "held on every example")
    FAILED = ("failed", "does not hold: see the counterexample")
    ERROR = ("error", "the harness itself failed (a bug in iqa-verify): please report it with the traceback")
    SKIPPED = ("skipped", "skipped on request")
    NOT_APPLICABLE = ("n/a", "does not apply to this kernel (see the note)")

    def __init__(self, label: str, message: str) -> None:
        self.label = label
        self.message = message


@dataclass(frozen=True)
class Counterexample:
    """The shrunk failing case: its spec (JSON), regime, input shapes, the one-line repro and saved inputs."""

    spec_json: str
    regime: str
    shapes: str
    message: str
    checks: tuple[TensorCheck, ...]
    repro: str
    inputs_path: str | None = None


@dataclass(frozen=True)
class PropertyResult:
    """property_id; status; examples run; worst_ratio: the largest error/allowed seen over all examples
    (None when the property compares no tensors); worst: the checks of the example with that ratio;
    ratios: each example's largest error ratio, in the order run (for distributions in reports);
    budget_reached: the run's time budget ended the search before the profile's examples were all run
    (a pass then means "held on the examples run", which the reports say); note: why a NOT_APPLICABLE
    property does not apply."""

    property_id: str
    title: str
    status: Status
    examples: int
    seconds: float
    worst_ratio: float | None = None
    worst: tuple[TensorCheck, ...] = ()
    counterexample: Counterexample | None = None
    error: str | None = None
    ratios: tuple[float, ...] = ()
    budget_reached: bool = False
    note: str | None = None

    @property
    def examples_label(self) -> str:
        return f"{self.examples} (time budget)" if self.budget_reached else str(self.examples)


@dataclass
class Verdict:
    """All property results of one kernel x family x dtype x device run. ``third_party``: a kernel
    nobody here wrote, reported as it is (it does not decide the suite's own exit status);
    ``time_budget_s``: the per-property search budget the run had (None: the profile's examples)."""

    kernel: str
    family: str
    dtype: str
    device: str
    profile: str
    seed: int
    results: list[PropertyResult] = field(default_factory=list)
    complete: bool = True
    third_party: bool = False
    time_budget_s: float | None = None

    @property
    def time_bounded(self) -> bool:
        return any(r.budget_reached for r in self.results)

    @property
    def passed(self) -> bool:
        return self.complete and all(r.status in (Status.PASSED, Status.SKIPPED, Status.NOT_APPLICABLE) for r in self.results)

    def failed(self) -> list[PropertyResult]:
        return [r for r in self.results if r.status in (Status.FAILED, Status.ERROR)]
