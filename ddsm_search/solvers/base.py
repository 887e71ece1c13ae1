"""A solver: the update rule that takes a latent from one sampling step to the next, with its options,
and the timestep grids it runs on.

`Solver` is a frozen record (name and options) with one canonical text, `ddim`, `ddim(eta=0.5)`,
`dpmsolver++(order=3)`, written in schedule files and plan keys. `Solver.run(noise schedule, timesteps)`
returns a fresh `SolverRun`, the state of one sampling run: what the network sees at step i
(`model_input`) and the update from step i to i+1 (`step`). Multistep solvers keep their history of
model outputs in the run, whichever subnet made them, so each step may run another subnet; a prefix
cache copies the run with the latent.

Timestep grids (`timesteps_for`): `uniform` (evenly spaced from T-1 down to 0, both included: this
project's grid, and what version-1 and 2 schedules ran), and diffusers' `linspace`, `leading` and
`trailing` spacings (Table 2 of arXiv 2305.08891), or an explicit list.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Protocol, Sequence

import numpy as np
import torch

from ..diffusion import sampling_timesteps
from ..errors import DDSMError
from .names import SOLVERS, SPACINGS

_TEXT = re.compile(r"^([a-z+-]+)(?:\((.*)\))?$")


# what each solver does with the predicted x0 where it has no `clip` option: DDIM and DDPM always clip it
FIXED_CLIP = {"ddim": True, "ddpm": True, "euler": False}


@dataclass(frozen=True, order=True)
class Solver:
    """A sampler's update rule and its options: `eta` (ddim), `order` (multistep solvers) and `clip` (the
    multistep solvers: x0 clipped to [-1, 1] before each update, the default, as DDIM does)."""

    name: str = "ddim"
    eta: float = 0.0
    order: int = 2
    clip: bool | None = None  # None: the solver's default

    def __post_init__(self):
        if self.name not in SOLVERS:
            raise DDSMError(f"unknown solver {self.name!r} (choose from {', '.join(SOLVERS)})")
        options = SOLVERS[self.name][1]
        if self.clip is not None and not isinstance(self.clip, bool):
            raise DDSMError(f"solver {self.name}: clip must be true or false, got {self.clip!r}")
        default = options.get("clip", FIXED_CLIP.get(self.name))
        if self.clip is not None and "clip" not in options and self.clip != default:
            raise DDSMError(f"solver {self.name} takes no clip ({'it always clips x0' if default else 'no clipping'})")
        object.__setattr__(self, "clip", default if self.clip is None else self.clip)
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) \
                or self.eta < 0:
            raise DDSMError(f"solver eta must be a finite number >= 0, got {self.eta!r}")
        if self.eta and self.name != "ddim":
            raise DDSMError(f"solver {self.name} takes no eta (only ddim does)")
        if self.order != 2 and "order" not in SOLVERS[self.name][1]:
            raise DDSMError(f"solver {self.name} takes no order")
        if self.order not in (1, 2, 3) or (self.name == "sde-dpmsolver++" and self.order == 3):
            raise DDSMError(f"solver {self.name}: order must be {'1 or 2' if self.name == 'sde-dpmsolver++' else '1, 2 or 3'},"
                            f" got {self.order!r}")
        object.__setattr__(self, "eta", float(self.eta))

    @classmethod
    def parse(cls, text) -> "Solver":
        """Return the solver of a text such as 'ddim', 'ddim(eta=0.5)' or 'unipc(order=3)' (or a Solver)."""
        if isinstance(text, Solver):
            return text
        match = _TEXT.match(str(text).strip())
        if not match:
            raise DDSMError(f"{text!r} is not a solver (e.g. ddim, ddim(eta=0.5), dpmsolver++(order=3), unipc(clip=false))")
        options = {}
        for part in filter(None, (match.group(2) or "").split(",")):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in {f.name for f in fields(cls)} - {"name"}:
                raise DDSMError(f"{text!r}: unknown solver option {key!r} (eta, order, clip)")
            if key == "clip":
                flag = value.strip().lower()
                if flag not in ("true", "false", "1", "0"):
                    raise DDSMError(f"{text!r}: clip={value!r} is not true or false")
                options[key] = flag in ("true", "1")
                continue
            try:
                options[key] = int(value) if key == "order" else float(value)
            except ValueError:
                raise DDSMError(f"{text!r}: {key}={value!r} is not a number") from None
        return cls(match.group(1), **options)

    @classmethod
    def of_sampler(cls, name: str, eta: float = 0.0) -> "Solver":
        """Return the solver a config's or a version-1/2 schedule's sampler and eta name (ddpm ignores
        eta, as its step always did)."""
        return cls(name, eta=eta if name == "ddim" else 0.0)

    @property
    def key(self) -> str:
        """Return the canonical text: the name, then the options that differ from their defaults."""
        defaults = SOLVERS[self.name][1]
        options = [f"{k}={getattr(self, k)!r}" for k in defaults if getattr(self, k) != defaults[k]]
        return f"{self.name}({','.join(options)})" if options else self.name

    def __str__(self) -> str:
        return self.key

    @property
    def stochastic(self) -> bool:
        """Return True if a step draws noise (from the run's generator)."""
        return self.name in ("ddpm", "sde-dpmsolver++") or (self.name == "ddim" and self.eta > 0)

    def to_json(self) -> dict:
        """Return the solver as a schedule file writes it."""
        return {"name": self.name, **{k: getattr(self, k) for k in SOLVERS[self.name][1]}}

    def run(self, noise_schedule, timesteps: Sequence[int]) -> "SolverRun":
        """Return a fresh run of this solver over `timesteps` (noisiest first) of `noise_schedule`."""
        if self.name in ("ddim", "ddpm"):
            from .ddim import DDIMRun

            return DDIMRun(self, noise_schedule, timesteps)
        from .schedulers import SchedulerRun

        return SchedulerRun(self, noise_schedule, timesteps)


class SolverRun(Protocol):
    """The state of one sampling run of a solver."""

    init_noise_sigma: float  # the initial noise is scaled by it (1 for VP solvers)

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Return what the network sees at step i for latent x."""

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the latent after step i from the network's predicted noise at step i."""


def timesteps_for(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """Return `steps` timesteps of a process of `num_timesteps`, noisiest first, spaced as `spacing` says."""
    if spacing not in SPACINGS:
        raise DDSMError(f"unknown timestep spacing {spacing!r} (choose from {', '.join(SPACINGS)})")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise DDSMError(f"steps must be between 1 and {num_timesteps}, got {steps!r}")
    T = num_timesteps
    if spacing == "uniform":
        return sampling_timesteps(T, steps)
    # diffusers' spacings, as its schedulers' set_timesteps computes them
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        grid = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1]
    else:
        grid = np.arange(T, 0, -T / steps).round() - 1
    out = [int(t) for t in grid]
    if len(set(out)) != len(out):
        raise DDSMError(f"{steps} steps of {spacing} spacing repeat a timestep of {T}")
    return out


def spacing_of(timesteps: Sequence[int], num_timesteps: int) -> str | None:
    """Return the named spacing that gives exactly these timesteps, or None (an explicit list)."""
    for spacing in SPACINGS:
        try:
            if timesteps_for(num_timesteps, len(timesteps), spacing) == list(timesteps):
                return spacing
        except DDSMError:
            continue
    return None


def check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> list[int]:
    """Return an explicit timestep list checked: whole numbers in 0 .. T-1, strictly falling."""
    out = list(timesteps)
    if not out or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in out):
        raise DDSMError(f"timesteps must be a non-empty list of whole numbers, got {timesteps!r}")
    out = [int(t) for t in out]
    if not all(0 <= t < num_timesteps for t in out) or any(a <= b for a, b in zip(out, out[1:])):
        raise DDSMError(f"timesteps must fall strictly, noisiest first, within 0 .. {num_timesteps - 1}, got {out}")
    return out


