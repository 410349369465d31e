"""Families are declarations (issue #11): what judges a kernel imports no kernel code, a family states the
shared properties it uses and their knobs as arguments, and the ``iqa`` kernels declare their gradient
claim and their call with stats the way any user kernel does (``iqa_info``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from iqa_verify.errors import IqaVerifyError
from iqa_verify.family import KernelRaised
from iqa_verify.iqa_claims import Exact, IqaKernelInfo, OneStep, Truncated
from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.properties.generic import SHARED, shared_properties, tolerating
from iqa_verify.properties.iqa.cases import IQACase, Regime
from iqa_verify.registry import family
from iqa_verify.runner import RunConfig, check
from iqa_verify.supervisor import InProcess

KERNEL_PACKAGES = ("iqa_verify.iqa", "iqa_verify.kernels", "iqa_verify.triton", "iqa_verify.adapters")
MEASURES_KERNELS = (
    "iqa_verify.properties.iqa.diagnostics",  # report charts of the built-in solvers, loaded on demand
    "iqa_verify.properties.la_inverse.solvability",  # the solvability map of the built-in kernels, on demand
)

_PROBE = """
import importlib, pkgutil, sys
from iqa_verify.registry import FAMILIES
for name in FAMILIES:
    FAMILIES[name].load()
for pkg in ("iqa_verify.properties", "iqa_verify.reference"):
    for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if m.name not in sys.argv[2].split(","):
            importlib.import_module(m.name)
import iqa_verify.comparison, iqa_verify.tolerances, iqa_verify.runner
kernel = sys.argv[1].split(",")
print(",".join(sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in kernel))))
"""


def test_the_judging_side_imports_no_kernel_code() -> None:
    """Every family declaration, every module of properties/ and reference/ (but the two report diagnostics
    that measure built-in kernels), the comparison, the tolerance table and the runner, imported in a fresh
    interpreter, load no module of the kernels under test."""
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(KERNEL_PACKAGES), ",".join(MEASURES_KERNELS)],
                         capture_output=True, text=True, check=True, env=os.environ.copy(), timeout=300)
    assert out.stdout.strip() == "", f"kernel modules imported by the judging side: {out.stdout.strip()}"


# -- shared_properties: the knobs a declaration states ---------------------------------------------------------


def test_shared_properties_use_selects_in_the_declared_order_and_refuses_unknown_names() -> None:
    assert [p.id for p in shared_properties("fam")] == [f"fam/{n}" for n in SHARED]
    got = shared_properties("fam", use=("deterministic", "contract"))
    assert [p.id for p in got] == ["fam/deterministic", "fam/contract"]
    with pytest.raises(IqaVerifyError, match=r"use='value': must be one of 'contract', 'values'"):
        shared_properties("fam", use=("value",))


class _Ctx:
    def __init__(self) -> None:
        self.checks: list = []

    def record(self, checks) -> None:
        self.checks.extend(checks)


def _raises(ctx) -> None:
    raise KernelRaised("kernel raised ConvergenceError: no", "ConvergenceError")


def test_tolerating_passes_an_honest_refusal_with_its_note_and_reraises_the_rest() -> None:
    ctx = _Ctx()
    tolerating(_raises, lambda ctx, exc: f"honest: {exc.error_type}")(ctx)
    assert [(c.path, c.passed, c.note) for c in ctx.checks] == [("kernel", True, "honest: ConvergenceError")]
    with pytest.raises(KernelRaised):
        tolerating(_raises, lambda ctx, exc: None)(_Ctx())


class ConvergenceError(RuntimeError):
    """What an honest solver raises when it does not converge (the name is what the iqa family reads)."""


def refuses(x, w_q, w_k, w_v=None, *, scale=None):
    raise ConvergenceError("no fixed point within max_iter")


@pytest.mark.parametrize("kind", [Regime.HARD, Regime.CONTRACTIVE], ids=lambda k: k.value)
def test_the_iqa_declaration_applies_its_refusal_policy_to_every_property(kind: Regime) -> None:
    """In the hard regime a convergence error is an honest answer for every iqa property (shared and own);
    in the contractive regime it fails every property that calls the kernel."""
    fam = family("iqa")
    spec = IQACase(B=1, N=3, Din=2, Dk=2, E=2, kind=kind, target=40.0 if kind is Regime.HARD else 0.5, seed=1)
    cfg = RunConfig(fam, refuses, "refuses", torch.float32, torch.device("cpu"), profile_named("ci"), 0,
                    isolation=InProcess())
    verdict = check(cfg, case_json=spec.to_json())
    status = {r.property_id: r.status for r in verdict.results}
    assert set(status) == {p.id for p in fam.properties}
    if kind is Regime.HARD:
        assert set(status.values()) == {Status.PASSED}
        refused = [r.property_id for r in verdict.results if any("honest refusal" in c.note for c in r.worst)]
        assert "iqa/contract" in refused and "iqa/deterministic" in refused and "iqa/values" in refused
    else:
        failed = {pid for pid, s in status.items() if s is Status.FAILED}
        assert failed == {p.id for p in fam.properties} - {"iqa/gradient-gap", "iqa/convergence-honesty"}


# -- iqa kernels declare themselves ----------------------------------------------------------------------------


def test_every_iqa_builtin_declares_an_exact_gradient_and_its_stats() -> None:
    from iqa_verify.loading import load_kernel

    for builtin in family("iqa").builtin_kernels:
        info = load_kernel(builtin.impl).iqa_info
        assert isinstance(info, IqaKernelInfo) and info.backward == Exact() and info.with_stats is not None, builtin.impl


def test_kernel_side_backward_modes_map_to_claims_and_declare_carries_them() -> None:
    from iqa_verify.iqa import backward as modes
    from iqa_verify.iqa import kernel

    assert [m.claim for m in (modes.Implicit(), modes.Unrolled(), modes.Truncated(3), modes.OneStep())] == [
        Exact(), Exact(), Truncated(3), OneStep()]
    assert kernel.iqa_forward_anderson_one_step.iqa_info.backward == OneStep()
    assert kernel.iqa_forward_anderson_truncated.iqa_info.backward == Truncated(5)
    # a backward mode given where a claim is expected is stored as its claim; anything else is refused
    assert IqaKernelInfo(backward=modes.Truncated(2)).backward == Truncated(2)
    assert IqaKernelInfo(backward=None).exact
    with pytest.raises(IqaVerifyError, match="backward='one-step': must be a gradient claim"):
        IqaKernelInfo(backward="one-step")
    with pytest.raises(IqaVerifyError, match="k=0"):
        Truncated(0)
