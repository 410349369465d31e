"""The ``iqa-verify`` command line.

    iqa-verify check IMPL --family F [--device cpu|cuda] [--dtype D] [--profile ci|dev|thorough]
                     [--seed N] [--only ID ...] [--skip ID ...] [--case JSON] [--report DIR]
    iqa-verify gate IMPL --family F (--baseline FILE | --write-baseline FILE) [--max-regression R]
                    [--dtype D ...] [--device D] [--profile P] [--seed N]
    iqa-verify list
    iqa-verify report [--out DIR] [--profile P] [--seed N] [--dtype D ...] [--device D ...] [--family F [--impl IMPL ...]]
    (check, gate and report also take --example-timeout SECONDS, --max-memory SIZE, --in-process)

Every command runs the kernel in a worker process (``--in-process`` for debugging with pdb; not safe for
gating): a kernel that exits, crashes, hangs (``--example-timeout``), runs out of memory (``--max-memory``)
or raises anything fails with a message saying so, and the run goes on.

Exit status: 0 every property holds (and, for gate, none regressed); 1 a property fails or regressed (a
kernel that raises on a valid input fails); 2 usage errors (bad arguments, IMPL not importable, unknown
family or property id, unreadable or incompatible baseline); 130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from iqa_verify import cpu_share
from iqa_verify.errors import IqaVerifyError
from iqa_verify.family import BuiltinKernel
from iqa_verify.gate import (
    DEFAULT_MAX_REGRESSION,
    baseline_from_verdicts,
    find_regressions,
    load_baseline,
    write_baseline,
)
from iqa_verify.outcomes import PropertyResult, Status, Verdict
from iqa_verify.profiles import PROFILES, profile_named
from iqa_verify.registry import FAMILIES, builtin_kernels, family, optional_kernels, third_party_kernels
from iqa_verify.report import append_step_summary, summary_rows, write_report
from iqa_verify.report_runs import ReportRun, execute, run_all
from iqa_verify.runner import DEFAULT_DB, RunConfig, check, example_database
from iqa_verify.supervisor import InProcess, Isolated, Isolation, close_all, load, parse_memory

__all__ = ["main"]

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
THIRD_PARTY_BUDGET_S = 4.0
"""Seconds per property for third-party kernels on CPU in ``report`` (Triton's interpreter: seconds a call)."""


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise IqaVerifyError(f"device={text!r}: must be cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise IqaVerifyError(f"device={text!r}: must be cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IqaVerifyError(f"device={text!r}: CUDA is not available on this machine (torch {torch.__version__})")
    return device


class Progress:
    """Live progress on a terminal (property, examples so far); one line per finished property."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()

    def example(self, property_id: str, n: int) -> None:
        if self.live:
            self.stream.write(f"\r  {property_id}: {n} examples\033[K")
            self.stream.flush()

    def result(self, r: PropertyResult) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        ratio = "" if r.worst_ratio is None else f"  worst ratio {r.worst_ratio:.3g}"
        mark = {Status.PASSED: "PASS", Status.FAILED: "FAIL", Status.ERROR: "ERROR", Status.SKIPPED: "skip",
                Status.NOT_APPLICABLE: "n/a"}[r.status]
        print(f"  {mark:5} {r.property_id:32} {r.examples:4d} examples {r.seconds:6.1f}s{ratio}", file=self.stream)
        self.stream.flush()


def _print_table(verdicts: Sequence[Verdict]) -> None:
    header = ["kernel", "family", "dtype", "device", "verdict", "props", "worst ratio"]
    rows = summary_rows(verdicts)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _print_failures(verdicts: Sequence[Verdict]) -> None:
    for v in verdicts:
        for r in v.failed():
            print(f"\n=== {r.property_id} FAILED for {v.kernel} ({v.dtype}, {v.device}): {r.title}")
            if r.counterexample:
                c = r.counterexample
                print(f"shrunk counterexample: {c.shapes}; {c.regime}")
                print(c.message)
                print(f"reproduce: {c.repro}")
                if c.inputs_path:
                    print(f"inputs saved: {c.inputs_path}")
            if r.error:
                print(r.error)


def _run(cfg: RunConfig, progress: Progress, *, only: Sequence[str] = (), skip: Sequence[str] = (),
         case: str | None = None) -> Verdict:
    dtype = str(cfg.dtype).removeprefix("torch.")
    print(f"{cfg.kernel_name} — {cfg.family.name}, {dtype}, {cfg.device}, profile {cfg.profile.name}, seed {cfg.seed}",
          file=progress.stream)
    return check(cfg, only=only, skip=skip, case_json=case, progress=progress.example, on_result=progress.result)


def _isolation(args: argparse.Namespace) -> Isolation:
    if args.example_timeout is not None and not args.example_timeout > 0:
        raise IqaVerifyError(f"example_timeout={args.example_timeout}: seconds per kernel call must be > 0")
    if args.in_process:
        if args.max_memory is not None:
            raise IqaVerifyError("max_memory: caps the kernel's worker process; it cannot be combined with --in-process")
        return InProcess()
    return Isolated(args.example_timeout, parse_memory(args.max_memory) if args.max_memory else None)


def _cmd_check(args: argparse.Namespace) -> int:
    fam = family(args.family)
    for pid in [*args.only, *args.skip]:
        fam.property(pid)
    if args.case is not None:
        fam.spec_from_json(args.case)
    isolation = _isolation(args)
    report_dir = Path(args.report) if args.report else None
    cfg = RunConfig(fam, load(args.impl, isolation), args.impl, DTYPES[args.dtype], parse_device(args.device),
                    profile_named(args.profile), args.seed, report_dir, time_budget_s=_budget(args.time_budget),
                    isolation=isolation, database=_database(args))
    verdict = _run(cfg, Progress(), only=args.only, skip=args.skip, case=args.case)
    print()
    _print_table([verdict])
    _print_failures([verdict])
    append_step_summary([verdict], f"iqa-verify check {args.impl}")
    if report_dir:
        paths = write_report(report_dir, [verdict], profile=args.profile, seed=args.seed)
        print(f"\nreport: {paths['md']} and {paths['json']}")
    if not verdict.complete:
        return EXIT_INTERRUPTED
    return EXIT_OK if verdict.passed else EXIT_FAILED


def _budget(seconds: float | None) -> float | None:
    if seconds is not None and not seconds > 0:
        raise IqaVerifyError(f"time_budget={seconds}: seconds per property must be > 0")
    return seconds


def _cmd_gate(args: argparse.Namespace) -> int:
    if not args.baseline and not args.write_baseline:
        raise IqaVerifyError("gate needs --baseline FILE (to compare) or --write-baseline FILE (to record one)")
    if args.max_regression < 0:
        raise IqaVerifyError(f"max_regression={args.max_regression}: must be >= 0 (0.5 allows +50%)")
    fam = family(args.family)
    baseline = load_baseline(Path(args.baseline)) if args.baseline else None
    if baseline is not None and baseline.family != fam.name:
        raise IqaVerifyError(f"baseline={args.baseline!r}: recorded for family {baseline.family!r}, not {fam.name!r}")
    profile = args.profile or (baseline.profile if baseline else "ci")
    seed = args.seed if args.seed is not None else (baseline.seed if baseline else 0)
    dtypes = args.dtype or (baseline.dtypes() if baseline else ["float32"])
    for d in dtypes:
        if d not in DTYPES:
            raise IqaVerifyError(f"dtype={d!r}: must be one of {', '.join(DTYPES)}")
    isolation = _isolation(args)
    kernel = load(args.impl, isolation)
    device = parse_device(args.device)
    progress = Progress()
    verdicts = []
    for d in dtypes:
        cfg = RunConfig(fam, kernel, args.impl, DTYPES[d], device, profile_named(profile), seed, isolation=isolation,
                        database=_database(args))
        verdicts.append(_run(cfg, progress))
    print()
    _print_table(verdicts)
    _print_failures(verdicts)
    regressions = find_regressions(verdicts, baseline, args.max_regression) if baseline else []
    if baseline is not None:
        if baseline.kernel != args.impl:
            print(f"\nnote: the baseline was recorded for {baseline.kernel}")
        if regressions:
            print(f"\nREGRESSED against {args.baseline} ({len(regressions)} properties):")
            for reg in regressions:
                print(f"  {reg.describe()}")
        else:
            print(f"\nno property regressed by more than +{args.max_regression * 100:.0f}% against {args.baseline}")
    append_step_summary(verdicts, f"iqa-verify gate {args.impl}")
    if args.write_baseline:
        write_baseline(Path(args.write_baseline), baseline_from_verdicts(verdicts))
        print(f"baseline written: {args.write_baseline}")
    if not all(v.complete for v in verdicts):
        return EXIT_INTERRUPTED
    return EXIT_OK if all(v.passed for v in verdicts) and not regressions else EXIT_FAILED


def _cmd_list(args: argparse.Namespace) -> int:
    for name in FAMILIES:
        fam = family(name)
        print(f"family {name}: {fam.signature}")
        for p in fam.properties:
            print(f"  {p.id:32} {p.title}")
        kernels = builtin_kernels(name)
        print("  built-in kernels:" if kernels else "  built-in kernels: none")
        for k in kernels:
            print(f"    {k.impl}  ({k.summary})")
        for o in optional_kernels():
            if o.family == name and o.missing and not o.third_party:
                print(f"    {o.kernel.impl}  (unavailable here: {o.missing})")
        third = [o for o in optional_kernels() if o.family == name and o.third_party]
        if third:
            print("  third-party kernels (adapters; reported as they are):")
        for o in third:
            print(f"    {o.kernel.impl}  ({o.missing or o.kernel.summary})")
        print()
    print(f"profiles: {', '.join(f'{p.name} ({p.max_examples} examples/property)' for p in PROFILES.values())}")
    print(f"dtypes: {', '.join(DTYPES)}")
    return EXIT_OK


def _jobs(args: argparse.Namespace, isolation: Isolation, runs: int) -> int:
    if args.jobs is not None:
        if args.jobs < 1:
            raise IqaVerifyError(f"jobs={args.jobs}: the number of runs at once must be >= 1")
        if args.jobs > 1 and isinstance(isolation, InProcess):
            raise IqaVerifyError(f"jobs={args.jobs}: --in-process runs every kernel in this one process; use --jobs 1")
        return args.jobs
    if isinstance(isolation, InProcess):
        return 1
    return max(1, min(cpu_share.cores(), runs))


def _report_runs(args: argparse.Namespace, names: Sequence[str], devices: Sequence[torch.device], out: Path,
                 isolation: Isolation) -> list[ReportRun]:
    """Every kernel x family x dtype x device the report verifies, in the order the report lists them."""
    budget = _budget(args.third_party_budget)
    runs: list[ReportRun] = []
    for name in names:
        fam = family(name)
        dtypes = args.dtype or [str(d).removeprefix("torch.") for d in fam.dtypes]
        if args.impl:
            kernels = [(BuiltinKernel(impl, "given with --impl"), False) for impl in args.impl]
        else:
            kernels = [(k, False) for k in builtin_kernels(name)]
            kernels += [(k, True) for k in (third_party_kernels(name) if args.third_party else ())]
        for k, foreign in kernels:
            for device in devices:
                if k.device is not None and device.type != k.device:
                    continue
                # third-party Triton kernels run in the interpreter on CPU: bounded per property
                k_budget = budget if foreign and device.type == "cpu" else None
                for dtype_name in dtypes:
                    runs.append(ReportRun(name, k.impl, foreign, dtype_name, str(device), k.profile or args.profile,
                                          args.seed, out, k_budget, isolation, _database(args)))
    return runs


def _cmd_report(args: argparse.Namespace) -> int:
    devices = [parse_device(d) for d in args.device] if args.device else (
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{args.profile}"
    out = Path(args.out) / run_id
    profile = profile_named(args.profile)
    progress = Progress()
    diagnostics: dict = {}
    names = args.family or list(FAMILIES)
    if args.impl and len(names) != 1:
        raise IqaVerifyError(f"impl={' '.join(args.impl)}: --impl needs exactly one --family (the kernels' own)")
    isolation = _isolation(args)
    for name in names:
        family(name)  # unknown names: a usage error before anything runs
    runs = _report_runs(args, names, devices, out, isolation)
    jobs = _jobs(args, isolation, len(runs))
    if jobs > 1:
        print(f"{len(runs)} runs, {jobs} at once (each in its own supervisor process)", file=progress.stream)

    def started(run: ReportRun) -> None:
        print(("started: " if jobs > 1 else "") + run.describe(), file=progress.stream)

    def finished(i: int, verdict: Verdict) -> None:
        if jobs > 1:
            failed = [r.property_id for r in verdict.failed()]
            seconds = max((r.seconds for r in verdict.results), default=0.0)
            mark = "PASS" if verdict.passed else "FAIL" if verdict.complete else "INCOMPLETE"
            print(f"  {mark:10} {runs[i].describe()} ({len(verdict.results)} properties, {seconds:.0f} s)"
                  + (f": {', '.join(failed)}" if failed else ""), file=progress.stream)

    verdicts, complete = run_all(runs, jobs, on_start=started, on_verdict=finished,
                                 sequential=lambda run: execute(run, on_result=progress.result, progress=progress.example))
    try:
        for name in names if complete else ():
            fam = family(name)
            if fam.diagnostics is not None:
                print(f"{name}: diagnostics", file=progress.stream)
                try:
                    diagnostics[name] = list(fam.diagnostics(profile))
                except Exception:  # a diagnostic that breaks is reported, not fatal
                    diagnostics[name] = traceback.format_exc()
    except KeyboardInterrupt:
        complete = False
    paths = write_report(out, verdicts, profile=args.profile, seed=args.seed, run_id=run_id, complete=complete,
                         diagnostics=diagnostics)
    append_step_summary(verdicts, "iqa-verify report")
    latest = Path(args.out) / "latest"
    tmp = Path(args.out) / f".latest-{run_id}"
    shutil.copytree(out, tmp)
    if latest.exists():
        shutil.rmtree(latest)
    tmp.rename(latest)
    print()
    _print_table(verdicts)
    _print_failures(verdicts)
    print(f"\nreport: {paths['html']} and {paths['md']} (copied to {latest}/)")
    if not complete:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(v.passed for v in verdicts if not v.third_party) else EXIT_FAILED


def _database(args: argparse.Namespace) -> Path | None:
    return example_database(args.db, off=args.no_db)


def _isolation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--example-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds one kernel call (forward and backward) may take before the kernel process is"
                        " killed and the case reported as a hang (default: the profile's; ci 120)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="cap the kernel process's address space (e.g. 8G; Linux resource limit), so a runaway"
                        " kernel fails instead of taking the machine down (for --device cpu: CUDA's own mappings"
                        " exceed any useful cap)")
    p.add_argument("--db", default=None, metavar="DIR",
                   help=f"keep failing examples here and replay them first next time (default {DEFAULT_DB}, or"
                        " $IQA_VERIFY_DB; cache this folder between CI runs)")
    p.add_argument("--no-db", action="store_true", help="keep no examples between runs")
    p.add_argument("--in-process", action="store_true",
                   help="run the kernel in this process (for pdb); NOT safe for gating: the kernel can then end"
                        " or hang the run and decide its own verdict")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iqa-verify", description="Property-based verification of attention kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="verify one kernel against a family's properties")
    c.add_argument("impl", metavar="IMPL", help="package.module:attr or path/to/file.py:attr")
    c.add_argument("--family", required=True, help="family name (see `iqa-verify list`)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=list(DTYPES))
    c.add_argument("--profile", default="ci", choices=list(PROFILES))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--only", nargs="+", default=[], metavar="PROPERTY_ID", help="run only these properties")
    c.add_argument("--skip", nargs="+", default=[], metavar="PROPERTY_ID", help="skip these properties")
    c.add_argument("--case", default=None, metavar="JSON", help="replay exactly this case spec (from a repro line)")
    c.add_argument("--report", default=None, metavar="DIR", help="write report.json and report.md here")
    c.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop each property's search after this many seconds (at least one example runs; the"
                        " result says the budget ended it); for kernels that run slowly here")
    _isolation_options(c)
    gt = sub.add_parser("gate", help="fail when a property fails or its worst error ratio regressed against a baseline")
    gt.add_argument("impl", metavar="IMPL", help="package.module:attr or path/to/file.py:attr")
    gt.add_argument("--family", required=True)
    gt.add_argument("--baseline", default=None, metavar="FILE", help="baseline to compare with")
    gt.add_argument("--write-baseline", default=None, metavar="FILE", help="record this run as a baseline")
    gt.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION, metavar="R",
                    help=f"allowed relative growth of a worst error ratio (default {DEFAULT_MAX_REGRESSION}: +50%%)")
    gt.add_argument("--dtype", nargs="+", default=None, help="dtypes (default: the baseline's, else float32)")
    gt.add_argument("--device", default="cpu")
    gt.add_argument("--profile", default=None, choices=list(PROFILES), help="default: the baseline's")
    gt.add_argument("--seed", type=int, default=None, help="default: the baseline's")
    _isolation_options(gt)
    sub.add_parser("list", help="families, properties and built-in kernels")
    r = sub.add_parser("report", help="verify every built-in kernel x family x dtype and write a report")
    r.add_argument("--out", default="reports")
    r.add_argument("--profile", default="ci", choices=list(PROFILES))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES), help="default: each family's dtypes")
    r.add_argument("--family", nargs="+", default=None, help="default: every family")
    r.add_argument("--impl", nargs="+", default=None, metavar="IMPL",
                   help="verify these kernels (of the one --family) instead of the built-in and third-party ones")
    r.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when available")
    r.add_argument("--third-party", dest="third_party", action="store_true", default=True,
                   help="also verify the installed third-party kernels (adapters), reported as they are: their"
                        " verdicts do not decide the exit status (default)")
    r.add_argument("--no-third-party", dest="third_party", action="store_false")
    r.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="kernel x dtype runs at once, each in its own supervisor process with its share of the"
                        " cores (default: the cores this process may use; 1 with --in-process)")
    r.add_argument("--third-party-budget", type=float, default=THIRD_PARTY_BUDGET_S, metavar="SECONDS",
                   help="per-property time budget for third-party kernels on CPU, where their Triton kernels run"
                        f" in the interpreter (default {THIRD_PARTY_BUDGET_S:g} s; the report marks such runs"
                        " time-bounded)")
    _isolation_options(r)
    return p


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM to the supervisor: stop like Ctrl-C (workers ended, partial report)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"check": _cmd_check, "gate": _cmd_gate, "list": _cmd_list, "report": _cmd_report}
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return commands[args.command](args)
    except (IqaVerifyError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"iqa-verify: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("iqa-verify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return EXIT_OK
    finally:
        close_all()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
