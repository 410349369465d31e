"""Every built-in kernel of every family holds every property, in every dtype its family is verified in (ci profile)."""

from __future__ import annotations

import pytest

from iqa_verify.pytest_plugin import verify
from iqa_verify.registry import FAMILIES, builtin_kernels, family


def _items():
    for name in FAMILIES:
        fam = family(name)
        for kernel in builtin_kernels(name):
            short = kernel.impl.rsplit(":", 1)[-1]
            for dtype in fam.dtypes:
                dname = str(dtype).removeprefix("torch.")
                for prop in fam.properties:
                    yield pytest.param(kernel, name, prop.id, dname, id=f"{prop.id}[{short}-{dname}]")


@pytest.mark.parametrize(("kernel", "family_name", "property_id", "dtype"), list(_items()))
def test_builtin_kernel_holds(kernel, family_name: str, property_id: str, dtype: str) -> None:
    """ci profile on CPU, unless the kernel says where it must run (Triton: interpreter -> smoke, or CUDA)."""
    verify(kernel.impl, family_name, property_id, dtype, profile=kernel.profile or "ci", device=kernel.device or "cpu",
           seed=0)
