"""pytest plugin: run a family's properties against your kernel as ordinary pytest items.

    pytest --iqa-impl mypkg.kernels:la_forward --iqa-family la-forward [--iqa-dtype bfloat16 ...]
           [--iqa-device cuda] [--iqa-profile ci|dev|thorough] [--iqa-seed N]
           [--iqa-baseline FILE [--iqa-max-regression R]]
           [--iqa-example-timeout SECONDS] [--iqa-max-memory SIZE] [--iqa-in-process]

One item per property x dtype, named ``<property id>[<kernel>-<dtype>]`` (so JUnit XML and ``-k`` read
well); a failing item prints the same message as the CLI: the tensors out of tolerance, the shrunk
counterexample and the one-line repro. The items of one kernel x dtype share one search (each case
evaluated once for all of them). Works with pytest-xdist (``-n 2``): items are built the same way in
every worker; with ``--dist loadgroup`` the items of one kernel x dtype stay on one worker, so none of
them is searched twice. With ``--iqa-baseline`` an item also fails when the property's worst error ratio grew
by more than R against the baseline (``iqa-verify gate``; profile and seed default to the baseline's).
:func:`verify` is the same check for tests that parametrize their own items.

The kernel runs in a worker process (one per pytest process, reused by its items), so its verdict
comes from this process: a kernel that exits, crashes, hangs or raises anything fails its item with a
message saying so, and the session goes on. ``--iqa-in-process`` runs it here, for pdb only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iqa_verify.errors import IqaVerifyError
from iqa_verify.gate import DEFAULT_MAX_REGRESSION, Baseline, find_regressions, load_baseline
from iqa_verify.loading import load_kernel
from iqa_verify.supervisor import InProcess, Isolated, Isolation, host_for, parse_memory
from iqa_verify.outcomes import PropertyResult, Status, Verdict
from iqa_verify.profiles import PROFILES, profile_named
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check, example_database, run_property

__all__ = ["verify", "failure_text"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def failure_text(cfg: RunConfig, r: PropertyResult) -> str:
    dtype = str(cfg.dtype).removeprefix("torch.")
    head = f"{r.property_id} {r.status.label} for {cfg.kernel_name} ({dtype}, {cfg.device}): {r.title}"
    if r.counterexample:
        c = r.counterexample
        lines = [head, f"shrunk counterexample: {c.shapes}; {c.regime}", c.message, f"reproduce: {c.repro}"]
        if c.inputs_path:
            lines.append(f"inputs saved: {c.inputs_path}")
        return "\n".join(lines)
    return f"{head}\n{r.error or r.status.message}"


def _config(impl: str, family_name: str, dtype: str, *, device: str, profile: str, seed: int,
            report_dir: Path | None, isolation: Isolation, database: Path | None = None) -> RunConfig:
    kernel = load_kernel(impl) if isinstance(isolation, InProcess) else None
    return RunConfig(family(family_name), kernel, impl, _DTYPES[dtype], torch.device(device), profile_named(profile),
                     seed, report_dir, isolation=isolation, database=database)


def _judge(cfg: RunConfig, result: PropertyResult, baseline: Baseline | None, max_regression: float) -> PropertyResult:
    """``pytest.fail`` with the full failure text unless ``result`` holds (and, given a baseline, unless its
    worst error ratio regressed); ``pytest.skip`` for a property that does not apply."""
    impl, pid = cfg.kernel_name, result.property_id
    if result.status is Status.NOT_APPLICABLE:
        pytest.skip(f"{pid} does not apply to {impl}: {result.note}")
    if result.status is not Status.PASSED:
        pytest.fail(failure_text(cfg, result), pytrace=False)
    if baseline is not None:
        dtype = str(cfg.dtype).removeprefix("torch.")
        verdict = Verdict(impl, cfg.family.name, dtype, str(cfg.device), cfg.profile.name, cfg.seed, [result])
        for reg in find_regressions([verdict], baseline, max_regression):
            pytest.fail(f"{pid} regressed for {impl}: {reg.describe()}", pytrace=False)
    return result


def verify(impl: str, family_name: str, property_id: str, dtype: str, *, device: str = "cpu", profile: str = "ci",
           seed: int = 0, report_dir: Path | None = None, baseline: Baseline | None = None,
           max_regression: float = DEFAULT_MAX_REGRESSION, isolation: Isolation = Isolated()) -> PropertyResult:
    """Run one property; ``pytest.fail`` with the full failure text unless it holds (and, given a
    baseline, unless its worst error ratio regressed)."""
    cfg = _config(impl, family_name, dtype, device=device, profile=profile, seed=seed, report_dir=report_dir,
                  isolation=isolation)
    return _judge(cfg, run_property(cfg, cfg.family.property(property_id)), baseline, max_regression)


_RESULTS: dict[tuple, dict[str, PropertyResult]] = {}
"""(impl, family, dtype) -> results of one search over the properties collected for it in this process."""


class PropertyItem(pytest.Item):
    """One property x kernel x dtype. The first item of a kernel x dtype to run verifies every property of
    it collected in this session in one search (one evaluation per case); the others read their result."""

    def __init__(self, *, impl: str, family_name: str, property_id: str, dtype: str, opts: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.args = (impl, family_name, property_id, dtype)
        self.group = (impl, family_name, dtype)
        self.opts = opts
        self.add_marker(pytest.mark.xdist_group(name=f"iqa-{impl}-{dtype}"))

    def runtest(self) -> None:
        impl, family_name, property_id, dtype = self.args
        opts = dict(self.opts)
        baseline, max_regression = opts.pop("baseline"), opts.pop("max_regression")
        cfg = _config(impl, family_name, dtype, report_dir=None, **opts)
        if self.group not in _RESULTS:
            wanted = [i.args[2] for i in self.session.items if isinstance(i, PropertyItem) and i.group == self.group]
            verdict = check(cfg, only=wanted)
            if not verdict.complete:
                raise KeyboardInterrupt
            _RESULTS[self.group] = {r.property_id: r for r in verdict.results}
        _judge(cfg, _RESULTS[self.group][property_id], baseline, max_regression)

    def reportinfo(self):
        return Path(self.config.rootpath), None, self.name


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("iqa-verify", "verify attention kernels against iqa-verify properties")
    g.addoption("--iqa-impl", action="append", default=[], metavar="IMPL",
                help="kernel under test, package.module:attr or path/to/file.py:attr (repeatable)")
    g.addoption("--iqa-family", default=None, help="its family (see `iqa-verify list`)")
    g.addoption("--iqa-dtype", action="append", default=None, choices=list(_DTYPES),
                help="dtype(s) to verify (repeatable; default float32 and bfloat16)")
    g.addoption("--iqa-device", default="cpu")
    g.addoption("--iqa-profile", default=None, choices=list(PROFILES), help="default ci (or the baseline's)")
    g.addoption("--iqa-seed", type=int, default=None, help="default 0 (or the baseline's)")
    g.addoption("--iqa-baseline", default=None, metavar="FILE", help="fail properties whose worst error ratio regressed")
    g.addoption("--iqa-max-regression", type=float, default=DEFAULT_MAX_REGRESSION, metavar="R")
    g.addoption("--iqa-example-timeout", type=float, default=None, metavar="SECONDS",
                help="seconds one kernel call may take before its process is killed (default: the profile's)")
    g.addoption("--iqa-max-memory", default=None, metavar="SIZE", help="cap the kernel process's memory (e.g. 8G)")
    g.addoption("--iqa-db", default=None, metavar="DIR",
                help="keep failing examples here, replayed first next time (default .iqa-verify/examples or"
                     " $IQA_VERIFY_DB)")
    g.addoption("--iqa-no-db", action="store_true", help="keep no examples between runs")
    g.addoption("--iqa-in-process", action="store_true",
                help="run the kernel in the pytest process (for pdb; not safe for gating)")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    impls = config.getoption("iqa_impl")
    if not impls:
        return
    name = config.getoption("iqa_family")
    if not name:
        raise pytest.UsageError("--iqa-impl needs --iqa-family (see `iqa-verify list`)")
    try:
        fam = family(name)
        timeout = config.getoption("iqa_example_timeout")
        if timeout is not None and not timeout > 0:
            raise IqaVerifyError(f"--iqa-example-timeout={timeout}: seconds per kernel call must be > 0")
        memory = config.getoption("iqa_max_memory")
        isolation: Isolation = InProcess() if config.getoption("iqa_in_process") else Isolated(
            timeout, parse_memory(memory) if memory else None)
        for impl in impls:
            host_for(impl, isolation)  # loads it (in its worker when isolated): a usage error if it cannot
        path = config.getoption("iqa_baseline")
        baseline = load_baseline(Path(path)) if path else None
    except (IqaVerifyError, KeyError) as exc:
        raise pytest.UsageError(str(exc.args[0] if exc.args else exc)) from None
    device = config.getoption("iqa_device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--iqa-device={device}: CUDA is not available on this machine")
    dtypes = config.getoption("iqa_dtype") or (baseline.dtypes() if baseline else ["float32", "bfloat16"])
    opts = {
        "device": device,
        "profile": config.getoption("iqa_profile") or (baseline.profile if baseline else "ci"),
        "seed": config.getoption("iqa_seed") if config.getoption("iqa_seed") is not None else (baseline.seed if baseline else 0),
        "baseline": baseline,
        "max_regression": config.getoption("iqa_max_regression"),
        "isolation": isolation,
        "database": example_database(config.getoption("iqa_db"), off=config.getoption("iqa_no_db")),
    }
    for impl in impls:
        short = impl.rsplit(":", 1)[-1]
        for dtype in dtypes:
            for prop in fam.properties:
                items.append(PropertyItem.from_parent(
                    session, name=f"{prop.id}[{short}-{dtype}]", impl=impl, family_name=name, property_id=prop.id,
                    dtype=dtype, opts=opts))
