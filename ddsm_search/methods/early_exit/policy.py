"""A schedule's early-exit policy (AdaDiff): the certainty threshold of each sampling step.

A step with a threshold runs its subnet as a dynamic denoiser: each image leaves at the first of the
supernet's depth choices (up to the subnet's depth, its cap) where its certainty head reaches the
threshold. A step without one (`None`, written "off") runs the static subnet. Thresholds may be one
for every step, or one per segment of steps (written per step).

Keys: `0.8*10 off*10` (run-length, as schedule keys); a dynamic schedule's key is its subnets' key,
then ` | exit `, then this key, so one text names what the sampler runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from ...errors import DDSMError

SEPARATOR = " | exit "


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
        parts = []
        for t, run in itertools.groupby(self.thresholds):
            text, count = "off" if t is None else repr(t), len(list(run))
            parts.append(text if count == 1 else f"{text}*{count}")
        return " ".join(parts)

    @classmethod
    def parse(cls, key: str) -> "ExitPolicy":
        """Return the policy of a key written by `key`."""
        out: list[float | None] = []
        for part in str(key).split():
            body, star, count = part.partition("*")
            try:
                n = int(count) if star else 1
                value = None if body == "off" else float(body)
            except ValueError:
                raise DDSMError(f"{key!r} is not an exit policy key (thresholds such as 0.8*10 or off*10)") from None
            if n < 1:
                raise DDSMError(f"{key!r} is not an exit policy key (run length {n})")
            out += [value] * n
        return cls(tuple(out))

    def step_keys(self, subnets: Sequence) -> list:
        """Return what each step runs: its subnet (static) or (subnet, threshold) (dynamic exit)."""
        if len(subnets) != self.steps:
            raise DDSMError(f"the exit policy has {self.steps} thresholds but the schedule has {len(subnets)} steps")
        return [s if t is None else (s, t) for s, t in zip(subnets, self.thresholds)]

    def to_json(self) -> list:
        """Return the per-step thresholds for a schedule file (None for off)."""
        return list(self.thresholds)


def step_keys(subnets: Sequence, exit: ExitPolicy | None) -> list:
    """Return what each step runs (see ExitPolicy.step_keys); the subnets themselves without a policy."""
    return list(subnets) if exit is None or not exit.dynamic else exit.step_keys(subnets)


def plan_key(subnets: Sequence, exit: ExitPolicy | None) -> str:
    """Return the key of a schedule with its exit policy (the schedule key alone if it has none)."""
    from ...space.subnet import schedule_key

    key = schedule_key(subnets)
    return key if exit is None or not exit.dynamic else f"{key}{SEPARATOR}{exit.key}"


def parse_plan(key) -> tuple[list, ExitPolicy | None]:
    """Return (subnets, exit policy or None) of a key written by `plan_key`."""
    from ...space.subnet import parse_schedule

    text = str(key)
    body, sep, policy = text.partition(SEPARATOR)
    subnets = parse_schedule(body)
    if not sep:
        return subnets, None
    exit = ExitPolicy.parse(policy)
    if exit.steps != len(subnets):
        raise DDSMError(f"{key!r}: {exit.steps} exit thresholds for {len(subnets)} steps")
    return subnets, exit


class ExitRecord:
    """What the dynamic steps of one sampling run executed: per step, each image's depth and FLOPs."""

    def __init__(self):
        import torch

        self.depths: dict[int, "torch.Tensor"] = {}
        self.flops: dict[int, "torch.Tensor"] = {}

    def add(self, step: int, depths, flops) -> None:
        """Record step `step`: each image's depth (blocks run) and executed FLOPs, in image order."""
        self.depths[step], self.flops[step] = depths, flops

    def prefix(self, k: int) -> dict:
        """Return what the first k steps recorded (kept with a cached latent, so a resumed run has it too)."""
        return {i: (self.depths[i], self.flops[i]) for i in self.depths if i < k}

    def restore(self, prefix: dict) -> None:
        """Take back the steps a cached prefix recorded."""
        for i, (d, f) in prefix.items():
            self.add(i, d, f)

    def per_image(self, static_flops: Sequence[float], n: int):
        """Return the FLOPs each of the n images executed over the whole schedule (float64): the recorded
        FLOPs of dynamic steps, `static_flops[i]` of each static step i."""
        import torch

        total = torch.zeros(n, dtype=torch.float64)
        for i, cost in enumerate(static_flops):
            if i in self.flops:
                if self.flops[i].numel() != n:
                    raise ValueError(f"step {i} recorded {self.flops[i].numel()} images, not {n}")
                total += self.flops[i]
            else:
                total += float(cost)
        return total

    def depth_per_step(self, static_depths: Sequence[int], n: int) -> dict:
        """Return {"mean": [...], "sd": [...]} of the depth each step ran over the n images (a static
        step's depth is its subnet's, with no spread)."""
        mean, sd = [], []
        for i, depth in enumerate(static_depths):
            if i in self.depths:
                d = self.depths[i].double()
                mean.append(float(d.mean()))
                sd.append(float(d.std(unbiased=False)))
            else:
                mean.append(float(depth))
                sd.append(0.0)
        return {"mean": mean, "sd": sd}


def canonical_plan_key(key) -> str:
    """Return a plan key (or a schedule key, version-1 width keys included) in canonical form."""
    return plan_key(*parse_plan(key))


def step_label(step) -> str:
    """Return a readable name of what a step runs: 'width=0.5,depth=4' or 'width=1.0,depth=6 exit 0.8'."""
    return f"{step[0].key} exit {step[1]:g}" if isinstance(step, tuple) else step.key
