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

import hashlib
import os
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
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky

from iqa_verify import cpu_share
from iqa_verify.comparison import TensorCheck
from iqa_verify.family import Family, KernelCrashed, NotApplicable, Property, PropertyContext, Violation
from iqa_verify.outcomes import Counterexample, PropertyResult, Status, Verdict
from iqa_verify.profiles import Profile
from iqa_verify.supervisor import Isolated, Isolation, KernelHost, host_for

__all__ = ["RunConfig", "check", "run_property", "example_database", "DEFAULT_DB"]

DEFAULT_DB = Path(".iqa-verify") / "examples"


def example_database(folder: str | None, *, off: bool = False) -> Path | None:
    """Where failing examples are kept: ``folder`` if given; none when ``off``; else $IQA_VERIFY_DB (a
    folder, or "off"); else ``.iqa-verify/examples`` in the current folder."""
    if off:
        return None
    if folder:
        return Path(folder)
    env = os.environ.get("IQA_VERIFY_DB", "")
    if env.lower() == "off":
        return None
    return Path(env) if env else DEFAULT_DB

Progress = Callable[[str, int], None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RunConfig:
    """One kernel under one family, dtype, device, profile and seed.

    kernel_name is how a person names the kernel on the command line (``pkg.mod:attr`` or
    ``path.py:attr``): repro commands use it. report_dir, when set, receives failing inputs.
    time_budget_s, when set, bounds each property's search: once that many seconds have passed (and at
    least one example ran, and nothing is being shrunk) no new example starts, pinned edge regimes
    included (they run first, smallest first); the result says so. For
    kernels that run slowly here (third-party Triton kernels in the interpreter). database: a folder for
    Hypothesis' example database (failing examples are saved there and replayed first by the next run of
    the same kernel, family, dtype and device; None: nothing is kept). isolation: where the
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
    database: Path | None = None

    def database_key(self) -> bytes:
        """Failing examples are kept per kernel, family, dtype and device (and replayed first)."""
        text = f"{self.kernel_name}|{self.family.name}|{_dtype_name(self.dtype)}|{self.device.type}"
        return hashlib.sha256(text.encode()).digest()

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
    def __init__(self, prop: Property, spec: Any, shapes: str, violation: Violation, checks: list[TensorCheck],
                 inputs: dict) -> None:
        super().__init__(violation.message)
        self.prop, self.spec, self.shapes, self.violation, self.checks, self.inputs = (
            prop, spec, shapes, violation, checks, inputs)


@dataclass
class _Passed:
    checks: tuple[TensorCheck, ...]


@dataclass
class _Inapplicable:
    reason: str


@dataclass
class _Broken:
    traceback: str


_Judgement = _Passed | _Failed | _Inapplicable | _Broken


class _Stats:
    """One property's account over the search: examples judged, worst ratio, each example's ratio."""

    def __init__(self) -> None:
        self.examples = 0
        self.worst_ratio: float | None = None
        self.worst: tuple[TensorCheck, ...] = ()
        self.ratios: list[float] = []
        self.pinned_failure: _Failed | None = None
        # a failure on a random case where another property's failure on the same case was chosen for shrinking:
        # kept, so that a search the budget ends before it finds the case again still fails the property
        self.unshrunk_failure: _Failed | None = None

    def add(self, judgement: _Judgement) -> None:
        self.examples += 1
        if isinstance(judgement, _Failed):
            self.ratios.append(max((c.ratio for c in judgement.checks), default=float("inf")))
            return
        if not isinstance(judgement, _Passed):
            return
        ratios = [c.ratio for c in judgement.checks]
        if ratios:
            self.ratios.append(max(ratios))
            if self.worst_ratio is None or max(ratios) > self.worst_ratio:
                self.worst_ratio, self.worst = max(ratios), judgement.checks


class _Search:
    """One search for every selected property of one kernel x family x dtype: each case is built once,
    the kernel evaluated once (plus the few calls determinism and poisoning need) and the reference
    computed once (a memo shared by the properties judging that case), and every property still open is
    judged on it. The first property to fail becomes the shrink target: candidates are then judged for it
    alone until it is shrunk; the search then goes on for the others (cases already judged are not run again).
    """

    def __init__(self, cfg: RunConfig, props: Sequence[Property], progress: Progress | None, host: KernelHost) -> None:
        self.cfg, self.progress, self.host = cfg, progress, host
        self.props = list(props)
        self.stats = {p.id: _Stats() for p in self.props}
        self.judged: dict[Any, dict[str, _Judgement]] = {}
        self.open: list[Property] = list(self.props)
        self.target: Property | None = None
        self.target_since: float | None = None
        self.target_failures: dict[Any, _Failed] = {}
        self.started = time.monotonic()
        self.budget_reached = False
        self.cases = 0

    # -- budgets ------------------------------------------------------------------------------------
    def _over_time_budget(self) -> bool:
        budget = self.cfg.time_budget_s
        return (budget is not None and self.cases >= 1 and self.target is None
                and time.monotonic() - self.started > budget * len(self.props))

    def out_of_time(self) -> bool:
        """Whether the time budget forbids a new case; once it does, the results say the budget was reached."""
        if self._over_time_budget():
            self.budget_reached = True
        return self.budget_reached

    def _over_shrink_budget(self) -> bool:
        return self.target_since is not None and (
            time.monotonic() - self.target_since > self.cfg.profile.shrink_budget_s)

    # -- judging ------------------------------------------------------------------------------------
    def judge(self, spec: Any, props: Sequence[Property]) -> dict[str, _Judgement]:
        """Judgements of ``props`` on ``spec``; a case already judged for a property is not run again."""
        done = self.judged.setdefault(spec, {})
        todo = [p for p in props if p.id not in done]
        if todo:
            cfg = self.cfg
            self.cases += 1
            if self.progress:
                self.progress(todo[0].id if len(todo) == 1 else f"{len(todo)} properties", self.cases)
            case = cfg.family.build(spec, cfg.dtype, cfg.device)
            memo: dict[Any, Any] = {}
            for prop in todo:
                done[prop.id] = self._judge_one(prop, case, memo)
                self.stats[prop.id].add(done[prop.id])
        return {p.id: done[p.id] for p in props}

    def _judge_one(self, prop: Property, case: Any, memo: dict[Any, Any]) -> _Judgement:
        cfg = self.cfg
        ctx = PropertyContext(family=cfg.family, host=self.host, kernel_name=cfg.kernel_name, case=case,
                              during=prop.id, timeout_s=cfg.example_timeout_s, memo=memo)
        try:
            prop.check(ctx)
        except Violation as v:
            if ctx.printed:
                v = Violation(f"{v.message}\n{_printed(ctx.printed)}", v.checks)
            return _Failed(prop, case.spec, case.shapes(), v, list(v.checks or ctx.checks), case.inputs)
        except NotApplicable as na:
            return _Inapplicable(na.reason)
        except KeyboardInterrupt:
            raise
        except Exception:
            return _Broken(traceback.format_exc())
        return _Passed(tuple(ctx.checks))

    def run_one(self, spec: Any) -> None:
        """Hypothesis' test function."""
        if self.target is not None:
            if self._over_shrink_budget():
                # Settle: replay known failures without re-running, call every new candidate a pass.
                if spec in self.target_failures:
                    raise self.target_failures[spec]
                return
            j = self.judge(spec, [self.target])[self.target.id]
            if isinstance(j, _Failed):
                self.target_failures[spec] = j
                raise j
            return
        if self.out_of_time():  # no new example: Hypothesis runs out its remaining draws at no cost
            return
        judgements = self.judge(spec, self.open)
        failed = [(prop, j) for prop in self.open if isinstance(j := judgements[prop.id], _Failed)]
        for prop, j in failed[1:]:  # shrunk later if found again; never lost
            if self.stats[prop.id].unshrunk_failure is None:
                self.stats[prop.id].unshrunk_failure = j
        if failed:
            prop, j = failed[0]
            self.target, self.target_since = prop, time.monotonic()
            self.target_failures = {spec: j}
            raise j


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


def _settings(cfg: RunConfig):
    db = DirectoryBasedExampleDatabase(str(cfg.database)) if cfg.database is not None else None
    return settings(
        max_examples=cfg.profile.max_examples,
        database=db,
        deadline=None,
        derandomize=False,
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.reuse, Phase.generate, Phase.shrink) if db is not None else (Phase.generate, Phase.shrink),
    )


