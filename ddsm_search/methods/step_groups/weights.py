"""Per-group fine-tuned weights of a schedule (Step-Adaptive Training, reconstructed): the setting that
names them, its checks, and the step keys and networks that sample with them.

A schedule's `settings.weights` (written by `ddsm-search finetune`):

    {"file": "schedule.weights.safetensors", "sha256": "...",
     "groups": [{"steps": [0, 4], "subnet": {"width": 0.5}, "timesteps": [791, 999]}, ...],
     "finetune": {...how they were trained: recorded, not trusted...}}

`file` is relative to the schedule file's folder. Each group is a contiguous run of sampling steps
[start, stop) that runs one subnet, with its own copy of that subnet's static network, fine-tuned on
timesteps lo .. hi (inclusive); the groups cover the steps in order, without gaps or overlaps. The file
holds every group's weights in one safetensors file, keys prefixed `group<i>.`; its SHA-256 is checked
when the schedule loads and again on the bytes the weights are read from.

A step run with group weights has `group=GroupRef(group, sha256)` among its extras (space.steps.Step),
so two groups that run the same subnet keep two networks, and prefixes cached with other weights are
never reused.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ...errors import DDSMError
from ...space.subnet import Subnet

KEYS = {"file", "sha256", "groups", "finetune"}
GROUP_KEYS = {"steps", "subnet", "timesteps"}


@dataclass(frozen=True)
class WeightGroup:
    """Sampling steps start .. stop-1 run `subnet` with weights fine-tuned on timesteps lo .. hi."""

    start: int
    stop: int
    subnet: Subnet
    timesteps: tuple[int, int]

    def to_json(self) -> dict:
        """Return the group as written in settings.weights.groups."""
        return {"steps": [self.start, self.stop], "subnet": self.subnet.as_dict(), "timesteps": list(self.timesteps)}


@dataclass(frozen=True, order=True)
class GroupRef:
    """A step's `group` value: which group's fine-tuned copy of its subnet runs it, in which weights file."""

    group: int
    weights: str  # the SHA-256 of the weights file

    def __str__(self) -> str:
        return str(self.group)


@dataclass(eq=False)
class GroupWeights:
    """A schedule's fine-tuned group weights: where they are, their hash, the groups."""

    path: Path  # the safetensors file
    sha256: str
    groups: tuple[WeightGroup, ...]
    info: dict = field(default_factory=dict)  # how they were trained (recorded, not trusted)
    _states: dict | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps the groups cover."""
        return self.groups[-1].stop

    def group_of_step(self, i: int) -> int:
        """Return the index of the group that runs step i."""
        for k, g in enumerate(self.groups):
            if g.start <= i < g.stop:
                return k
        raise DDSMError(f"step {i} is in no weight group (the groups cover {self.steps} steps)")

    def to_json(self, base: Path | None = None) -> dict:
        """Return settings.weights, the file named relative to `base` (the schedule's folder)."""
        name = os.path.relpath(self.path, base) if base is not None else self.path.name
        return {"file": Path(name).as_posix(), "sha256": self.sha256, "groups": [g.to_json() for g in self.groups],
                **({"finetune": self.info} if self.info else {})}

    def check(self, subnets: Sequence[Subnet], space, timesteps: Sequence[int], num_timesteps: int) -> None:
        """Raise DDSMError unless every group runs the schedule's (checked) subnet on its steps and was
        fine-tuned on an interval of timesteps holding theirs."""
        if self.steps != len(subnets):
            raise DDSMError(f"settings.weights: the groups cover {self.steps} steps but the schedule has "
                            f"{len(subnets)}")
        for k, g in enumerate(self.groups):
            try:
                mine = space.check(g.subnet)
            except DDSMError as exc:
                raise DDSMError(f"settings.weights.groups[{k}]: {exc}") from None
            other = [i for i in range(g.start, g.stop) if space.check(subnets[i]) != mine]
            if other:
                raise DDSMError(f"settings.weights.groups[{k}] runs {mine.key}, but step {other[0]} of the schedule "
                                f"runs {space.check(subnets[other[0]]).key}")
            lo, hi = g.timesteps
            inside = [timesteps[i] for i in range(g.start, g.stop)]
            if not (0 <= lo <= min(inside) and max(inside) <= hi <= num_timesteps - 1):
                raise DDSMError(f"settings.weights.groups[{k}]: timesteps [{lo}, {hi}] do not hold its steps' "
                                f"timesteps {min(inside)} .. {max(inside)} (within 0 .. {num_timesteps - 1})")

    def refs(self) -> list[GroupRef]:
        """Return each step's group value: GroupRef(its group, the file's hash)."""
        return [GroupRef(k, self.sha256) for k, g in enumerate(self.groups) for _ in range(g.start, g.stop)]

    def states(self) -> dict[int, dict]:
        """Return {group: its state dict} read from the file, after checking the SHA-256 of those bytes."""
        if self._states is None:
            from safetensors import SafetensorError
            from safetensors.torch import load

            try:
                blob = self.path.read_bytes()
            except OSError:
                raise DDSMError(f"group weights file not found: {self.path}") from None
            if hashlib.sha256(blob).hexdigest() != self.sha256:
                raise DDSMError(f"{self.path} does not match its sha256 in the schedule (changed or replaced)")
            try:
                tensors = load(blob)
            except (SafetensorError, ValueError) as exc:
                raise DDSMError(f"{self.path} is not a safetensors file ({exc})") from None
            states: dict[int, dict] = {k: {} for k in range(len(self.groups))}
            for name, value in tensors.items():
                head, _, rest = name.partition(".")
                index = head[len("group"):]
                if not head.startswith("group") or not index.isdigit() or int(index) not in states or not rest:
                    raise DDSMError(f"{self.path}: tensor {name!r} belongs to no weight group")
                states[int(index)][rest] = value
            empty = [k for k, s in states.items() if not s]
            if empty:
                raise DDSMError(f"{self.path} holds no weights for group {empty[0]}")
            self._states = states
        return self._states

    def network(self, model, subnet: Subnet, ref: GroupRef, device: str = "cpu"):
        """Return the static network of a group step: `subnet` exported from `model`, the weights of the
        group `ref` names loaded (strictly), in eval mode on `device`."""
        if ref.weights != self.sha256:
            raise DDSMError(f"group {ref} belongs to other group weights than {self.path}")
        net = model.export(subnet)
        try:
            net.load_state_dict(self.states()[ref.group], strict=True)
        except RuntimeError:
            raise DDSMError(f"{self.path}: the weights of group {ref.group} do not fit subnet {subnet.key} "
                            "of this supernet") from None
        return net.to(device).eval()


def copy_weights(weights: GroupWeights, folder: Path) -> GroupWeights:
    """Return the group weights as a copy of their file in `folder` (same name) names them, after checking
    the copy's SHA-256 (a saved pipeline's schedule names the copy)."""
    from ...io import sha256_file, write_atomic

    target = Path(folder) / weights.path.name
    if target.resolve() != weights.path.resolve():
        try:
            write_atomic(target, lambda tmp: shutil.copyfile(weights.path, tmp))
        except OSError as exc:
            raise DDSMError(f"group weights {weights.path}: cannot be copied to {target} "
                            f"({exc.strerror or exc})") from None
    if sha256_file(target) != weights.sha256:
        raise DDSMError(f"{weights.path} does not match its sha256 in the schedule (changed since it was loaded)")
    return replace(weights, path=target.resolve())


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_weights(value, steps: int, schedule_path: Path) -> GroupWeights | None:
    """Return the group weights that settings.weights names (None if absent), after checking its form,
    that its groups cover the `steps` steps in order, and the file's SHA-256."""
    if value is None:
        return None

    def fail(message: str) -> DDSMError:
        return DDSMError(f"schedule {schedule_path}: settings.weights: {message}")

    if not isinstance(value, dict):
        raise fail(f"expected an object with file, sha256 and groups, got {value!r}")
    unknown = sorted(set(value) - KEYS)
    if unknown or not {"file", "sha256", "groups"} <= set(value):
        raise fail(f"unknown keys {unknown}" if unknown else "needs file, sha256 and groups")
    name, sha, groups = value["file"], value["sha256"], value["groups"]
    if not isinstance(name, str) or not name:
        raise fail(f"file: expected a file name, got {name!r}")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise fail(f"sha256: expected 64 hex digits, got {sha!r}")
    if not isinstance(groups, list) or not groups:
        raise fail("groups: expected a non-empty list")
    info = value.get("finetune", {})
    if not isinstance(info, dict):
        raise fail(f"finetune: expected an object, got {info!r}")
    parsed, expected = [], 0
    for k, g in enumerate(groups):
        where = f"groups[{k}]"
        if not isinstance(g, dict) or set(g) != GROUP_KEYS:
            raise fail(f"{where}: expected an object with steps, subnet and timesteps, got {g!r}")
        span, interval, subnet = g["steps"], g["timesteps"], g["subnet"]
        for key, pair in (("steps", span), ("timesteps", interval)):
            if not isinstance(pair, list) or len(pair) != 2 or not all(_whole(v) for v in pair):
                raise fail(f"{where}.{key}: expected [first, last] whole numbers, got {pair!r}")
        if span[0] != expected or span[1] <= span[0]:
            raise fail(f"{where}.steps {span}: the groups must cover the steps in order without gaps or overlaps "
                       f"(expected it to start at step {expected} and hold at least one)")
        if interval[0] > interval[1]:
            raise fail(f"{where}.timesteps {interval}: the first is above the last")
        if not isinstance(subnet, dict) or not subnet or not all(
                _whole(v) or (isinstance(v, float) and math.isfinite(v)) for v in subnet.values()):
            raise fail(f"{where}.subnet: expected an object of axis values, got {subnet!r}")
        try:
            parsed.append(WeightGroup(span[0], span[1], Subnet.of(**subnet), (interval[0], interval[1])))
        except DDSMError as exc:
            raise fail(f"{where}.subnet: {exc}") from None
        expected = span[1]
    if expected != steps:
        raise fail(f"the groups cover {expected} steps but the schedule has {steps}")
    path = (schedule_path.parent / name).resolve()
    if not path.is_file():
        raise fail(f"the weights file {path} is missing")
    from ...io import sha256_file

    if sha256_file(path) != sha:
        raise fail(f"{path} does not match its sha256 (changed or replaced; run finetune again)")
    return GroupWeights(path=path, sha256=sha, groups=tuple(parsed), info=dict(info))
