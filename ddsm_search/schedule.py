"""The deployable schedule: one width per sampling step plus the sampler it was made for, as JSON.

A minimal hand-written schedule is just {"widths": [...]}; files written by ddsm-search also name the
supernet (path and SHA-256) and the sampler, and loading checks both against the supernet in use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Supernet
from .diffusion import SAMPLERS, sampling_timesteps
from .errors import DDSMError
from .io import write_json_atomic

FORMAT = "ddsm-search/schedule"
VERSION = 1


@dataclass
class Schedule:
    """One width per sampling step (noisiest first) and the sampler that runs them."""

    widths: list[float]
    sampler: str = "ddim"
    eta: float = 0.0
    supernet_sha256: str | None = None
    supernet_path: str | None = None
    extra: dict = field(default_factory=dict)  # figures recorded with the schedule (FLOPs, FID, ...)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return len(self.widths)

    def to_dict(self, supernet: Supernet) -> dict:
        """Return the self-describing JSON form of this schedule for `supernet`."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "supernet": {"path": str(supernet.path), "sha256": supernet.sha256},
            "sampler": {"name": self.sampler, "steps": self.steps, "eta": self.eta,
                        "timesteps": sampling_timesteps(supernet.config.diffusion.timesteps, self.steps)},
            "widths": list(self.widths),
            "flops_per_image": supernet.schedule_flops(self.widths),
            **self.extra,
        }


def _fail(path: Path, message: str) -> DDSMError:
    return DDSMError(f"schedule {path}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KNOWN_KEYS = {"format", "version", "supernet", "sampler", "widths", "flops_per_image"}


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
    if not isinstance(data, dict) or "widths" not in data:
        raise _fail(path, "expected a JSON object with a 'widths' list")
    if "format" in data and data["format"] != FORMAT:
        raise _fail(path, f"format {data['format']!r} is not {FORMAT!r}")
    if data.get("version", VERSION) != VERSION:
        raise _fail(path, f"format version {data.get('version')} is not {VERSION}")
    widths = data["widths"]
    if not isinstance(widths, list) or not widths or not all(_is_number(w) for w in widths):
        raise _fail(path, "'widths' must be a non-empty list of numbers")
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
    schedule = Schedule(widths=[float(w) for w in widths], sampler=name, eta=float(eta),
                        supernet_sha256=supernet_ref.get("sha256"), supernet_path=supernet_ref.get("path"),
                        extra={k: v for k, v in data.items() if k not in KNOWN_KEYS})
    if "steps" in sampler and sampler["steps"] != schedule.steps:
        raise _fail(path, f"the schedule has {schedule.steps} widths but its sampler runs {sampler['steps']} steps")
    if supernet is not None:
        check_against(schedule, supernet, path)
        recorded = {"flops_per_image": data.get("flops_per_image"), "timesteps": sampler.get("timesteps")}
        actual = schedule.to_dict(supernet)
        for key, value in recorded.items():
            computed = actual[key] if key == "flops_per_image" else actual["sampler"]["timesteps"]
            if value is not None and value != computed:
                raise _fail(path, f"its recorded {key} does not match its widths (edited by hand?); re-export it")
    return schedule


def check_against(schedule: Schedule, supernet: Supernet, path: str | Path = "<schedule>") -> None:
    """Raise DDSMError unless the schedule belongs to `supernet` and uses only its widths."""
    if schedule.supernet_sha256 is not None and schedule.supernet_sha256 != supernet.sha256:
        raise DDSMError(f"schedule {path} was made for another supernet (hash {schedule.supernet_sha256[:12]}, "
                        f"this one is {supernet.sha256[:12]})")
    for w in schedule.widths:
        supernet.model.check_width(w)
    sampling_timesteps(supernet.config.diffusion.timesteps, schedule.steps)


def save_schedule(path: str | Path, schedule: Schedule, supernet: Supernet) -> Path:
    """Write the schedule as self-describing JSON (atomically); return the path."""
    check_against(schedule, supernet)
    return write_json_atomic(path, schedule.to_dict(supernet))
