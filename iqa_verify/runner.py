"""Run a family's properties against a kernel with Hypothesis and turn what happens into a Verdict.

Each property gets its own search: the family's pinned edge regimes first, then random cases from its
strategy (deterministic for a given seed), then shrinking of the first failure towards the smallest
case within the profile's shrink budget. A kernel that raises, returns garbage or breaks a property
yields a FAILED result with the shrunk counterexample; a failure of the harness itself is recorded as
ERROR with its traceback. Neither crashes the run, and Ctrl-C returns what was verified so far,
marked incomplete.

The kernel runs where ``RunConfig.isolation`` says (:mod:`iqa_verify.supervisor`): by default in a worker
process, so that exiting, crashing, hanging or raising anything ends in a FAILED result naming what
happened (the worker is replaced and the search goes on, shrinking included, each candidate in a live
worker); what it prints is kept and shown with a failure.
"""

from __future__ import annotations

import shlex
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky

from iqa_verify import cpu_share
from iqa_verify.comparison import TensorCheck
from iqa_verify.family import Family, NotApplicable, Property, PropertyContext, Violation
from iqa_verify.outcomes import Counterexample, PropertyResult, Status, Verdict
from iqa_verify.profiles import Profile
from iqa_verify.supervisor import Isolated, Isolation, KernelHost, host_for

__all__ = ["RunConfig", "check", "run_property"]

