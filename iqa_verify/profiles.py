"""Run profiles: how many examples, how large, how long to shrink.

``ci`` is deterministic (the same examples every run for the same seed) and bounded; ``dev`` explores
more; ``thorough`` is for manual runs before a release; ``smoke`` (the pinned edge cases and four random
ones) is for kernels that run slowly here, such as Triton kernels in the interpreter. ``--seed`` changes
the examples.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from iqa_verify.errors import IqaVerifyError

__all__ = ["Size", "Profile", "PROFILES", "profile_named"]


class Size(enum.Enum):
    """Shape bounds a family's strategies use: SMALL for ci, MEDIUM for dev, LARGE for thorough."""

    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


@dataclass(frozen=True)
class Profile:
    """name; random examples per property (pinned edge regimes come on top); shape bounds;
    wall-clock seconds the shrinker may spend per failing property before it settles; seconds one kernel
    call (forward and backward) may take before the worker is killed and the call reported as a hang
    (generous: CPU, Triton's interpreter; ``--example-timeout`` overrides it)."""

    name: str
    max_examples: int
    size: Size
    shrink_budget_s: float
    example_timeout_s: float = 120.0


PROFILES: dict[str, Profile] = {
    # pinned edge cases plus a few random ones: for kernels that run slowly here (Triton's interpreter)
    "smoke": Profile("smoke", max_examples=4, size=Size.SMALL, shrink_budget_s=5.0),
    "ci": Profile("ci", max_examples=30, size=Size.SMALL, shrink_budget_s=20.0),
    "dev": Profile("dev", max_examples=150, size=Size.MEDIUM, shrink_budget_s=60.0, example_timeout_s=300.0),
    "thorough": Profile("thorough", max_examples=1000, size=Size.LARGE, shrink_budget_s=300.0,
                        example_timeout_s=600.0),
}


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise IqaVerifyError(f"profile={name!r}: must be one of {', '.join(PROFILES)}") from None
