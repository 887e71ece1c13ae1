"""The deployable schedule: what each sampling step runs, the solver and its timesteps, and settings, as JSON.

Format version 3 names the solver and its options (`solver`: {"name": "unipc", "order": 2}), the
timesteps (noisiest first), and one entry per step: its timestep and its subnet as an object of axis
values ({"timestep": 999, "subnet": {"width": 0.5, "depth": 6}}; axes left out take their full value).
Version 2 files list `subnets` with a DDIM or DDPM `sampler` on the uniform grid, version 1 files
`widths`: both keep loading and sample bit for bit as they did. A minimal hand-written schedule is just
{"subnets": [...]}. Files written by ddsm-search also name the supernet (path and SHA-256), and loading
checks both against the supernet in use.

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
from .errors import DDSMError
from .io import read_json, write_json_atomic
from .solvers.base import Solver, check_timesteps, timesteps_for
from .space.plugins import families, family_of_field, family_of_setting, settings_known
from .space.steps import Step, steps_of
from .space.subnet import Subnet

FORMAT = "ddsm-search/schedule"
VERSION = 3
VERSIONS = (1, 2, 3)


@dataclass
class Schedule:
    """One subnet per sampling step (noisiest first), the solver that runs them on its timesteps (None:
    the uniform grid) and settings that are not per step ({setting key: the owning family's object},
    e.g. {"exit": ExitPolicy})."""

    subnets: list[Subnet]
    solver: Solver = field(default_factory=Solver)
    timesteps: list[int] | None = None
    supernet_sha256: str | None = None
    supernet_path: str | None = None
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # figures recorded with the schedule (FLOPs, FID, ...)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return len(self.subnets)

    def grid(self, num_timesteps: int) -> list[int]:
        """Return the timesteps of its steps in a process of `num_timesteps` (its own, or the uniform grid)."""
        return list(self.timesteps) if self.timesteps is not None else timesteps_for(num_timesteps, self.steps)

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
        """Return the self-describing JSON form (version 3) of this schedule for `supernet` (files its
        settings name relative to `base`, the folder the schedule is written to)."""
        settings = {}
        for key, setting in self.settings.items():
            written = family_of_setting(key).write_setting(setting, supernet, Path(base).resolve() if base else None)
            if written is not None:
                settings[key] = written
        timesteps = self.grid(supernet.config.diffusion.timesteps)
        subnets = supernet.step_subnets(self.subnets, timesteps)  # each step's stage too
        return {
            "format": FORMAT,
            "version": VERSION,
            "supernet": {"path": str(supernet.path), "sha256": supernet.sha256},
            "solver": self.solver.to_json(),
            "timesteps": timesteps,
            "axes": list(supernet.model.space.names),
            "steps": [{"timestep": t, "subnet": s.as_dict()} for t, s in zip(timesteps, subnets)],
            "settings": settings,
            "flops_per_image": supernet.steps_flops(self.step_keys(), timesteps),
            **self.extra,
        }


def _fail(path, message: str) -> DDSMError:
    return DDSMError(f"schedule {path}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KNOWN_KEYS = {"format", "version", "supernet", "sampler", "solver", "timesteps", "widths", "axes", "subnets", "steps",
              "settings", "flops_per_image"}


def _subnet(entry, where: str, path: Path) -> Subnet:
    if not isinstance(entry, dict) or not entry or not all(_is_number(v) and math.isfinite(v) for v in entry.values()):
        raise _fail(path, f"{where}: expected an object of axis values such as {{\"width\": 0.5}}, got {entry!r}")
    try:
        return Subnet.of(**entry)
    except DDSMError as exc:
        raise _fail(path, f"{where}: {exc}") from None


def _read_subnets(data: dict, version: int, path: Path) -> list[Subnet]:
    """Return the per-step subnets of a version-3 ('steps'), 2 ('subnets') or 1 ('widths') schedule."""
    if version == 1:
        widths = data.get("widths")
        if not isinstance(widths, list) or not widths or not all(_is_number(w) for w in widths):
            raise _fail(path, "'widths' must be a non-empty list of numbers")
        return [Subnet.of(width=w) for w in widths]
    if version == 2:
        subnets = data.get("subnets")
        if not isinstance(subnets, list) or not subnets:
            raise _fail(path, "'subnets' must be a non-empty list (one subnet per step)")
        return [_subnet(entry, f"subnets[{i}]", path) for i, entry in enumerate(subnets)]
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _fail(path, "'steps' must be a non-empty list (one entry per step)")
    for i, entry in enumerate(steps):
        if not isinstance(entry, dict) or set(entry) != {"timestep", "subnet"}:
            raise _fail(path, f"steps[{i}]: expected {{\"timestep\": T, \"subnet\": {{...}}}}, got {entry!r}")
    return [_subnet(entry["subnet"], f"steps[{i}].subnet", path) for i, entry in enumerate(steps)]


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


def _read_sampler(data: dict, version: int, steps: int, path: Path) -> tuple[Solver, list[int] | None]:
    """Return (the solver, the recorded timesteps or None) of a file: version 3's solver and timesteps,
    or the DDIM / DDPM sampler of versions 1 and 2 (on the uniform grid)."""
    if version == 3:
        spec, timesteps = data.get("solver", {"name": "ddim"}), data.get("timesteps")
        given = [entry["timestep"] for entry in data["steps"]]
        if timesteps is None:
            timesteps = given
        elif given != timesteps:
            raise _fail(path, "the timesteps of its steps are not its 'timesteps'")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", "ddim"), str):
            raise _fail(path, f"'solver' must be an object with a name, got {spec!r}")
        try:
            solver = Solver(**{"name": "ddim", **spec})
        except TypeError:
            raise _fail(path, f"solver: unknown options in {spec!r} (eta, order, clip)") from None
        except DDSMError as exc:
            raise _fail(path, f"solver: {exc}") from None
    else:
        sampler = data.get("sampler", {})
        if not isinstance(sampler, dict):
            raise _fail(path, "'sampler' must be an object")
        name, eta = sampler.get("name", "ddim"), sampler.get("eta", 0.0)
        if name not in ("ddim", "ddpm"):
            raise _fail(path, f"sampler.name: unknown sampler {name!r} (choose from ddim, ddpm)")
        if not _is_number(eta) or not math.isfinite(eta) or eta < 0:
            raise _fail(path, f"sampler.eta: expected a finite number >= 0, got {eta!r}")
        count = sampler.get("steps", steps)
        if not isinstance(count, int) or isinstance(count, bool):
            raise _fail(path, f"sampler.steps: expected a whole number, got {count!r}")
        if count != steps:
            raise _fail(path, f"the schedule has {steps} subnets but its sampler runs {count} steps")
        solver, timesteps = Solver.of_sampler(name, float(eta)), sampler.get("timesteps")
    if timesteps is not None:
        if not isinstance(timesteps, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
            raise _fail(path, f"timesteps: expected a list of whole numbers, got {timesteps!r}")
        if len(timesteps) != steps:
            raise _fail(path, f"{len(timesteps)} timesteps for {steps} steps")
    return solver, timesteps


def load_schedule(path: str | Path, supernet: Supernet | None = None) -> Schedule:
    """Return the schedule stored at `path`, checked against `supernet` if given."""
    path = Path(path)
    data = read_json(path, "schedule")
    if not {"widths", "subnets", "steps"} & set(data):
        raise _fail(path, "expected a JSON object with a 'steps' list (or a version-2 'subnets', version-1 'widths')")
    if "format" in data and data["format"] != FORMAT:
        raise _fail(path, f"format {data['format']!r} is not {FORMAT!r}")
    version = data.get("version", 3 if "steps" in data else 2 if "subnets" in data else 1)
    if version not in VERSIONS:
        raise _fail(path, f"format version {version!r} is not one of {', '.join(map(str, VERSIONS))}")
    subnets = _read_subnets(data, version, path)
    settings = _read_settings(data, len(subnets), path)
    solver, timesteps = _read_sampler(data, version, len(subnets), path)
    supernet_ref = data.get("supernet", {})
    if not isinstance(supernet_ref, dict):
        raise _fail(path, "'supernet' must be an object")
    if not isinstance(data.get("flops_per_image", 0), int) or isinstance(data.get("flops_per_image"), bool):
        raise _fail(path, f"flops_per_image: expected a whole number, got {data.get('flops_per_image')!r}")
    for key in ("sha256", "path"):
        if not isinstance(supernet_ref.get(key, ""), str):
            raise _fail(path, f"supernet.{key}: expected text, got {supernet_ref.get(key)!r}")
    # versions 1 and 2 ran the uniform grid: what they recorded is checked against it, not run
    own = timesteps if version == 3 else None
    schedule = Schedule(subnets=subnets, solver=solver, timesteps=own, settings=settings,
                        supernet_sha256=supernet_ref.get("sha256"), supernet_path=supernet_ref.get("path"),
                        extra={k: v for k, v in data.items() if k not in KNOWN_KEYS})
    for key, setting in settings.items():  # what a setting asks of the others (and of the steps)
        family_of_setting(key).check_setting(setting, schedule, None, f"schedule {path}")
    if supernet is not None:
        check_against(schedule, supernet, path)
        actual = schedule.to_dict(supernet)
        for key, value in (("flops_per_image", data.get("flops_per_image")), ("timesteps", timesteps)):
            if value is not None and value != actual[key]:
                raise _fail(path, f"its recorded {key} does not match its steps (edited by hand?); re-export it")
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
    T = supernet.config.diffusion.timesteps
    try:  # its own timesteps in the process; a multi-stage supernet: a step that names a stage must be in it
        if schedule.timesteps is not None:
            check_timesteps(schedule.timesteps, T)
        supernet.step_subnets(schedule.subnets, schedule.grid(T))
    except DDSMError as exc:
        raise DDSMError(f"schedule {path}: {exc}") from None
    for key, setting in schedule.settings.items():
        family_of_setting(key).check_setting(setting, schedule, supernet, f"schedule {path}")


def save_schedule(path: str | Path, schedule: Schedule, supernet: Supernet) -> Path:
    """Write the schedule as self-describing JSON (atomically); return the path."""
    check_against(schedule, supernet)
    return write_json_atomic(path, schedule.to_dict(supernet, Path(path).parent))