def _pinned_order(cfg: RunConfig) -> list[Any]:
    """The family's pinned edge regimes: in their declared order, or smallest first (by the number of input
    elements) under a time budget, so a slow kernel covers as many regimes as the budget allows."""
    pinned = list(cfg.family.pinned(cfg.profile))
    if cfg.time_budget_s is None:
        return pinned

    def size(spec: Any) -> int:
        inputs = cfg.family.build(spec, cfg.dtype, torch.device("cpu")).inputs.values()
        return sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))

    return sorted(pinned, key=size)


def _search(cfg: RunConfig, props: Sequence[Property], host: KernelHost, results: dict[str, PropertyResult], *,
            case_json: str | None, progress: Progress | None,
            on_result: Callable[[PropertyResult], None] | None) -> None:
    """Fill ``results`` with those of ``props`` as they finish (failures as they are shrunk, passes at the
    end), so that what finished is there when a KeyboardInterrupt propagates."""
    search = _Search(cfg, props, progress, host)
    started = time.monotonic()

    def finish(prop: Property, status: Status, counterexample: Counterexample | None = None, **kw: Any) -> None:
        st = search.stats[prop.id]
        worst_ratio, worst = st.worst_ratio, st.worst
        if counterexample is not None:  # the failing example is the worst one
            worst = counterexample.checks
            worst_ratio = max((c.ratio for c in worst), default=float("inf"))
        results[prop.id] = PropertyResult(
            property_id=prop.id, title=prop.title, status=status, examples=st.examples,
            seconds=time.monotonic() - started, worst_ratio=worst_ratio, worst=worst, counterexample=counterexample,
            ratios=tuple(st.ratios), budget_reached=search.budget_reached and status is Status.PASSED, **kw)
        search.open = [p for p in search.open if p.id != prop.id]
        if on_result:
            on_result(results[prop.id])

    def settle_inapplicable_and_broken() -> None:
        for prop in list(search.open):
            for spec_judgements in search.judged.values():
                j = spec_judgements.get(prop.id)
                if isinstance(j, _Broken):
                    finish(prop, Status.ERROR, error=j.traceback)
                    break
                if isinstance(j, _Inapplicable):
                    finish(prop, Status.NOT_APPLICABLE, note=j.reason)
                    break

    def settle_crashes(shrunk: _Failed) -> None:
        """The kernel process died (exit, signal, hang) on ``shrunk``, a case shrunk for one property: every
        other open property on which it died too is replayed on that case and, dying again, fails there
        without a search of its own (each shrinking step of a crash costs a fresh worker)."""
        crashed = [p for p in search.open
                   if any(isinstance(j, _Failed) and isinstance(j.violation, KernelCrashed)
                          for j in (js.get(p.id) for js in search.judged.values()))]
        if not crashed:
            return
        for j in search.judge(shrunk.spec, crashed).values():
            if isinstance(j, _Failed) and isinstance(j.violation, KernelCrashed):
                finish(j.prop, Status.FAILED, _counterexample(cfg, j.prop, j))

    if case_json is not None:
        spec = cfg.family.spec_from_json(case_json)
        for prop in props:
            j = search.judge(spec, [prop])[prop.id]
            if isinstance(j, _Failed):
                finish(prop, Status.FAILED, _counterexample(cfg, prop, j))
        settle_inapplicable_and_broken()
        for prop in list(search.open):
            finish(prop, Status.PASSED)
        return

    # Pinned edge regimes first, for every property; they are not shrunk by Hypothesis, so a property that
    # fails on one stays open in the random search, which may find (and shrink) a smaller counterexample.
    for spec in _pinned_order(cfg):
        if search.out_of_time():  # a budgeted run bounds the pinned regimes too (after the first)
            break
        # a property that failed on an earlier pinned regime keeps that failure (the random search may find a
        # smaller one): the later regimes are not judged for it
        unfailed = [p for p in search.open if search.stats[p.id].pinned_failure is None]
        if not unfailed:
            break
        for pid, j in search.judge(spec, unfailed).items():
            if isinstance(j, _Failed) and search.stats[pid].pinned_failure is None:
                search.stats[pid].pinned_failure = j
        settle_inapplicable_and_broken()
    while search.open:
        search.target = search.target_since = None
        test = _settings(cfg)(hypothesis_seed(cfg.seed)(given(cfg.family.cases(cfg.profile))(search.run_one)))
        test._hypothesis_internal_database_key = cfg.database_key()  # type: ignore[attr-defined]
        try:
            test()
        except _Failed as failed:
            finish(failed.prop, Status.FAILED, _counterexample(cfg, failed.prop, failed))
            if isinstance(failed.violation, KernelCrashed):
                settle_crashes(failed)
            settle_inapplicable_and_broken()
            continue
        except Flaky:
            prop = search.target
            last = list(search.target_failures.values())[-1] if search.target_failures else None
            if prop is None or last is None:
                raise
            note = "the failure did not reproduce when replayed (non-deterministic kernel); first failure: "
            finish(prop, Status.FAILED, _counterexample(cfg, prop, last, note))
            continue
        settle_inapplicable_and_broken()
        break
    for prop in list(search.open):
        stats = search.stats[prop.id]
        if stats.pinned_failure is not None:
            note = "fails on a pinned edge regime (random search found no smaller case): "
            finish(prop, Status.FAILED, _counterexample(cfg, prop, stats.pinned_failure, note))
        elif stats.unshrunk_failure is not None:
            note = ("fails on a case found while another property failing there was shrunk (the search ended before"
                    " this one was): ")
            finish(prop, Status.FAILED, _counterexample(cfg, prop, stats.unshrunk_failure, note))
        else:
            finish(prop, Status.PASSED)


