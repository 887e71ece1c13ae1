"""Subnets: what one denoising step runs, as a record of axis values, and the space a backbone offers.

A `Subnet` is a frozen, hashable record such as `width=0.5,depth=6`. Its text form (`key`) is
canonical: axes in the backbone's order, widths in Python's shortest round-trip float form (`repr`,
exact: `0.6666666667` reads back as the same float, which `:g` did not), depths as integers. That
text is the key in files, caches and tables.

A `SubnetSpace` is what a backbone declares: its axes, in order, each with its choices (largest first).
Every axis has a full value (its largest), so the full-size network is one subnet like the others.
Schedules (one subnet per step) have a compact canonical key too: runs of equal subnets as
`key*count`, separated by spaces.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from ..errors import DDSMError

# the axes any backbone may declare, and how their values are typed; the order is the canonical order
# (stage: which decoder of a multi-stage U-Net runs; it follows the step's timestep, see SubnetSpace.step_axis)
AXIS_TYPES: dict[str, type] = {"stage": int, "width": float, "depth": int}


def _value_text(axis: str, value) -> str:
    return repr(float(value)) if AXIS_TYPES.get(axis, float) is float else str(int(value))


@dataclass(frozen=True, order=True)
class Subnet:
    """One step's architecture: axis values in canonical order, e.g. (("width", 0.5), ("depth", 6)).

    Subnets of one space order by their values, axis by axis (so schedules sort, as the Ray pool's
    blocks of neighbouring schedules need)."""

    items: tuple[tuple[str, float | int], ...]

    @classmethod
    def of(cls, **values) -> "Subnet":
        """Return the subnet with these axis values (in canonical axis order)."""
        order = {a: i for i, a in enumerate(AXIS_TYPES)}
        unknown = [a for a in values if a not in order]
        if unknown:
            raise DDSMError(f"unknown axis {unknown[0]!r} (axes: {', '.join(AXIS_TYPES)})")
        return cls(tuple((a, AXIS_TYPES[a](values[a])) for a in sorted(values, key=order.__getitem__)))

    def __getitem__(self, axis: str):
        for name, value in self.items:
            if name == axis:
                return value
        raise KeyError(axis)

    def get(self, axis: str, default=None):
        """Return the value of `axis`, or `default` if this subnet has no such axis."""
        return dict(self.items).get(axis, default)

    def as_dict(self) -> dict:
        """Return {axis: value}."""
        return dict(self.items)

    def replace(self, **values) -> "Subnet":
        """Return this subnet with some axis values changed."""
        return Subnet.of(**{**self.as_dict(), **values})

    @property
    def key(self) -> str:
        """Return the canonical text form, e.g. 'width=0.5,depth=6'."""
        return ",".join(f"{a}={_value_text(a, v)}" for a, v in self.items)

    @property
    def slug(self) -> str:
        """Return a file-name form of the key, e.g. 'width-0.5_depth-6'."""
        return "_".join(f"{a}-{_value_text(a, v)}" for a, v in self.items)

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:
        return f"Subnet({self.key})"

    @classmethod
    def parse(cls, text: str) -> "Subnet":
        """Return the subnet of a key such as 'width=0.5,depth=6' (raising DDSMError if it is not one)."""
        values = {}
        for part in str(text).split(","):
            axis, sep, value = part.strip().partition("=")
            if not sep or axis not in AXIS_TYPES or axis in values:
                raise DDSMError(f"{text!r} is not a subnet (expected axis=value pairs such as width=0.5,depth=6; "
                                f"axes: {', '.join(AXIS_TYPES)})")
            try:
                number = float(value)
            except ValueError:
                raise DDSMError(f"{text!r}: {axis}={value!r} is not a number") from None
            if not math.isfinite(number) or (AXIS_TYPES[axis] is int and number != int(number)):
                raise DDSMError(f"{text!r}: {axis} must be a finite {AXIS_TYPES[axis].__name__}, got {value!r}")
            values[axis] = number
        return cls.of(**values)


def matching_choice(value, choices: Sequence, rel: float = 1e-6):
    """Return the choice equal to `value` within a relative `rel` (floats read back from text), or None."""
    for c in choices:
        if abs(float(value) - c) <= rel * max(1.0, abs(c)):
            return c
    return None


def choices_text(axis: str, choices: Sequence) -> str:
    """Return an axis's choices as written in subnet keys, comma-separated (for error messages)."""
    return ", ".join(_value_text(axis, c) for c in choices)


