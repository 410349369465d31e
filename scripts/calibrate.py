"""Calibration of the judging rules (issue #14): how close correct kernels come to their tolerances, and how far
planted bugs exceed them, property by property.

Runs, for every family x dtype x seed (ci profile, shrinking cut to ``--shrink-budget`` seconds since only the
error ratios are recorded):

- every built-in kernel, the independent correct kernels of ``tests/correct_kernels`` (written from other
  formulas), and (``--third-party``) the installed third-party kernels, time-bounded: all properties;
- every planted bug of ``tests/bug_zoo`` in its own dtype: the properties meant to catch it.

Each run appends one JSON line to ``--results`` (resumable: runs already there are skipped). ``--report`` turns
the results into ``reports/evidence/calibration.md`` (per family x property: the correct kernels' p50/p99/max
worst ratio and false alarms, the planted bugs' smallest ratio or non-ratio failure) and ``calibration.svg``.

The full matrix of the issue (>= 20 seeds x 3 dtypes x every kernel x 7 families)::

    OMP_NUM_THREADS=1 python scripts/calibrate.py --seeds 0-19 --third-party
    python scripts/calibrate.py --report

A slice: ``--seeds 0-4 --families la-forward la-solve-q --dtypes float32``. ``pytest -m slow
tests/test_calibration_rules.py`` runs a one-seed slice. After a change to one rule, ``--properties gradients``
reruns those properties only (every role; a planted bug only where it is meant to be caught by one of them) and
replaces them in the rows already there, each property entry recording the commit it was judged at.
Third-party kernels run time-bounded (``--third-party-budget`` seconds per property), so a run judges only the
first few cases: with ``--third-party-cases random`` they leave out the pinned edge regimes (the same at every
seed; run seed 0 without it) and judge the seed's random draws. Processes run side by side write ``--results``
files of their own; ``--merge FILE...`` merges them into ``--results`` (later files win on role, kernel, family, dtype and seed; a ``--properties`` row replaces only its
properties) and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iqa_verify.loading import load_kernel  # noqa: E402
from iqa_verify.supervisor import InProcess  # noqa: E402
from iqa_verify.outcomes import Status  # noqa: E402
from iqa_verify.profiles import profile_named  # noqa: E402
from iqa_verify.registry import builtin_kernels, family, third_party_kernels  # noqa: E402
from iqa_verify.runner import RunConfig, check  # noqa: E402

FAMILIES = ("la-forward", "gla-forward", "delta-forward", "la-solve-v", "la-solve-k", "la-solve-q", "iqa")
DTYPES = ("float32", "bfloat16", "float16")
ZOOS = {"la-forward": ("tests.bug_zoo.la_forward", "tests.bug_zoo.la_forward_varlen"),
        "gla-forward": ("tests.bug_zoo.gla_forward", "tests.bug_zoo.gla_forward_varlen"),
        "delta-forward": ("tests.bug_zoo.delta_forward", "tests.bug_zoo.delta_forward_varlen"),
        "la-solve-v": ("tests.bug_zoo.la_inverse", "tests.bug_zoo.la_inverse_varlen"),
        "la-solve-k": ("tests.bug_zoo.la_inverse",), "la-solve-q": ("tests.bug_zoo.la_inverse",), "iqa": ("tests.bug_zoo.iqa",)}
RESULTS = ROOT / "reports" / "evidence" / "calibration_results.jsonl"
REPORT = ROOT / "reports" / "evidence" / "calibration.md"
PLOT = ROOT / "reports" / "evidence" / "calibration.svg"
NOTES = ROOT / "reports" / "evidence" / "calibration_notes.md"
"""Hand-written reading of the results (which slice was run, why a target is missed), included in the report."""
HEADROOM, SEPARATION = 0.5, 2.0
KNOWN_DEFECTS: dict[tuple[str, str, str], str] = {}
"""Failures of built-ins that are real defects, verified apart from the rules (reported, not counted as false alarms)."""
UNTOLERANCED = ("contract", "inputs-unchanged", "no-uninit-reads", "deterministic")
"""Properties no tolerance rule decides (bitwise or structural): ``--ratio-only`` leaves them out for correct kernels."""


def _commit() -> str:
    """The commit the rules were judged at (rows from older rules can be told apart and rerun)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_COMMIT = _commit()


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _correct_kernels(fam: str) -> tuple[str, ...]:
    from tests.correct_kernels import KERNELS

    return KERNELS.get(fam, ())


