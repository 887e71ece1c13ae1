"""A schedule's early-exit policy (AdaDiff): the certainty threshold of each sampling step.

A step with a threshold runs its subnet as a dynamic denoiser: each image leaves at the first of the
supernet's depth choices (up to the subnet's depth, its cap) where its certainty head reaches the
threshold. A step without one (`None`, written "off") runs the static subnet. Thresholds may be one
for every step, or one per segment of steps (written per step).

Keys: `0.8*10 off*10` (run-length, as schedule keys); in a plan key the policy is the steps' `exit`
field (space.steps): `width=1.0,depth=4*20 | exit 0.8*10 off*10`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import DDSMError
from ...space.steps import read_run_length, run_length


def _threshold(value, where: str) -> float | None:
    if value is None or value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DDSMError(f"{where}: an exit threshold is a finite number >= 0 (or off), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ExitPolicy:
    """One certainty threshold (or None: no early exit) per sampling step, noisiest first."""

    thresholds: tuple[float | None, ...]
    heads_sha256: str | None = field(default=None, compare=False)  # the heads it was made with, if recorded

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(_threshold(t, "exit") for t in self.thresholds))
        if not self.thresholds:
            raise DDSMError("an exit policy needs one threshold per step")

    @classmethod
    def of(cls, threshold, steps: int) -> "ExitPolicy":
        """Return a policy with one threshold (a number, None, or a per-step list) for `steps` steps."""
        if isinstance(threshold, (list, tuple)):
            if len(threshold) != steps:
                raise DDSMError(f"the exit policy has {len(threshold)} thresholds but the schedule has {steps} steps")
            return cls(tuple(threshold))
        return cls((threshold,) * steps)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return len(self.thresholds)

    @property
    def dynamic(self) -> bool:
        """Return True if any step exits early."""
        return any(t is not None for t in self.thresholds)

    @property
    def key(self) -> str:
        """Return the run-length key: '0.8*10 off*10'."""
        return run_length(self.thresholds)

    @classmethod
    def parse(cls, key: str) -> "ExitPolicy":
        """Return the policy of a key written by `key`."""
        try:
            return cls(tuple(read_run_length(key)))
        except DDSMError as exc:
            raise DDSMError(f"{key!r} is not an exit policy key (thresholds such as 0.8*10 or off*10): {exc}") from None

    def to_json(self) -> list:
        """Return the per-step thresholds for a schedule file (None for off)."""
        return list(self.thresholds)