@dataclass(frozen=True)
class SubnetSpace:
    """The axes of a backbone, in canonical order, each with its choices, largest (full) first."""

    axes: tuple[tuple[str, tuple], ...]

    # an axis whose value each step's timestep decides (a multi-stage U-Net's stage), or None: a space
    # that has one (backbones.multistage.StagedSpace) also takes subnets that leave it out
    step_axis = None

    @classmethod
    def of(cls, choices: Mapping[str, Iterable]) -> "SubnetSpace":
        """Return the space with these choices per axis (sorted largest first, typed per axis)."""
        order = list(AXIS_TYPES)
        for axis, values in choices.items():
            if axis not in AXIS_TYPES:
                raise DDSMError(f"unknown axis {axis!r} (axes: {', '.join(AXIS_TYPES)})")
            if not list(values):
                raise DDSMError(f"axis {axis!r} needs at least one choice")
        return cls(tuple((a, tuple(sorted({AXIS_TYPES[a](v) for v in choices[a]}, reverse=True)))
                         for a in sorted(choices, key=order.index)))

    @property
    def names(self) -> tuple[str, ...]:
        """Return the axis names, in canonical order."""
        return tuple(a for a, _ in self.axes)

    def choices(self, axis: str) -> tuple:
        """Return the choices of `axis`, largest first."""
        for name, values in self.axes:
            if name == axis:
                return values
        raise DDSMError(f"axis {axis!r} is not in this space (axes: {', '.join(self.names)})")

    @property
    def full(self) -> Subnet:
        """Return the full-size subnet: every axis at its largest choice."""
        return Subnet(tuple((a, c[0]) for a, c in self.axes))

    @property
    def smallest(self) -> Subnet:
        """Return the smallest subnet: every axis at its smallest choice."""
        return Subnet(tuple((a, c[-1]) for a, c in self.axes))

    def __iter__(self) -> Iterator[Subnet]:
        """Yield every subnet, largest first (lexicographic over axes, each largest first)."""
        for values in itertools.product(*(c for _, c in self.axes)):
            yield Subnet(tuple(zip(self.names, values)))

    @functools.cached_property
    def members(self) -> frozenset:
        """Return every subnet of the space, as a set."""
        return frozenset(self)

    def __len__(self) -> int:
        return math.prod(len(c) for _, c in self.axes)

    def along(self, axis: str) -> list[Subnet]:
        """Return the subnets that differ from full size on `axis` only, largest first."""
        return [self.full.replace(**{axis: c}) for c in self.choices(axis)]

    def check(self, subnet) -> Subnet:
        """Return `subnet` (a Subnet, its key, a mapping, or a bare width) as a member of this space.

        Axes left out take their full value, so `width=0.5` names (width 0.5, full depth) on a DiT and a
        bare number is a width. Raise DDSMError naming the axis if a value is not one of its choices.
        """
        if isinstance(subnet, Subnet) and subnet in self.members:
            return subnet
        if isinstance(subnet, Subnet):
            values = subnet.as_dict()
        elif isinstance(subnet, Mapping):
            values = dict(subnet)
        elif isinstance(subnet, str):
            values = Subnet.parse(subnet).as_dict()
        elif isinstance(subnet, (int, float)) and not isinstance(subnet, bool):
            values = {"width": subnet}
        else:
            raise DDSMError(f"{subnet!r} is not a subnet")
        unknown = [a for a in values if a not in self.names]
        if unknown:
            raise DDSMError(f"this supernet has no axis {unknown[0]!r} (axes: {', '.join(self.names)})")
        out = []
        for axis, choices in self.axes:
            if axis not in values:
                out.append((axis, choices[0]))
                continue
            match = matching_choice(values[axis], choices)
            if match is None:
                value = values[axis]
                shown = _value_text(axis, value) if isinstance(value, (int, float)) else repr(value)
                raise DDSMError(f"{axis} {shown} is not in the supernet ({axis} choices: {choices_text(axis, choices)})")
            out.append((axis, match))
        return Subnet(tuple(out))

    def to_json(self) -> dict:
        """Return {axis: [choices]} for meta.json and run files."""
        return {a: list(c) for a, c in self.axes}


def schedule_key(subnets: Sequence[Subnet]) -> str:
    """Return the canonical key of a schedule: runs of equal subnets as 'key*count', space-separated."""
    parts = []
    for subnet, run in itertools.groupby(subnets):
        count = len(list(run))
        parts.append(subnet.key if count == 1 else f"{subnet.key}*{count}")
    return " ".join(parts)


def parse_schedule(key) -> list[Subnet]:
    """Return the subnets of a schedule key, one per step (raising DDSMError if it is not one).

    Keys of version-1 run files were widths separated by spaces ('1.0 0.75'): they read as widths.
    """
    text = str(key).strip()
    if not text:
        raise DDSMError("an empty schedule key")
    out: list[Subnet] = []
    for part in text.split():
        body, star, count = part.partition("*")
        try:
            n = int(count) if star else 1
        except ValueError:
            raise DDSMError(f"{key!r} is not a schedule key (bad run length {count!r})") from None
        if "=" in body:
            subnet = Subnet.parse(body)
        else:
            try:
                subnet = Subnet.of(width=float(body))
            except ValueError:
                raise DDSMError(f"{key!r} is not a schedule key (subnets such as width=0.5 separated by spaces)") \
                    from None
        if n < 1:
            raise DDSMError(f"{key!r} is not a schedule key (run length {n})")
        out += [subnet] * n
    return out


def canonical_schedule_key(key) -> str:
    """Return a schedule key in canonical form (version-1 width keys such as '1 0.75' included)."""
    return schedule_key(parse_schedule(key))