def _planted(fam: str):
    return [b for m in ZOOS[fam] for b in importlib.import_module(m).BUGS if b.family == fam]


def _impl_of_bug(bug) -> str:
    return f"{Path(bug.module_file).resolve().relative_to(ROOT)}:{bug.kernel}"


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["role"], r["impl"], r["family"], r["dtype"], r["seed"]))
    return keys


def _importable(impl: str) -> str:
    """``tests/x/y.py:k`` -> ``tests.x.y:k``: loaded as a module of the repository, because loading by file puts
    the file's folder on sys.path, where a zoo module named like an installed package would shadow it (the Triton
    zoo was once ``tests/bug_zoo/triton.py``)."""
    where, _, attr = impl.rpartition(":")
    return f"{where.removesuffix('.py').replace('/', '.')}:{attr}" if where.endswith(".py") else impl


def _run(role: str, impl: str, fam: str, dtype: str, seed: int, args, only=(), budget=None, skip=(),
         profile: str | None = None) -> dict:
    prof = dataclasses.replace(profile_named(profile or args.profile), shrink_budget_s=args.shrink_budget)
    started = time.monotonic()
    try:
        kernel = load_kernel(_importable(impl))
    except Exception as exc:  # an unloadable kernel is recorded, not fatal
        return {"role": role, "impl": impl, "family": fam, "dtype": dtype, "seed": seed, "error": repr(exc), "props": []}
    fam_obj = family(fam)
    random_only = role == "third-party" and args.third_party_cases == "random"
    if random_only:  # the pinned regimes are seed-independent: seed 0's run judges them, other seeds draw anew
        fam_obj = dataclasses.replace(fam_obj, pinned=lambda _profile: ())
    # in-process: the calibration measures the judging rules on kernels we trust not to end the process
    cfg = RunConfig(fam_obj, kernel, impl, getattr(torch, dtype), torch.device("cpu"), prof, seed,
                    time_budget_s=budget, isolation=InProcess())
    verdict = check(cfg, only=only, skip=skip)
    props = []
    rerun = bool(args.properties)
    for r in verdict.results:
        if r.status is Status.SKIPPED:
            continue
        ratio = r.worst_ratio
        finite = [x for x in r.ratios if math.isfinite(x)]
        props.append({"id": r.property_id, "status": r.status.label, "examples": r.examples,
                      "worst_ratio": None if ratio is None or not math.isfinite(ratio) else ratio,
                      # largest finite ratio over every example run (a failure's worst_ratio is its shrunk
                      # counterexample's, which measures the shrinker, not how clearly the bug shows)
                      "max_ratio": max(finite) if finite else None,
                      "nonfinite_ratio": ratio is not None and not math.isfinite(ratio),
                      "budget_reached": r.budget_reached,
                      "message": (r.counterexample.message[:400] if r.counterexample else (r.error or ""))[:400],
                      **({"commit": _COMMIT} if rerun else {})})
    return {"role": role, "impl": impl, "family": fam, "dtype": dtype, "seed": seed, "props": props,
            **({"cases": "random"} if random_only else {}), "profile": prof.name,
            "seconds": round(time.monotonic() - started, 1), "commit": _COMMIT}


def _key(row: dict) -> tuple:
    return (row["role"], row["impl"], row["family"], row["dtype"], row["seed"])


def _is_rerun(row: dict) -> bool:
    """A row of ``--properties``: its property entries each record the commit they were judged at."""
    return bool(row["props"]) and all("commit" in p for p in row["props"])


