"""Every built-in kernel of every family holds every property, in every dtype its family is verified in (ci profile;
Triton kernels in the interpreter: float32 and bfloat16 by default, the rest under ``-m slow``, see
``INTERPRETED_DTYPES``).

One test per kernel x family x dtype runs one search over all the family's properties (engine v2: each case is
built and evaluated once for every property), as ``iqa-verify check`` does; a failing property is shrunk alone
and the test's message lists every property that did not hold, each with its counterexample and repro.

The reference-free and packed-batch properties of gla-forward and delta-forward (issue #13) call a kernel 4 to 15
times a case; searched here for both built-ins in four dtypes they would add about half an hour of CI on two cores.
The default run leaves them out here (``pytest -m slow`` runs them in every dtype); CI runs them on cases chosen for
them in ``tests/test_recurrent_forward.py`` (float32 for every built-in, bf16 for the chunked ones).
"""

from __future__ import annotations

import pytest
import torch

from iqa_verify.outcomes import Status
from iqa_verify.profiles import profile_named
from iqa_verify.pytest_plugin import failure_text
from iqa_verify.registry import FAMILIES, builtin_kernels, family
from iqa_verify.runner import RunConfig, check

INTERPRETED_DTYPES = ("float32", "bfloat16")
"""Dtypes the default run verifies Triton kernels in when they run in Triton's interpreter (CPU, no GPU): there
each call is emulated in numpy, 50-60 s per dtype for la-forward, and float16/float64 check numpy's arithmetic
rather than a GPU's. ``pytest -m slow`` runs the other dtypes there too; on CUDA every dtype runs by default, and
``iqa-verify report`` (the main job) verifies every built-in in every dtype either way."""

SLOW = {f"{fam}/{name}" for fam in ("gla-forward", "delta-forward")
        for name in ("state-handoff", "causality", "sequence-independence", "varlen-values", "varlen-gradients",
                     "varlen-one-by-one")}
"""Properties searched here only under ``-m slow`` (see the module docstring)."""


def _items(marks=()):
    """(kernel, family name, dtype name) for every built-in kernel of every registered family (interpreted
    Triton kernels outside ``INTERPRETED_DTYPES`` marked slow)."""
    for name in FAMILIES:
        fam = family(name)
        for kernel in builtin_kernels(name):
            short = kernel.impl.rsplit(":", 1)[-1]
            interpreted = kernel.profile == "smoke"  # the Triton provider's hint when it interprets
            for dtype in fam.dtypes:
                dname = str(dtype).removeprefix("torch.")
                slow_here = interpreted and dname not in INTERPRETED_DTYPES
                yield pytest.param(kernel, name, dname, id=f"{name}[{short}-{dname}]",
                                   marks=(*marks, pytest.mark.slow) if slow_here else marks)


def _verify(kernel, family_name: str, dtype: str, *, only=(), skip=()) -> None:
    """ci profile on CPU, unless the kernel says where it must run (Triton: interpreter -> smoke, or CUDA)."""
    fam = family(family_name)
    cfg = RunConfig(fam, None, kernel.impl, getattr(torch, dtype), torch.device(kernel.device or "cpu"),
                    profile_named(kernel.profile or "ci"), seed=0)
    verdict = check(cfg, only=only, skip=skip)
    judged = [r for r in verdict.results if r.status is not Status.SKIPPED]
    assert verdict.complete and judged, f"{kernel.impl}: incomplete verdict"
    bad = [failure_text(cfg, r) for r in judged if r.status not in (Status.PASSED, Status.NOT_APPLICABLE)]
    assert not bad, f"{len(bad)} of {len(judged)} properties did not hold:\n\n" + "\n\n".join(bad)


@pytest.mark.parametrize(("kernel", "family_name", "dtype"), list(_items()))
def test_builtin_kernel_holds_every_property(kernel, family_name: str, dtype: str) -> None:
    _verify(kernel, family_name, dtype, skip=[p.id for p in family(family_name).properties if p.id in SLOW])


@pytest.mark.parametrize(("kernel", "family_name", "dtype"),
                         [p for p in _items(marks=(pytest.mark.slow,)) if p.values[1] in ("gla-forward", "delta-forward")])
def test_builtin_kernel_holds_the_reference_free_properties(kernel, family_name: str, dtype: str) -> None:
    _verify(kernel, family_name, dtype, only=[p.id for p in family(family_name).properties if p.id in SLOW])
