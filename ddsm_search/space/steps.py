"""Steps: what one sampling step runs. A subnet, plus what method families add to that step.

A `Step` is a subnet and its extras, one value per *field* a method family owns (`exit`: an early-exit
threshold; `group`: which fine-tuned group network runs it). A step with no extras runs the static
subnet. Steps are hashable and ordered, so they key the denoisers, the prefix cache and the pool's
ordering of schedules by shared prefix.

A plan key names the steps of a whole schedule as text (run tables, held-out records): the subnets'
schedule key, then for each field some step has, ` | FIELD ` and its values per step, run-length
coded (`off` for a step without one):

    width=1.0,depth=4*2 width=0.5,depth=2*2 | exit 0.8*2 off 0.5

Keys of static schedules are plain schedule keys, so run tables written before fields existed read
unchanged. A schedule sampled by another solver or on another timestep grid than DDIM on the uniform
grid has a head naming them, `[unipc trailing] width=0.5*4 width=1.0*4` (the text of its solver, then
the spacing or `t=` and its timesteps); `plan_key` and `parse_plan_key` carry it as text. `ExecutedRecord` keeps what dynamic steps executed per image while sampling (FLOPs, and
what else they measure, such as the depth each image ran): their cost is measured, not assumed.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import DDSMError
from .subnet import Subnet, parse_schedule, schedule_key

SEPARATOR = " | "


def _value_text(value) -> str:
    """Return a field value as written in keys: off (None), on (True), a float in shortest round-trip form,
    a word as it is."""
    if value is None:
        return "off"
    if value is True:
        return "on"
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


_WORD = re.compile(r"^[a-z]+[0-9]*$")


def _read_value(text: str, key) -> object:
    if text == "off":
        return None
    if text == "on":
        return True
    if _WORD.match(text):  # a word value, such as feature caching's keep2 / reuse2
        return text
    try:
        value = float(text)
    except ValueError:
        raise DDSMError(f"{key!r}: {text!r} is not a step value (a number, on or off)") from None
    if not math.isfinite(value):
        raise DDSMError(f"{key!r}: {text!r} is not a finite number")
    return value


@dataclass(frozen=True, order=True)
class Step:
    """What one sampling step runs: its subnet and the extras method families add, as (field, value)
    pairs sorted by field (no pair for a field the step does not use)."""

    subnet: Subnet
    extras: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, subnet: Subnet, **extras) -> "Step":
        """Return the step of `subnet` with these extras (fields whose value is None are left out)."""
        return cls(subnet, tuple(sorted((k, v) for k, v in extras.items() if v is not None)))

    def get(self, field: str, default=None):
        """Return this step's value of `field`, or `default`."""
        for name, value in self.extras:
            if name == field:
                return value
        return default

    def replace(self, subnet: Subnet | None = None, **extras) -> "Step":
        """Return this step with another subnet and/or some extras changed (None removes one)."""
        return Step.of(self.subnet if subnet is None else subnet, **{**dict(self.extras), **extras})

    @property
    def fields(self) -> tuple[str, ...]:
        """Return the fields this step has."""
        return tuple(name for name, _ in self.extras)

    @property
    def key(self) -> str:
        """Return a readable name: 'width=0.5,depth=4', 'width=1.0,depth=6 exit 0.8', 'width=0.5 group 1'."""
        parts = [f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}" for name, value in self.extras]
        return " ".join([self.subnet.key, *parts])

    def __str__(self) -> str:
        return self.key


def steps_of(subnets: Sequence[Subnet], **values: Sequence) -> list[Step]:
    """Return one step per subnet, with per-step values of fields (a list per field, None where a step has none)."""
    for field, per_step in values.items():
        if len(per_step) != len(subnets):
            raise DDSMError(f"{len(per_step)} values of {field} for {len(subnets)} steps")
    return [Step.of(s, **{f: v[i] for f, v in values.items()}) for i, s in enumerate(subnets)]


def run_length(values: Sequence) -> str:
    """Return per-step values run-length coded, as in keys: '0.8*2 off 0.5'."""
    parts = []
    for value, run in itertools.groupby(values):
        count = len(list(run))
        text = _value_text(value)
        parts.append(text if count == 1 else f"{text}*{count}")
    return " ".join(parts)


