"""The deployable schedule: one subnet per sampling step, the sampler it was made for and global
settings, as JSON.

Format version 2 lists one subnet per step as an object of axis values ({"width": 0.5, "depth": 6});
axes left out take their full value. A minimal hand-written schedule is just {"subnets": [...]}.
Version-1 files ({"widths": [...]}, one width per step) keep loading and sample identically. Files
written by ddsm-search also name the supernet (path and SHA-256) and the sampler, and loading checks
both against the supernet in use.

`settings` holds what is not a subnet: the exit policy (AdaDiff's dynamic early exit on a DiT with
exit heads), {"exit": {"thresholds": [one per step, null = no exit], "heads_sha256": ...}} or, by
hand, {"exit": {"threshold": 0.8}} for every step; and per-group fine-tuned weights (Step-Adaptive
Training, reconstructed: `ddsm-search finetune`), {"weights": {"file": ..., "sha256": ..., "groups": [...]}}
(see group_weights; an exit policy and group weights together are refused). `flops_per_image` is
always the static cost of the subnets (a dynamic step's depth is its cap); what a dynamic schedule
executed, measured while sampling, is recorded beside it (`executed`: FLOPs per image with their
spread, depth per step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Supernet
from .diffusion import SAMPLERS, sampling_timesteps
from .errors import DDSMError
from .methods.early_exit.policy import ExitPolicy
from .methods.step_groups.weights import GroupWeights, read_weights
from .io import write_json_atomic
from .space.subnet import Subnet

FORMAT = "ddsm-search/schedule"
VERSION = 2


@dataclass
class Schedule:
    """One subnet per sampling step (noisiest first), the sampler that runs them and global settings."""

    subnets: list[Subnet]
    sampler: str = "ddim"
    eta: float = 0.0
    supernet_sha256: str | None = None
    supernet_path: str | None = None
    exit: ExitPolicy | None = None  # a dynamic early exit's threshold per step (DiT with exit heads)
    exit_heads: str | None = None  # the SHA-256 of the heads the exit policy was made with
    weights: GroupWeights | None = None  # per-group fine-tuned weights (settings.weights, `finetune`)
    settings: dict = field(default_factory=dict)  # other settings that are not per step (none known yet)
    extra: dict = field(default_factory=dict)  # figures recorded with the schedule (FLOPs, FID, ...)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return len(self.subnets)

    def to_dict(self, supernet: Supernet, base: str | Path | None = None) -> dict:
        """Return the self-describing JSON form of this schedule for `supernet` (group weights named
        relative to `base`, the folder the schedule is written to)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "supernet": {"path": str(supernet.path), "sha256": supernet.sha256},
            "sampler": {"name": self.sampler, "steps": self.steps, "eta": self.eta,
                        "timesteps": sampling_timesteps(supernet.config.diffusion.timesteps, self.steps)},
            "axes": list(supernet.model.space.names),
            "subnets": [s.as_dict() for s in supernet.step_subnets(self.subnets)],  # each step's stage too
            "settings": {**self.settings, **self._exit_settings(supernet), **self._weights_settings(base)},
            "flops_per_image": supernet.schedule_flops(self.subnets),
            **self.extra,
        }

    def _weights_settings(self, base) -> dict:
        if self.weights is None:
            return {}
        return {"weights": self.weights.to_json(Path(base).resolve() if base is not None else None)}

    def _exit_settings(self, supernet: Supernet) -> dict:
        if self.exit is None or not self.exit.dynamic:
            return {}
        from .methods.early_exit.finetune import heads_sha256

        if self.exit.steps != self.steps:
            raise DDSMError(f"the exit policy has {self.exit.steps} thresholds for {self.steps} steps")
        return {"exit": {"thresholds": self.exit.to_json(), "heads_sha256": self.exit_heads or heads_sha256(supernet)}}


def _fail(path: Path, message: str) -> DDSMError:
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