Progress = Callable[[str, int], None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RunConfig:
    """One kernel under one family, dtype, device, profile and seed.

    kernel_name is how a person names the kernel on the command line (``pkg.mod:attr`` or
    ``path.py:attr``): repro commands use it. report_dir, when set, receives failing inputs.
    time_budget_s, when set, bounds each property's search: once that many seconds have passed (and at
    least one example ran, and nothing has failed yet) no new example starts; the result says so. For
    kernels that run slowly here (third-party Triton kernels in the interpreter). isolation: where the
    kernel runs (:class:`~iqa_verify.supervisor.Isolated`, the default, loads ``kernel_name`` in a worker
    process and ``kernel`` may be None; :class:`~iqa_verify.supervisor.InProcess` calls ``kernel`` here).
    """

    family: Family
    kernel: Callable[..., Any] | None
    kernel_name: str
    dtype: torch.dtype
    device: torch.device
    profile: Profile
    seed: int = 0
    report_dir: Path | None = None
    time_budget_s: float | None = None
    isolation: Isolation = Isolated()

    @property
    def example_timeout_s(self) -> float:
        """Seconds one kernel call may take: the isolation's, else the profile's default."""
        own = self.isolation.example_timeout_s if isinstance(self.isolation, Isolated) else None
        return own if own is not None else self.profile.example_timeout_s

    def repro(self, prop: Property, spec_json: str) -> str:
        return (
            f"iqa-verify check {shlex.quote(self.kernel_name)} --family {self.family.name}"
            f" --dtype {_dtype_name(self.dtype)} --device {self.device.type} --only {prop.id}"
            f" --case {shlex.quote(spec_json)}"
        )


class _Failed(Exception):
    def __init__(self, spec: Any, shapes: str, violation: Violation, checks: list[TensorCheck], inputs: dict) -> None:
        super().__init__(violation.message)
        self.spec, self.shapes, self.violation, self.checks, self.inputs = spec, shapes, violation, checks, inputs


class _Search:
    """State of one property's search: examples run, worst passing ratio, failures seen while shrinking."""

    def __init__(self, cfg: RunConfig, prop: Property, progress: Progress | None, host: KernelHost) -> None:
        self.cfg, self.prop, self.progress, self.host = cfg, prop, progress, host
        self.examples = 0
        self.worst_ratio: float | None = None
        self.worst: tuple[TensorCheck, ...] = ()
        self.ratios: list[float] = []
        self.failures: dict[Any, _Failed] = {}
        self.first_failure_at: float | None = None
        self.started = time.monotonic()
        self.budget_reached = False

    def _over_time_budget(self) -> bool:
        budget = self.cfg.time_budget_s
        return (budget is not None and self.examples >= 1 and self.first_failure_at is None
                and time.monotonic() - self.started > budget)

    def _over_shrink_budget(self) -> bool:
        return self.first_failure_at is not None and (
            time.monotonic() - self.first_failure_at > self.cfg.profile.shrink_budget_s
        )

    def run_one(self, spec: Any) -> None:
        if self._over_shrink_budget():
            # Settle: replay known failures without re-running, call every new candidate a pass.
            if spec in self.failures:
                raise self.failures[spec]
            return
        if self._over_time_budget():  # no new example: Hypothesis runs out its remaining draws at no cost
            self.budget_reached = True
            return
        self.examples += 1
        if self.progress:
            self.progress(self.prop.id, self.examples)
        cfg = self.cfg
        case = cfg.family.build(spec, cfg.dtype, cfg.device)
        ctx = PropertyContext(family=cfg.family, host=self.host, kernel_name=cfg.kernel_name, case=case,
                              during=self.prop.id, timeout_s=cfg.example_timeout_s)
        try:
            self.prop.check(ctx)
        except Violation as v:
            if ctx.printed:
                v = Violation(f"{v.message}\n{_printed(ctx.printed)}", v.checks)
            failed = _Failed(spec, case.shapes(), v, list(v.checks or ctx.checks), case.inputs)
            self.ratios.append(max((c.ratio for c in failed.checks), default=float("inf")))
            self.failures[spec] = failed
            if self.first_failure_at is None:
                self.first_failure_at = time.monotonic()
            raise failed from None
        ratios = [c.ratio for c in ctx.checks]
        if ratios:
            self.ratios.append(max(ratios))
        if ratios and (self.worst_ratio is None or max(ratios) > self.worst_ratio):
            self.worst_ratio = max(ratios)
            self.worst = tuple(ctx.checks)


def _printed(chunks: Sequence[str], limit: int = 2000) -> str:
    text = "".join(chunks)
    if len(text) > limit:
        text = text[: limit // 2] + f"\n... ({len(text) - limit} characters cut) ...\n" + text[-limit // 2:]
    return "the kernel printed (cut short):\n" + "\n".join(f"  | {line}" for line in text.rstrip().splitlines())


def _save_inputs(cfg: RunConfig, prop: Property, failed: _Failed) -> str | None:
    if cfg.report_dir is None:
        return None
    folder = Path(cfg.report_dir) / "counterexamples"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{cfg.family.name}--{prop.id.split('/')[-1]}--{Path(cfg.kernel_name).name.replace(':', '.')}--{_dtype_name(cfg.dtype)}"
    path = folder / f"{stem}.pt"
    payload = {
        "spec": failed.spec.to_json(),
        "inputs": {n: (t.detach().cpu().clone() if t is not None else None) for n, t in failed.inputs.items()},
        "repro": cfg.repro(prop, failed.spec.to_json()),
    }
    torch.save(payload, path)
    return str(path)


def _counterexample(cfg: RunConfig, prop: Property, failed: _Failed, note: str = "") -> Counterexample:
    spec_json = failed.spec.to_json()
    return Counterexample(
        spec_json=spec_json,
        regime=failed.spec.regime(),
        shapes=failed.shapes,
        message=(note + failed.violation.message) if note else failed.violation.message,
        checks=tuple(failed.checks),
        repro=cfg.repro(prop, spec_json),
        inputs_path=_save_inputs(cfg, prop, failed),
    )


def run_property(
    cfg: RunConfig, prop: Property, *, case_json: str | None = None, progress: Progress | None = None,
    host: KernelHost | None = None,
) -> PropertyResult:
    """Search for a counterexample to ``prop``; replay exactly one case when ``case_json`` is given."""
    cpu_share.apply()
    host = host or host_for(cfg.kernel_name, cfg.isolation, cfg.kernel)
    search = _Search(cfg, prop, progress, host)
    started = time.monotonic()

    def result(status: Status, counterexample: Counterexample | None = None, **kw: Any) -> PropertyResult:
        worst_ratio, worst = search.worst_ratio, search.worst
        if counterexample is not None:  # the failing example is the worst one
            worst = counterexample.checks
            worst_ratio = max((c.ratio for c in worst), default=float("inf"))
        return PropertyResult(
            property_id=prop.id,
            title=prop.title,
            status=status,
            examples=search.examples,
            seconds=time.monotonic() - started,
            worst_ratio=worst_ratio,
            worst=worst,
            counterexample=counterexample,
            ratios=tuple(search.ratios),
            budget_reached=search.budget_reached,
            **kw,
        )

    pinned_failure: _Failed | None = None
    try:
        if case_json is not None:
            search.run_one(cfg.family.spec_from_json(case_json))
        else:
            # Pinned edge regimes first; they are not shrunk by Hypothesis, so on a failure the random
            # search below still runs to find (and shrink) a smaller counterexample.
            for spec in cfg.family.pinned(cfg.profile):
                try:
                    search.run_one(spec)
                except _Failed as failed:
                    pinned_failure = failed
                    break
            test = settings(
                max_examples=cfg.profile.max_examples,
                database=None,
                deadline=None,
                derandomize=False,
                verbosity=Verbosity.quiet,
                report_multiple_bugs=False,
                print_blob=False,
                suppress_health_check=list(HealthCheck),
                phases=(Phase.generate, Phase.shrink),
            )(hypothesis_seed(cfg.seed)(given(cfg.family.cases(cfg.profile))(search.run_one)))
            test()
    except _Failed as failed:
        return result(Status.FAILED, counterexample=_counterexample(cfg, prop, failed))
    except NotApplicable as na:
        return result(Status.NOT_APPLICABLE, note=na.reason)
    except Flaky:
        last = list(search.failures.values())[-1] if search.failures else None
        if last is None:
            return result(Status.ERROR, error=traceback.format_exc())
        note = "the failure did not reproduce when replayed (non-deterministic kernel); first failure: "
        return result(Status.FAILED, counterexample=_counterexample(cfg, prop, last, note))
    except KeyboardInterrupt:
        raise
    except Exception:
        return result(Status.ERROR, error=traceback.format_exc())
    if pinned_failure is not None:
        note = "fails on a pinned edge regime (random search found no smaller case): "
        return result(Status.FAILED, counterexample=_counterexample(cfg, prop, pinned_failure, note))
    return result(Status.PASSED)


def check(
    cfg: RunConfig,
    *,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    case_json: str | None = None,
    progress: Progress | None = None,
    on_result: Callable[[PropertyResult], None] | None = None,
) -> Verdict:
    """Run every property of ``cfg.family`` (or those in ``only``, less ``skip``) against the kernel."""
    for pid in [*only, *skip]:
        cfg.family.property(pid)  # KeyError naming the valid ids
    verdict = Verdict(
        kernel=cfg.kernel_name,
        family=cfg.family.name,
        dtype=_dtype_name(cfg.dtype),
        device=str(cfg.device),
        profile=cfg.profile.name,
        seed=cfg.seed,
        time_budget_s=cfg.time_budget_s,
    )
    host = host_for(cfg.kernel_name, cfg.isolation, cfg.kernel)  # a kernel that cannot load: IqaVerifyError
    for prop in cfg.family.properties:
        if (only and prop.id not in only) or prop.id in skip:
            res = PropertyResult(prop.id, prop.title, Status.SKIPPED, 0, 0.0)
        else:
            try:
                res = run_property(cfg, prop, case_json=case_json, progress=progress, host=host)
            except KeyboardInterrupt:
                verdict.complete = False
                break
        verdict.results.append(res)
        if on_result:
            on_result(res)
    return verdict