def _merged(old: dict, new: dict) -> dict:
    """``new`` in place of ``old``: a ``--properties`` row replaces only the properties it holds."""
    if not _is_rerun(new):
        return new
    fresh = {p["id"]: p for p in new["props"]}
    return {**old, "props": [fresh.pop(p["id"], p) for p in old["props"]] + list(fresh.values())}


def _replace_properties(path: Path, row: dict) -> bool:
    """Put ``row``'s property entries in place of those with the same id in the row of the same key already in
    ``path``; False where there is no such row."""
    lines = [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    for n, line in enumerate(lines):
        old = json.loads(line)
        if _key(old) == _key(row):
            lines[n] = json.dumps(_merged(old, row))
            path.write_text("\n".join(lines) + "\n")
            return True
    return False


def merge(into: Path, sources: list[Path]) -> int:
    """Rows of ``sources`` (other processes' ``--results``) into ``into``, in order, later ones winning on (role,
    kernel, family, dtype, seed); a ``--properties`` row replaces only its properties. Returns the row count."""
    rows: dict[tuple, dict] = {}
    for path in [into, *sources]:
        for row in _load(path):
            rows[_key(row)] = _merged(rows[_key(row)], row) if _key(row) in rows else row
    into.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return len(rows)


def _selected(fam: str, only: tuple[str, ...], properties: list[str] | None) -> tuple[str, ...] | None:
    """The property ids a job runs under ``--properties`` (None: skip the job; () : all)."""
    if not properties:
        return only
    wanted = tuple(f"{fam}/{p}" for p in properties if any(q.id == f"{fam}/{p}" for q in family(fam).properties))
    picked = tuple(p for p in wanted if not only or p in only)
    return picked or None


def _jobs(args, seed: int, fam: str) -> list[tuple]:
    """(role, impl, dtype, only, time budget, profile) of every run of ``fam`` at ``seed``."""
    jobs = []
    for dtype in args.dtypes:
        # built-ins where the suite itself runs them on CPU (a Triton kernel: interpreter, smoke profile)
        jobs += [("builtin", k.impl, dtype, (), None, k.profile) for k in builtin_kernels(fam) if k.device in (None, "cpu")]
        jobs += [("correct", impl, dtype, (), None, None) for impl in _correct_kernels(fam)]
        if args.third_party:
            jobs += [("third-party", k.impl, dtype, (), args.third_party_budget, None) for k in third_party_kernels(fam)]
    if not args.no_planted and (args.planted_seeds is None or seed in _seeds(args.planted_seeds)):
        jobs += [("planted", _impl_of_bug(b), b.dtype, b.caught_by, None, None) for b in _planted(fam)]
    return jobs


def run(args) -> None:
    if args.properties:  # a rerun of some properties: every (role, kernel, dtype, seed) runs again
        _rerun(args)
        return
    done = _done(args.results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in _seeds(args.seeds):
        for fam in args.families:
            jobs = _jobs(args, seed, fam)
            skip = tuple(f"{fam}/{p}" for p in UNTOLERANCED) if args.ratio_only else ()
            for role, impl, dtype, only, budget, profile in jobs:
                key = (role, impl, fam, dtype, seed)
                if key in done or (args.kernels and not any(name in impl for name in args.kernels)):
                    continue
                row = _run(role, impl, fam, dtype, seed, args, only, budget, () if only else skip, profile)
                with args.results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                done.add(key)
                worst = max((p["worst_ratio"] or 0.0 for p in row["props"]), default=0.0)
                fails = [p["id"] for p in row["props"] if p["status"] in ("failed", "error")]
                print(f"seed {seed} {fam} {dtype} {role} {impl}: {row.get('seconds', 0)}s worst {worst:.3g}"
                      f" failed {fails}", flush=True)


def _rerun(args) -> None:
    for seed in _seeds(args.seeds):
        for fam in args.families:
            jobs = _jobs(args, seed, fam)
            for role, impl, dtype, only, budget, profile in jobs:
                picked = _selected(fam, only, args.properties)
                if picked is None or (args.kernels and not any(name in impl for name in args.kernels)):
                    continue
                row = _run(role, impl, fam, dtype, seed, args, picked, budget, (), profile)
                if not _replace_properties(args.results, row):
                    with args.results.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                worst = max((p["worst_ratio"] or 0.0 for p in row["props"]), default=0.0)
                fails = [p["id"] for p in row["props"] if p["status"] in ("failed", "error")]
                print(f"seed {seed} {fam} {dtype} {role} {impl} {','.join(picked)}: {row.get('seconds', 0)}s"
                      f" worst {worst:.3g} failed {fails}", flush=True)


# ------------------------------------------------------------------------------------------------ report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def summarise(rows: list[dict]) -> dict:
    """(family, property) -> {correct: [ratios], false_alarms: [...], planted: {bug: [ratios or 'fail']}}."""
    table: dict[tuple[str, str], dict] = {}
    for row in rows:
        for p in row["props"]:
            if p["status"] == "passed" and (p.get("max_ratio") or 0.0) > 1.0:
                # an example over its allowance in a passing run: the engine lost that failure before 395ea38 (a
                # case failing two properties, the other one shrunk, the time budget ending the search): counted
                # as the failure it was
                p = {**p, "status": "failed"}
            cell = table.setdefault((row["family"], p["id"]), {"correct": [], "false_alarms": [], "planted": {},
                                                               "third_party": []})
            if row["role"] in ("builtin", "correct"):
                if p["worst_ratio"] is not None:
                    cell["correct"].append(p["worst_ratio"])
                if p["status"] in ("failed", "error"):
                    where = f"{row['impl'].rsplit(':', 1)[-1]} {row['dtype']} seed {row['seed']}"
                    known = KNOWN_DEFECTS.get((row["impl"], row["dtype"], p["id"]))
                    cell.setdefault("defects", []).append(f"{where}: {known}") if known else \
                        cell["false_alarms"].append(where)
            elif row["role"] == "third-party":
                cell["third_party"].append((row["impl"].rsplit(":", 1)[-1], row["dtype"], row["seed"], p["status"],
                                            p["worst_ratio"], row.get("cases", "pinned-first")))
            else:
                name = f"{row['impl'].rsplit(':', 1)[-1]} ({row['dtype']})"
                caught = p["status"] == "failed"
                ratio = p.get("max_ratio", p["worst_ratio"])
                cell["planted"].setdefault(name, []).append(
                    ratio if caught and ratio is not None and ratio > 1 else ("non-ratio" if caught else -1.0))
    return table


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3g}"


def _seed_ranges(seeds) -> str:
    """[0, 2, 3, 4, 7] -> '0, 2-4, 7' ('–' when empty)."""
    runs: list[list[int]] = []
    for x in sorted(set(seeds)):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "–"


def _third_party_lines(table: dict) -> list[str]:
    """One markdown row per (family, property, kernel, dtype) of the third-party runs."""
    lines = []
    for (fam, pid), cell in sorted(table.items()):
        groups: dict[tuple[str, str], list[tuple]] = {}
        for kernel, dtype, seed, status, ratio, cases in cell["third_party"]:
            groups.setdefault((kernel, dtype), []).append((seed, status, ratio, cases))
        for (kernel, dtype), runs in sorted(groups.items()):
            pinned = [s for s, _, _, c in runs if c != "random"]
            random = [s for s, _, _, c in runs if c == "random"]
            failed = [s for s, st, _, _ in runs if st in ("failed", "error")]
            ratios = [r for _, _, r, _ in runs if r is not None]
            lines.append(f"| {fam} | {pid.split('/', 1)[1]} | {kernel} | {dtype} | {_seed_ranges(pinned)} |"
                         f" {_seed_ranges(random)} | {_seed_ranges(failed) if failed else 'none'} |"
                         f" {_fmt(max(ratios)) if ratios else '–'} |")
    return lines


def report(args) -> None:
    rows = _load(args.results)
    table = summarise(rows)
    seeds = sorted({r["seed"] for r in rows})
    kernels = sorted({(r["role"], r["impl"]) for r in rows if r["role"] != "planted"})
    lines = [
        "# Calibration of the judging rules (issue #14)",
        "",
        f"Generated by `python scripts/calibrate.py --report` from `{args.results.resolve().relative_to(ROOT) if args.results.resolve().is_relative_to(ROOT) else args.results}`"
        f" ({len(rows)} runs). Profile ci (same examples as `iqa-verify check --seed N`; shrinking cut short, only"
        f" ratios are recorded). Seeds run: {', '.join(map(str, seeds)) or 'none'}. Rules judged at commit(s):"
        f" {', '.join(sorted({r.get('commit', 'unrecorded') for r in rows} | {p['commit'] for r in rows for p in r['props'] if 'commit' in p})) or 'none'}.",
        "",
        "Kernels counted as correct: the built-ins and the independent kernels of `tests/correct_kernels`"
        " (third-party kernels are listed apart: they are not known to be correct). Per family x property:"
        " the distribution over runs (kernel x dtype x seed) of each run's worst error ratio (error / allowed, max over"
        " the run's examples), the false alarms (a correct kernel failing), and for every planted bug meant to be"
        " caught by the property its smallest ratio over seeds (per seed: the largest ratio over the examples run) ('non-ratio' where it fails without a ratio:"
        " non-finite output, raised, detached, contract; 'MISSED' where a seed did not catch it).",
        f" Targets: zero false alarms; correct p99 <= {HEADROOM}; every planted bug >= {SEPARATION} or a non-ratio failure.",
        "",
    ]
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    lines += [
        "## Table",
        "",
        "| family | property | correct runs | p50 | p99 | max | false alarms | planted bugs: smallest ratio over seeds | targets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    missed = []
    for (fam, pid), cell in sorted(table.items()):
        c = cell["correct"]
        p50, p99, mx = _pct(c, 0.5), _pct(c, 0.99), (max(c) if c else float("nan"))
        planted_txt = []
        sep_ok = True
        for bug, vals in sorted(cell["planted"].items()):
            if any(v == -1.0 for v in vals):
                planted_txt.append(f"{bug}: MISSED in {sum(v == -1.0 for v in vals)}/{len(vals)}")
                sep_ok = False
                continue
            nums = [v for v in vals if isinstance(v, float)]
            if nums and len(nums) == len(vals):
                planted_txt.append(f"{bug}: {min(nums):.3g}")
                sep_ok &= min(nums) >= SEPARATION
            elif nums:
                planted_txt.append(f"{bug}: {min(nums):.3g} / non-ratio")
                sep_ok &= min(nums) >= SEPARATION
            else:
                planted_txt.append(f"{bug}: non-ratio")
        ok = []
        if cell["false_alarms"]:
            ok.append(f"{len(cell['false_alarms'])} false alarm(s)")
        if c and p99 > HEADROOM:
            ok.append(f"p99 {p99:.3g} > {HEADROOM}")
        if not sep_ok:
            ok.append("separation < 2")
        if ok:
            missed.append((fam, pid, ok, cell))
        lines.append(f"| {fam} | {pid.split('/', 1)[1]} | {len(c)} | {_fmt(p50)} | {_fmt(p99)} | {_fmt(mx)} |"
                     f" {len(cell['false_alarms'])} | {'; '.join(planted_txt) or '–'} | {'; '.join(ok) or 'met'} |")
    lines += ["", "## Where a target is missed", ""]
    for fam, pid, ok, cell in missed:
        lines.append(f"- **{pid}**: {', '.join(ok)}" + (f" — false alarms: {', '.join(cell['false_alarms'][:6])}"
                                                           if cell["false_alarms"] else ""))
    if not missed:
        lines.append("- none in the slice run")
    defects = [(pid, d) for (fam, pid), cell in sorted(table.items()) for d in cell.get("defects", [])]
    if defects:
        lines += ["", "## Failures of built-ins that are real defects (not false alarms)", ""]
        lines += [f"- **{pid}**: {d}" for pid, d in defects]
    third = _third_party_lines(table)
    if third:
        lines += ["", "## Third-party kernels (time-bounded in Triton's interpreter; not counted as correct)", "",
                  "Per kernel x dtype x property over its runs: the seeds run with the pinned edge regimes first and"
                  " those run on random cases only (`--third-party-cases random`), the seeds where it failed, and"
                  " the largest finite worst ratio of the runs (failing ones included).", "",
                  "| family | property | kernel | dtype | seeds (pinned first) | seeds (random only) | failed at seeds |"
                  " largest ratio |", "|---|---|---|---|---|---|---|---|", *third]
    lines += ["", "## Kernels", ""] + [f"- {role}: `{impl}`" for role, impl in kernels]
    lines += ["", f"![worst ratios per property]({PLOT.name})", ""]
    REPORT.write_text("\n".join(lines) + "\n")
    _plot(table)
    print(f"wrote {REPORT.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


def _plot(table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "iqa-verify-calibration"  # the same ids for the same data: no churn in git
    keys = sorted(table)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(keys) + 1.5))
    for i, key in enumerate(keys):
        cell = table[key]
        c = [max(v, 1e-8) for v in cell["correct"]]
        ax.scatter(c, [i] * len(c), s=8, c="tab:blue", alpha=0.35, marker="o", linewidths=0)
        pv = [v for vals in cell["planted"].values() for v in vals if isinstance(v, float) and v > 0]
        ax.scatter([min(v, 1e8) for v in pv], [i] * len(pv), s=18, c="tab:red", marker="x")
        if any(v == "non-ratio" for vals in cell["planted"].values() for v in vals):
            ax.scatter([1e8], [i], s=18, c="tab:red", marker=">")
    for x, style in ((HEADROOM, ":"), (1.0, "-"), (SEPARATION, "--")):
        ax.axvline(x, color="gray", linestyle=style, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(1e-8, 2e8)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([pid for _, pid in keys], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("worst error ratio per run (blue: correct kernels; red x: planted bugs; > at right: non-ratio failure)")
    ax.set_title("Calibration: correct kernels stay left of 0.5, planted bugs right of 2", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, format="svg", metadata={"Date": None})
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-19", help="e.g. 0-19 or 0,3,5-7")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES + ("float64",))
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--shrink-budget", type=float, default=0.5, help="seconds of shrinking per failure (ratios only)")
    ap.add_argument("--kernels", nargs="+", metavar="NAME",
                    help="only kernels whose impl contains one of these (to rerun one kernel after a fix)")
    ap.add_argument("--third-party", action="store_true", help="also the installed third-party kernels (slow on CPU)")
    ap.add_argument("--third-party-budget", type=float, default=4.0, help="seconds per property for them")
    ap.add_argument("--third-party-cases", choices=("pinned-first", "random"), default="pinned-first",
                    help="random: leave out the pinned edge regimes for them (seed-independent, so under a time"
                         " budget every seed would judge the same smallest ones); run seed 0 pinned-first")
    ap.add_argument("--no-planted", action="store_true")
    ap.add_argument("--planted-seeds", default=None, help="seeds for the planted bugs (default: every seed)")
    ap.add_argument("--ratio-only", action="store_true",
                    help=f"leave out {', '.join(UNTOLERANCED)} for correct kernels (no tolerance decides them)")
    ap.add_argument("--properties", nargs="+", metavar="NAME",
                    help="rerun only these properties (e.g. gradients varlen-gradients), replacing them in the rows"
                         " already in --results")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report", action="store_true", help="only write calibration.md and .svg from the results")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                    help="merge these results files (other processes' --results, in order) into --results, then report")
    args = ap.parse_args(argv)
    if args.merge:
        print(f"{merge(args.results, args.merge)} rows in {args.results}")
    elif not args.report:
        run(args)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
