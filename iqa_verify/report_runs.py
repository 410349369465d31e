"""The report's kernel x family x dtype x device runs: one after another, or several at once.

Each run is a :class:`ReportRun` (plain data, so that it crosses a process boundary). With ``jobs`` > 1
the runs go to that many supervisor processes (each judges its runs and keeps its own kernel workers:
the judge and the judged stay in different processes); every supervisor registers with
:mod:`iqa_verify.cpu_share`, so two of them on two cores get one thread each instead of oversubscribing.
Verdicts come back in the runs' order whatever order they finish in.

A supervisor process that dies (it should not: kernels run in their own workers) does not lose the
report: its run gets a failing verdict that says so, and the others go on. Ctrl-C or SIGTERM ends every
supervisor (and with it every kernel worker); the verdicts finished so far are returned, marked
interrupted.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from iqa_verify.errors import IqaVerifyError
from iqa_verify.outcomes import PropertyResult, Status, Verdict

__all__ = ["ReportRun", "run_all", "execute"]


@dataclass(frozen=True)
class ReportRun:
    """One verdict's worth of work: kernel ``impl`` under ``family`` in ``dtype`` on ``device``."""

    family: str
    impl: str
    third_party: bool
    dtype: str
    device: str
    profile: str
    seed: int
    out: Path
    time_budget_s: float | None
    isolation: object  # supervisor.Isolated | supervisor.InProcess
    database: Path | None

    def describe(self) -> str:
        return f"{self.impl} — {self.family}, {self.dtype}, {self.device}, profile {self.profile}, seed {self.seed}"


def _failed(run: ReportRun, pid: str, title: str, why: str) -> Verdict:
    verdict = Verdict(run.impl, run.family, run.dtype, run.device, run.profile, run.seed,
                      third_party=run.third_party, time_budget_s=run.time_budget_s)
    verdict.results.append(PropertyResult(pid, title, Status.FAILED, 0, 0.0, error=why))
    return verdict


def execute(run: ReportRun, on_result: Callable[[PropertyResult], None] | None = None,
            progress: Callable[[str, int], None] | None = None) -> Verdict:
    """Run ``run`` here (this process judges; the kernel runs as ``run.isolation`` says). A kernel that
    cannot load, or whose worker cannot be restarted, gets a failing verdict that says why."""
    import torch

    from iqa_verify.profiles import profile_named
    from iqa_verify.registry import family
    from iqa_verify.runner import RunConfig, check
    from iqa_verify.supervisor import load

    fam = family(run.family)
    try:
        kernel = load(run.impl, run.isolation)  # type: ignore[arg-type]
    except IqaVerifyError as exc:
        return _failed(run, "load", "the kernel loads", str(exc))
    cfg = RunConfig(fam, kernel, run.impl, getattr(torch, run.dtype), torch.device(run.device), profile_named(run.profile),
                    run.seed, run.out, time_budget_s=run.time_budget_s, isolation=run.isolation,  # type: ignore[arg-type]
                    database=run.database)
    try:
        verdict = check(cfg, progress=progress, on_result=on_result)
    except IqaVerifyError as exc:  # its worker could not be restarted
        return _failed(run, "load", "the kernel loads", str(exc))
    verdict.third_party = run.third_party
    return verdict


_stopping = False


def _interrupt(signum, frame) -> None:
    global _stopping
    _stopping = True
    raise KeyboardInterrupt


def _supervisor(tasks, results) -> None:
    """A supervisor process: runs tasks until told to stop (None, or SIGTERM from the parent); reports
    ("start", i, None) then ("done", i, verdict). Interrupted inside a run, it sends what that run finished
    (marked incomplete) and stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole process group: the parent decides
    signal.signal(signal.SIGTERM, _interrupt)
    from iqa_verify.supervisor import close_all

    try:
        while not _stopping and (item := tasks.get()) is not None:
            i, run = item
            results.put(("start", i, None))
            try:
                verdict = execute(run)
            except Exception:  # the harness broke on this run: say so in its verdict, go on
                verdict = _failed(run, "harness", "the harness ran", traceback.format_exc())
            results.put(("done", i, verdict))
            if not verdict.complete:
                break
    except KeyboardInterrupt:
        pass
    finally:
        close_all()


def run_all(runs: Sequence[ReportRun], jobs: int, *, on_start: Callable[[ReportRun], None],
            on_verdict: Callable[[int, Verdict], None],
            sequential: Callable[[ReportRun], Verdict]) -> tuple[list[Verdict], bool]:
    """Every run's verdict in ``runs``' order and whether all finished (False: interrupted).

    jobs <= 1, or a single run: each run by ``sequential`` in this process (live progress). Otherwise that
    many supervisor processes; ``on_start``/``on_verdict`` are called here as runs start and end."""
    if jobs <= 1 or len(runs) <= 1:
        done: list[Verdict] = []
        try:
            for i, run in enumerate(runs):
                on_start(run)
                verdict = sequential(run)
                done.append(verdict)
                on_verdict(i, verdict)
                if not verdict.complete:
                    return done, False
        except KeyboardInterrupt:
            return done, False
        return done, True
    return _in_parallel(runs, min(jobs, len(runs)), on_start, on_verdict)


def _in_parallel(runs: Sequence[ReportRun], jobs: int, on_start, on_verdict) -> tuple[list[Verdict], bool]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(runs):
        tasks.put(item)
    procs = [ctx.Process(target=_supervisor, args=(tasks, results), name=f"iqa-verify-supervisor-{n}", daemon=True)
             for n in range(jobs)]
    for _ in procs:
        tasks.put(None)
    verdicts: dict[int, Verdict] = {}
    started: list[int] = []
    complete = True

    def take(timeout: float) -> Verdict | bool:
        """Handle one message if one comes within ``timeout``: the verdict it brought, True for a start, False
        when none came."""
        try:
            kind, i, verdict = results.get(timeout=timeout)
        except queue.Empty:
            return False
        if kind == "start":
            started.append(i)
            on_start(runs[i])
            return True
        verdicts[i] = verdict
        on_verdict(i, verdict)
        return verdict

    try:
        for p in procs:
            p.start()
        quiet = 0
        while len(verdicts) < len(runs):
            got = take(0.5)
            if isinstance(got, Verdict) and not got.complete:  # a supervisor was interrupted
                complete = False
                break
            if got:
                continue
            if any(p.is_alive() for p in procs):
                continue
            quiet += 1  # every supervisor has exited: what they sent last may still be in the pipe
            if quiet >= 4:
                _lost(runs, verdicts, started, procs, on_verdict)
                break
    except KeyboardInterrupt:
        complete = False
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the supervisor sends what its run finished, ends its workers, exits
        deadline = time.monotonic() + 20
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            take(0.2)  # keep reading: a supervisor cannot exit while its last verdict fills the pipe
        while take(0.2):
            pass
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    ordered = [verdicts[i] for i in sorted(verdicts)]
    return ordered, complete and len(ordered) == len(runs) and all(v.complete for v in ordered)


def _lost(runs: Sequence[ReportRun], verdicts: dict[int, Verdict], started: Iterable[int], procs, on_verdict) -> None:
    """Every supervisor has exited with runs unfinished: those that had started failed with the exit codes."""
    codes = ", ".join(str(p.exitcode) for p in procs)
    for i in started:
        if i not in verdicts:
            verdicts[i] = _failed(runs[i], "harness", "the harness ran",
                                  f"its supervisor process exited (exit codes {codes}) before a verdict")
            on_verdict(i, verdicts[i])