def read_run_length(text: str, key=None) -> list:
    """Return the per-step values of a run-length text written by `run_length`."""
    out: list = []
    for part in str(text).split():
        body, star, count = part.partition("*")
        try:
            n = int(count) if star else 1
        except ValueError:
            raise DDSMError(f"{key or text!r}: bad run length {count!r}") from None
        if n < 1:
            raise DDSMError(f"{key or text!r}: run length {n}")
        out += [_read_value(body, key or text)] * n
    if not out:
        raise DDSMError(f"{key or text!r}: no values")
    return out


def plan_key(steps: Sequence[Step], head: str | None = None) -> str:
    """Return the text key of a schedule's steps (a plain schedule key when no step has extras), after
    `[head] ` where a head (its solver and timesteps) is given."""
    key = schedule_key([s.subnet for s in steps])
    fields = sorted({f for s in steps for f in s.fields})
    key += "".join(f"{SEPARATOR}{f} {run_length([s.get(f) for s in steps])}" for f in fields)
    return f"[{head}] {key}" if head else key


def split_head(key) -> tuple[str | None, str]:
    """Return (the head of a plan key, or None; the rest of the key)."""
    text = str(key).strip()
    if not text.startswith("["):
        return None, text
    head, sep, rest = text[1:].partition("]")
    if not sep or not head.strip():
        raise DDSMError(f"{key!r} is not a plan key (a head is '[solver timesteps]' before the subnets)")
    return head.strip(), rest.strip()


def parse_plan_key(key) -> list[Step]:
    """Return the steps of a key written by `plan_key` (its head aside: `split_head`), or of a schedule
    key (version-1 width keys included)."""
    body, *parts = split_head(key)[1].split(SEPARATOR)
    subnets = parse_schedule(body)
    values: dict[str, list] = {}
    for part in parts:
        field, _, text = part.strip().partition(" ")
        if not field or not text or field in values:
            raise DDSMError(f"{key!r} is not a plan key (expected ' | FIELD values' after the subnets)")
        values[field] = read_run_length(text, key)
        if len(values[field]) != len(subnets):
            raise DDSMError(f"{key!r}: {len(values[field])} values of {field} for {len(subnets)} steps")
    return steps_of(subnets, **values)


def canonical_plan_key(key, head: str | None = None) -> str:
    """Return a plan key (or a schedule key, version-1 width keys included) in canonical form; `head`
    stands for a key's missing head (a run's solver where its keys were written without one)."""
    return plan_key(parse_plan_key(key), split_head(key)[0] or head)


class ExecutedRecord:
    """What the dynamic steps of one sampling run executed: per step, each image's FLOPs and the other
    figures its denoiser measured (e.g. `depth`, the blocks each image ran)."""

    def __init__(self):
        self.flops: dict[int, object] = {}
        self.stats: dict[int, dict] = {}

    def add(self, step: int, flops, stats: dict | None = None) -> None:
        """Record step `step`: each image's executed FLOPs (and other per-image figures), in image order."""
        self.flops[step], self.stats[step] = flops, dict(stats or {})

    def prefix(self, k: int) -> dict:
        """Return what the first k steps recorded (kept with a cached latent, so a resumed run has it too)."""
        return {i: (self.flops[i], self.stats[i]) for i in self.flops if i < k}

    def restore(self, prefix: dict) -> None:
        """Take back the steps a cached prefix recorded."""
        for i, (flops, stats) in prefix.items():
            self.add(i, flops, stats)

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

    def per_step(self, stat: str, static_values: Sequence[float], n: int) -> dict:
        """Return {"mean": [...], "sd": [...]} of a recorded figure per step over the n images (a step
        that did not record it has its static value, with no spread)."""
        mean, sd = [], []
        for i, value in enumerate(static_values):
            if stat in self.stats.get(i, {}):
                v = self.stats[i][stat].double()
                mean.append(float(v.mean()))
                sd.append(float(v.std(unbiased=False)))
            else:
                mean.append(float(value))
                sd.append(0.0)
        return {"mean": mean, "sd": sd}

    def stat_names(self) -> list[str]:
        """Return the names of the per-image figures recorded besides FLOPs."""
        return sorted({name for stats in self.stats.values() for name in stats})
