"""Every built-in kernel of every family holds every property, in every dtype its family is verified in (ci profile).

The reference-free and packed-batch properties of gla-forward and delta-forward (issue #13) call a kernel 4 to 15
times a case; searched here for both built-ins in four dtypes they would add about half an hour of CI on two cores.
They are marked ``slow`` here (``pytest -m slow`` runs the full search); CI runs them on cases chosen for them in
``tests/test_recurrent_forward.py`` (float32 for every built-in, bf16 for the chunked ones).
"""

from __future__ import annotations

import pytest

from iqa_verify.pytest_plugin import verify
from iqa_verify.registry import FAMILIES, builtin_kernels, family


_SLOW = {f"{fam}/{name}" for fam in ("gla-forward", "delta-forward")
         for name in ("state-handoff", "causality", "sequence-independence", "varlen-values", "varlen-gradients",
                      "varlen-one-by-one")}


def _items():
    for name in FAMILIES:
        fam = family(name)
        for kernel in builtin_kernels(name):
            short = kernel.impl.rsplit(":", 1)[-1]
            for dtype in fam.dtypes:
                dname = str(dtype).removeprefix("torch.")
                for prop in fam.properties:
                    marks = (pytest.mark.slow,) if prop.id in _SLOW else ()
                    yield pytest.param(kernel, name, prop.id, dname, id=f"{prop.id}[{short}-{dname}]", marks=marks)


@pytest.mark.parametrize(("kernel", "family_name", "property_id", "dtype"), list(_items()))
def test_builtin_kernel_holds(kernel, family_name: str, property_id: str, dtype: str) -> None:
    """ci profile on CPU, unless the kernel says where it must run (Triton: interpreter -> smoke, or CUDA)."""
    verify(kernel.impl, family_name, property_id, dtype, profile=kernel.profile or "ci", device=kernel.device or "cpu",
           seed=0)