def run_property(
    cfg: RunConfig, prop: Property, *, case_json: str | None = None, progress: Progress | None = None,
    host: KernelHost | None = None,
) -> PropertyResult:
    """Search for a counterexample to ``prop`` alone; replay exactly one case when ``case_json`` is given."""
    cpu_share.apply()
    host = host or host_for(cfg.kernel_name, cfg.isolation, cfg.kernel)
    results: dict[str, PropertyResult] = {}
    try:
        _search(cfg, [prop], host, results, case_json=case_json, progress=progress, on_result=None)
        return results[prop.id]
    except KeyboardInterrupt:
        raise
    except Exception:
        return PropertyResult(prop.id, prop.title, Status.ERROR, 0, 0.0, error=traceback.format_exc())


def check(
    cfg: RunConfig,
    *,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    case_json: str | None = None,
    progress: Progress | None = None,
    on_result: Callable[[PropertyResult], None] | None = None,
) -> Verdict:
    """Run every property of ``cfg.family`` (or those in ``only``, less ``skip``) against the kernel, in
    one search (see :class:`_Search`). Ctrl-C returns what finished, marked incomplete."""
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
    cpu_share.apply()
    selected = [p for p in cfg.family.properties if not ((only and p.id not in only) or p.id in skip)]
    results: dict[str, PropertyResult] = {}
    try:
        _search(cfg, selected, host, results, case_json=case_json, progress=progress, on_result=on_result)
    except KeyboardInterrupt:
        verdict.complete = False
    except Exception:
        err = traceback.format_exc()
        for p in selected:
            results.setdefault(p.id, PropertyResult(p.id, p.title, Status.ERROR, 0, 0.0, error=err))
    for prop in cfg.family.properties:
        if prop.id in results:
            verdict.results.append(results[prop.id])
        elif prop not in selected:
            verdict.results.append(PropertyResult(prop.id, prop.title, Status.SKIPPED, 0, 0.0))
            if on_result and verdict.complete:
                on_result(verdict.results[-1])
    return verdict
