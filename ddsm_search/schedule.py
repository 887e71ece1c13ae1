"""The deployable schedule: one subnet per sampling step, the sampler it was made for and settings, as JSON.

Format version 2 lists one subnet per step as an object of axis values ({"width": 0.5, "depth": 6});
axes left out take their full value. A minimal hand-written schedule is just {"subnets": [...]}.
Version-1 files ({"widths": [...]}, one width per step) keep loading and sample identically. Files
written by ddsm-search also name the supernet (path and SHA-256) and the sampler, and loading checks
both against the supernet in use.

`settings` holds what is not a subnet, one key per method family that owns it (space.plugins): each
family reads, writes and checks its own, and gives the steps their per-step values. Today: `exit`, an
early-exit policy (methods/early_exit), and `weights`, per-group fine-tuned weights (methods/step_groups).
A key no family owns is refused. `flops_per_image` is always the static cost of the subnets (a dynamic
step's depth is its cap); what a dynamic schedule executed, measured while sampling, is recorded
beside it (`executed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Supernet
from .diffusion import SAMPLERS, sampling_timesteps
from .errors import DDSMError
from .io import read_json, write_json_atomic
from .space.plugins import families, family_of_field, family_of_setting, settings_known
from .space.steps import Step, steps_of
from .space.subnet import Subnet

FORMAT = "ddsm-search/schedule"
VERSION = 2


@dataclass
class Schedule:
    """One subnet per sampling step (noisiest first), the sampler that runs them and settings that are
    not per step ({setting key: the owning family's object}, e.g. {"exit": ExitPolicy})."""

    subnets: list[Subnet]
    sampler: str = "ddim"
    eta: float = 0.0
    supernet_sha256: str | None = None
    supernet_path: str | None = None
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # figures recorded with the schedule (FLOPs, FID, ...)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return len(self.subnets)

    def step_keys(self) -> list[Step]:
        """Return what each step runs: its subnet and the values its settings' families give it."""
        values = {}
        for key, setting in self.settings.items():
            family = family_of_setting(key)
            per_step = family.step_values(setting, self.steps) if family is not None else None
            if per_step is not None and any(v is not None for v in per_step):
                values[family.field] = per_step
        return steps_of(self.subnets, **values)

    @classmethod
    def from_steps(cls, steps, **kwargs) -> "Schedule":
        """Return the schedule of these steps: their subnets, and the settings that give them their values."""
        settings = dict(kwargs.pop("settings", {}))
        for name in sorted({f for s in steps for f in s.fields}):
            family = family_of_field(name)
            setting = family.setting_from_values([s.get(name) for s in steps])
            if setting is None:
                raise DDSMError(f"a schedule file cannot hold the {name} of its steps")
            settings[family.setting] = setting
        return cls(subnets=[s.subnet for s in steps], settings=settings, **kwargs)

    def to_dict(self, supernet: Supernet, base: str | Path | None = None) -> dict:
        """Return the self-describing JSON form of this schedule for `supernet` (files its settings name
        relative to `base`, the folder the schedule is written to)."""
        settings = {}
        for key, setting in self.settings.items():
            written = family_of_setting(key).write_setting(setting, supernet, Path(base).resolve() if base else None)
            if written is not None:
                settings[key] = written
        return {
            "format": FORMAT,
            "version": VERSION,
            "supernet": {"path": str(supernet.path), "sha256": supernet.sha256},
            "sampler": {"name": self.sampler, "steps": self.steps, "eta": self.eta,
                        "timesteps": sampling_timesteps(supernet.config.diffusion.timesteps, self.steps)},
            "axes": list(supernet.model.space.names),
            "subnets": [s.as_dict() for s in supernet.step_subnets(self.subnets)],  # each step's stage too
            "settings": settings,
            "flops_per_image": supernet.schedule_flops(self.subnets),
            **self.extra,
        }


def _fail(path, message: str) -> DDSMError:
    return DDSMError(f"schedule {path}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KNOWN_KEYS = {"format", "version", "supernet", "sampler", "widths", "axes", "subnets", "settings", "flops_per_image"}


def _read_subnets(data: dict, path: Path) -> list[Subnet]:
    """Return the per-step subnets of a version-2 ('subnets') or version-1 ('widths') schedule."""
    if data.get("version", VERSION if "subnets" in data else 1) == 1:
        widths = data.get("widths")
        if not isinstance(widths, list) or not widths or not all(_is_number(w) for w in widths):
            raise _fail(path, "'widths' must be a non-empty list of numbers")
        return [Subnet.of(width=w) for w in widths]
    subnets = data.get("subnets")
    if not isinstance(subnets, list) or not subnets:
        raise _fail(path, "'subnets' must be a non-empty list (one subnet per step)")
    out = []
    for i, entry in enumerate(subnets):
        if not isinstance(entry, dict) or not entry or not all(_is_number(v) and math.isfinite(v) for v in entry.values()):
            raise _fail(path, f"subnets[{i}]: expected an object of axis values such as {{\"width\": 0.5}}, got {entry!r}")
        try:
            out.append(Subnet.of(**entry))
        except DDSMError as exc:
            raise _fail(path, f"subnets[{i}]: {exc}") from None
    return out


def _read_settings(data: dict, steps: int, path: Path) -> dict:
    """Return {key: setting object} of a file's settings, each read by the family that owns it."""
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise _fail(path, f"'settings' must be an object, got {settings!r}")
    unknown = sorted(k for k in settings if family_of_setting(k) is None)
    if unknown:
        raise _fail(path, f"settings {unknown} are not known to this ddsm-search (known: {', '.join(settings_known())})")
    out = {}
    for family in families():  # in the table's order, whatever the file's
        if family.setting in settings:
            out[family.setting] = family.read_setting(settings[family.setting], steps, path)
    return out


def load_schedule(path: str | Path, supernet: Supernet | None = None) -> Schedule:
    """Return the schedule stored at `path`, checked against `supernet` if given."""
    path = Path(path)
    data = read_json(path, "schedule")
    if "widths" not in data and "subnets" not in data:
        raise _fail(path, "expected a JSON object with a 'subnets' list (or a version-1 'widths' list)")
    if "format" in data and data["format"] != FORMAT:
        raise _fail(path, f"format {data['format']!r} is not {FORMAT!r}")
    if data.get("version", VERSION) not in (1, VERSION):
        raise _fail(path, f"format version {data.get('version')!r} is not 1 or {VERSION}")
    subnets = _read_subnets(data, path)
    settings = _read_settings(data, len(subnets), path)
    sampler = data.get("sampler", {})
    supernet_ref = data.get("supernet", {})
    if not isinstance(sampler, dict) or not isinstance(supernet_ref, dict):
        raise _fail(path, "'sampler' and 'supernet' must be objects")
    name = sampler.get("name", "ddim")
    if name not in SAMPLERS:
        raise _fail(path, f"sampler.name: unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    eta = sampler.get("eta", 0.0)
    if not _is_number(eta) or not math.isfinite(eta) or eta < 0:
        raise _fail(path, f"sampler.eta: expected a finite number >= 0, got {eta!r}")
    for key, value in (("sampler.steps", sampler.get("steps", 1)), ("flops_per_image", data.get("flops_per_image", 0))):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(path, f"{key}: expected a whole number, got {value!r}")
    timesteps = sampler.get("timesteps", [])
    if not isinstance(timesteps, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
        raise _fail(path, f"sampler.timesteps: expected a list of whole numbers, got {timesteps!r}")
    for key in ("sha256", "path"):
        if not isinstance(supernet_ref.get(key, ""), str):
            raise _fail(path, f"supernet.{key}: expected text, got {supernet_ref.get(key)!r}")
    schedule = Schedule(subnets=subnets, sampler=name, eta=float(eta), settings=settings,
                        supernet_sha256=supernet_ref.get("sha256"), supernet_path=supernet_ref.get("path"),
                        extra={k: v for k, v in data.items() if k not in KNOWN_KEYS})
    if "steps" in sampler and sampler["steps"] != schedule.steps:
        raise _fail(path, f"the schedule has {schedule.steps} subnets but its sampler runs {sampler['steps']} steps")
    for key, setting in settings.items():  # what a setting asks of the others (and of the steps)
        family_of_setting(key).check_setting(setting, schedule, None, f"schedule {path}")
    if supernet is not None:
        check_against(schedule, supernet, path)
        recorded = {"flops_per_image": data.get("flops_per_image"), "timesteps": sampler.get("timesteps")}
        actual = schedule.to_dict(supernet)
        for key, value in recorded.items():
            computed = actual[key] if key == "flops_per_image" else actual["sampler"]["timesteps"]
            if value is not None and value != computed:
                raise _fail(path, f"its recorded {key} does not match its subnets (edited by hand?); re-export it")
    return schedule


def check_against(schedule: Schedule, supernet: Supernet, path: str | Path = "<schedule>") -> None:
    """Raise DDSMError unless the schedule belongs to `supernet`, uses only its subnets and its settings
    fit it (each checked by the family that owns it)."""
    if schedule.supernet_sha256 is not None and schedule.supernet_sha256 != supernet.sha256:
        raise DDSMError(f"schedule {path} was made for another supernet (hash {schedule.supernet_sha256[:12]}, "
                        f"this one is {supernet.sha256[:12]})")
    for i, subnet in enumerate(schedule.subnets):
        try:
            supernet.model.check_subnet(subnet)
        except DDSMError as exc:
            raise DDSMError(f"schedule {path}: step {i}: {exc}") from None
    try:  # a multi-stage supernet: a step that names a stage must be in it
        supernet.step_subnets(schedule.subnets)
    except DDSMError as exc:
        raise DDSMError(f"schedule {path}: {exc}") from None
    for key, setting in schedule.settings.items():
        family_of_setting(key).check_setting(setting, schedule, supernet, f"schedule {path}")


def save_schedule(path: str | Path, schedule: Schedule, supernet: Supernet) -> Path:
    """Write the schedule as self-describing JSON (atomically); return the path."""
    check_against(schedule, supernet)
    return write_json_atomic(path, schedule.to_dict(supernet, Path(path).parent))