def head_of(solver: Solver, timesteps: Sequence[int], spacing: str | None) -> str | None:
    """Return the head of a plan key: the solver's text and the spacing (or `t=` and the timesteps); None
    for DDIM on the uniform grid."""
    grid = spacing or "t=" + ",".join(str(int(t)) for t in timesteps)
    return None if solver.key == "ddim" and grid == "uniform" else f"{solver.key} {grid}"


def read_head(head: str | None, num_timesteps: int, steps: int, default: Solver | None = None
              ) -> tuple[Solver, list[int], str | None]:
    """Return (solver, timesteps, spacing or None) of a plan key's head; a key without one ran `default`
    (DDIM if not given: a run whose keys have no head ran its search's sampler) on the uniform grid."""
    if head is None:
        return default or Solver(), timesteps_for(num_timesteps, steps, "uniform"), "uniform"
    text, _, grid = head.strip().rpartition(" ")
    solver = Solver.parse(text)
    if grid.startswith("t="):
        try:
            timesteps = check_timesteps([int(v) for v in grid[2:].split(",")], num_timesteps)
        except ValueError:
            raise DDSMError(f"{head!r}: timesteps must be whole numbers") from None
        if len(timesteps) != steps:
            raise DDSMError(f"{head!r}: {len(timesteps)} timesteps for {steps} steps")
        return solver, timesteps, spacing_of(timesteps, num_timesteps)
    return solver, timesteps_for(num_timesteps, steps, grid), grid