def load_schedule(path: str | Path, supernet: Supernet | None = None) -> Schedule:
    """Return the schedule stored at `path`, checked against `supernet` if given."""
    path = Path(path)
    if not path.is_file():
        raise DDSMError(f"schedule file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise _fail(path, "not a text file (expected JSON)") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or ("widths" not in data and "subnets" not in data):
        raise _fail(path, "expected a JSON object with a 'subnets' list (or a version-1 'widths' list)")
    if "format" in data and data["format"] != FORMAT:
        raise _fail(path, f"format {data['format']!r} is not {FORMAT!r}")
    if data.get("version", VERSION) not in (1, VERSION):
        raise _fail(path, f"format version {data.get('version')!r} is not 1 or {VERSION}")
    subnets = _read_subnets(data, path)
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise _fail(path, f"'settings' must be an object, got {settings!r}")
    unknown = sorted(set(settings) - {"exit", "weights"})
    if unknown:
        raise _fail(path, f"settings {unknown} are not known to this ddsm-search")
    exit, heads = _read_exit(settings.get("exit"), len(subnets), path)
    weights = read_weights(settings.get("weights"), len(subnets), path)
    if weights is not None and exit is not None and exit.dynamic:
        raise _fail(path, "settings: an exit policy together with fine-tuned group weights is not supported (the "
                    "exit heads were trained on the supernet's weights, not on the groups' fine-tuned ones)")
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
    schedule = Schedule(subnets=subnets, sampler=name, eta=float(eta), exit=exit, exit_heads=heads,
                        weights=weights, supernet_sha256=supernet_ref.get("sha256"),
                        supernet_path=supernet_ref.get("path"),
                        extra={k: v for k, v in data.items() if k not in KNOWN_KEYS})
    if "steps" in sampler and sampler["steps"] != schedule.steps:
        raise _fail(path, f"the schedule has {schedule.steps} subnets but its sampler runs {sampler['steps']} steps")
    if supernet is not None:
        check_against(schedule, supernet, path)
        recorded = {"flops_per_image": data.get("flops_per_image"), "timesteps": sampler.get("timesteps")}
        actual = schedule.to_dict(supernet)
        for key, value in recorded.items():
            computed = actual[key] if key == "flops_per_image" else actual["sampler"]["timesteps"]
            if value is not None and value != computed:
                raise _fail(path, f"its recorded {key} does not match its subnets (edited by hand?); re-export it")
    return schedule


def _read_exit(value, steps: int, path: Path) -> tuple[ExitPolicy | None, str | None]:
    """Return the exit policy and heads hash of settings.exit (None, None if there is none)."""
    if value is None:
        return None, None
    if not isinstance(value, dict) or not ({"threshold", "thresholds"} & set(value)):
        raise _fail(path, "settings.exit: expected {\"thresholds\": [one per step]} or {\"threshold\": T}")
    unknown = sorted(set(value) - {"threshold", "thresholds", "heads_sha256"})
    if unknown or {"threshold", "thresholds"} <= set(value):
        raise _fail(path, f"settings.exit: unknown or conflicting keys {unknown or ['threshold', 'thresholds']}")
    heads = value.get("heads_sha256")
    if heads is not None and not isinstance(heads, str):
        raise _fail(path, f"settings.exit.heads_sha256: expected text, got {heads!r}")
    given = value["thresholds"] if "thresholds" in value else value["threshold"]
    if "thresholds" in value and not isinstance(given, list):
        raise _fail(path, f"settings.exit.thresholds: expected a list (one per step), got {given!r}")
    try:
        return ExitPolicy.of(given, steps), heads
    except DDSMError as exc:
        raise _fail(path, f"settings.exit: {exc}") from None


def check_against(schedule: Schedule, supernet: Supernet, path: str | Path = "<schedule>") -> None:
    """Raise DDSMError unless the schedule belongs to `supernet` and uses only its subnets (and, with an
    exit policy, the supernet has the exit heads it was made with)."""
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
    timesteps = sampling_timesteps(supernet.config.diffusion.timesteps, schedule.steps)
    if schedule.weights is not None:
        if schedule.exit is not None and schedule.exit.dynamic:
            raise DDSMError(f"schedule {path}: an exit policy together with fine-tuned group weights is not supported")
        try:
            schedule.weights.check(supernet.model.step_subnets(schedule.subnets, timesteps), supernet.model.space,
                                   timesteps, supernet.config.diffusion.timesteps)
        except DDSMError as exc:
            raise DDSMError(f"schedule {path}: {exc}") from None
    if schedule.exit is not None and schedule.exit.dynamic:
        from .methods.early_exit.finetune import heads_sha256

        if schedule.exit.steps != schedule.steps:
            raise DDSMError(f"schedule {path}: {schedule.exit.steps} exit thresholds for {schedule.steps} steps")
        try:
            current = heads_sha256(supernet)
        except DDSMError as exc:
            raise DDSMError(f"schedule {path} has an exit policy: {exc}") from None
        if schedule.exit_heads is not None and schedule.exit_heads != current:
            raise DDSMError(f"schedule {path}: its exit policy was made with other exit heads than those beside "
                            f"{supernet.path} (run the search again, or put its heads back)")


def save_schedule(path: str | Path, schedule: Schedule, supernet: Supernet) -> Path:
    """Write the schedule as self-describing JSON (atomically); return the path."""
    check_against(schedule, supernet)
    return write_json_atomic(path, schedule.to_dict(supernet, Path(path).parent))
