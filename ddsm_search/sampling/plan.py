"""Plans: a schedule resolved against a supernet, what every step runs, made once and passed around.

(The plan lives beside the loop that runs it, not in space/: it makes callables on a backend, and
backbones, which backends run, stand on space's subnets.)

A `Runtime` holds one supernet on one device and backend and makes, once, the callable that runs each
step it is asked for: the subnet's exported static network on its backend, or what the step's method
families make of it (a group's fine-tuned network, a per-image early exit with its heads). A `Plan`
is the steps of one schedule with their timesteps and sampler, bound to a runtime: `sampling.generate`,
`evaluation.evaluate`, the search's worker, export's confirmation, the report and the pipelines take a
plan. The sampling loop sees only callables per step and knows no method by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..diffusion import NoiseSchedule
from ..errors import DDSMError
from ..solvers.base import Solver, check_timesteps, head_of, read_head, spacing_of, timesteps_for
from ..space.plugins import MethodFamily, family_of_field
from ..space.steps import Step, parse_plan_key, plan_key, split_head
from ..space.subnet import Subnet


class Runtime:
    """The callables that run a supernet's steps on one device and backend, made once and kept.

    `backend`: torch | fused | auto (the faster here, measured per subnet at `batch_size` images, see
    backends.choice) | {subnet key: backend}, a choice made before (a search's driver, for every worker).
    Exported subnets hold contiguous, already-sliced weights (and only the blocks they run), so a
    smaller subnet is genuinely cheaper.
    """

    def __init__(self, supernet, *, device: str = "cpu", backend: str | dict = "torch", batch_size: int = 500):
        self.supernet, self.device, self.backend, self.batch_size = supernet, device, backend, batch_size
        self.denoisers: dict[Step, object] = {}
        self.settings: dict[str, list] = {}  # schedule setting key -> the setting objects plans were made with
        self._resources: dict = {}

    @property
    def model(self):
        """Return the supernet's model."""
        return self.supernet.model

    def resource(self, key, make):
        """Return what `make()` returns, made once per runtime under `key` (a family's heads, say)."""
        if key not in self._resources:
            self._resources[key] = make()
        return self._resources[key]

    def use(self, settings: dict) -> None:
        """Keep a schedule's settings ({key: setting object}) for the families that build its steps."""
        for key, setting in settings.items():
            kept = self.settings.setdefault(key, [])
            if not any(s is setting for s in kept):
                kept.append(setting)

    def export(self, subnet: Subnet):
        """Return the subnet's static network on this runtime's device, in eval mode."""
        return self.model.export(subnet).to(self.device).eval()

    def steps_of(self, what: Sequence, timesteps: Sequence[int]) -> list[Step]:
        """Return steps for `what` (Steps, or subnets: Subnets, keys, mappings or bare widths), checked,
        with each step's timestep-decided axis filled in (a multi-stage U-Net's stage)."""
        steps = [w if isinstance(w, Step) else Step(self.model.check_subnet(w)) for w in what]
        subnets = self.model.step_subnets([s.subnet for s in steps], timesteps)
        return [s if s.subnet == subnet else s.replace(subnet) for s, subnet in zip(steps, subnets)]

    def plan(self, what: Sequence, *, solver=None, timesteps: Sequence[int] | None = None, spacing: str = "uniform",
             settings: dict | None = None) -> "Plan":
        """Return the plan of `what` (Steps or subnets, one per sampling step, noisiest first) under
        `solver` (a solvers.Solver or its text; default: the supernet's sample section's sampler) on
        explicit `timesteps` or those of `spacing`, with the callables of its steps made (`settings`: its
        schedule's, see `use`)."""
        if not len(what):
            raise DDSMError("a schedule needs at least one step")
        sample, T = self.supernet.config.sample, self.supernet.config.diffusion.timesteps
        solver = Solver.of_sampler(sample.sampler, sample.eta) if solver is None else Solver.parse(solver)
        if timesteps is None:
            timesteps = timesteps_for(T, len(what), spacing)
        else:
            timesteps = check_timesteps(timesteps, T)
            if len(timesteps) != len(what):
                raise DDSMError(f"{len(timesteps)} timesteps for {len(what)} steps")
            spacing = spacing_of(timesteps, T)
        if settings:
            self.use(settings)
        steps = self.steps_of(what, timesteps)
        self.prepare(steps)
        return Plan(self, tuple(steps), tuple(timesteps), solver, spacing)

    def plan_key(self, key: str, default=None, settings: dict | None = None) -> "Plan":
        """Return the plan a plan key names (space.steps.plan_key): its steps, and the solver and timesteps
        of its head (a key without one: `default`, a solvers.Solver, on the uniform grid)."""
        steps = parse_plan_key(key)
        solver, timesteps, _ = read_head(split_head(key)[0], self.supernet.config.diffusion.timesteps, len(steps),
                                         default)
        return self.plan(steps, solver=solver, timesteps=timesteps, settings=settings)

    def plan_schedule(self, schedule) -> "Plan":
        """Return the plan of a schedule.Schedule: its steps, solver, timesteps and settings."""
        return self.plan(schedule.step_keys(), solver=schedule.solver, timesteps=schedule.timesteps,
                         settings=schedule.settings)

    def prepare(self, steps: Iterable[Step]) -> None:
        """Make the callable of every step not made yet."""
        new = [s for s in dict.fromkeys(steps) if s not in self.denoisers]
        if not new:
            return
        static, wrapped = {}, {}
        for step in new:
            base = self.network(step)
            owners = [family_of_field(f) for f in step.fields]
            wrapper = self._one(step, [(f, f.wrap(self, step, base)) for f in owners], "runtime")
            if wrapper is not None:
                wrapped[step] = wrapper
            else:
                static[step] = base
        self.denoisers.update(self._on_backend(static))
        self.denoisers.update(wrapped)

    def network(self, step: Step):
        """Return the static network `step` runs: what its family makes (a group's fine-tuned copy), else
        its subnet's export, on this runtime's device in eval mode."""
        owners = [family_of_field(f) for f in step.fields]
        network = self._one(step, [(f, f.network(self, step)) for f in owners], "network")
        return network if network is not None else self.export(step.subnet)

    @staticmethod
    def _one(step: Step, made: list[tuple[MethodFamily, object]], what: str):
        made = [(f, m) for f, m in made if m is not None]
        if len(made) > 1:
            raise DDSMError(f"step {step.key}: {made[0][0].name} and {made[1][0].name} each make its {what}; "
                            "they cannot run together")
        return made[0][1] if made else None

    def _on_backend(self, nets: dict) -> dict:
        from ..backends import wrap
        from ..backends.choice import choose

        if isinstance(self.backend, dict):
            return {s: wrap(net, self.backend.get(s.subnet.key, "torch")) for s, net in nets.items()}
        if self.backend == "torch" or not nets:
            return nets
        return choose(nets, self.model.image_shape, self.batch_size, self.backend, self.device)

    def backends(self) -> dict[str, str]:
        """Return {step key: the backend its callable runs on} for the steps made so far."""
        from ..backends import backend_of

        return {s.key: backend_of(d) for s, d in self.denoisers.items()}


@dataclass(frozen=True, eq=False)
class Plan:
    """One schedule resolved against a runtime: its steps, their timesteps (noisiest first), the solver
    (and the named spacing the timesteps come from, None for an explicit list)."""

    runtime: Runtime = field(repr=False)
    steps: tuple[Step, ...]
    timesteps: tuple[int, ...]
    solver: Solver = Solver()
    spacing: str | None = "uniform"

    @property
    def supernet(self):
        """Return the plan's supernet."""
        return self.runtime.supernet

    @property
    def head(self) -> str | None:
        """Return the text of its solver and timesteps ('unipc trailing', 'euler t=999,500,0'), None for
        DDIM on the uniform grid (what every schedule ran before solvers could be chosen)."""
        return head_of(self.solver, self.timesteps, self.spacing)

    @property
    def key(self) -> str:
        """Return the plan's text key (space.steps.plan_key, with its head)."""
        return plan_key(self.steps, self.head)

    @property
    def cache_key(self) -> tuple:
        """Return what a prefix cache must hold equal besides the steps: the solver and the timesteps."""
        return self.solver.key, self.timesteps

    def run(self):
        """Return a fresh run of the plan's solver over its timesteps (solvers.SolverRun)."""
        return self.solver.run(NoiseSchedule(self.supernet.config.diffusion), self.timesteps)

    @property
    def subnets(self) -> list[Subnet]:
        """Return the subnet of each step."""
        return [s.subnet for s in self.steps]

    def __len__(self) -> int:
        return len(self.steps)

    def denoiser(self, step: Step):
        """Return the callable that runs `step`."""
        return self.runtime.denoisers[step]

    @property
    def dynamic(self) -> bool:
        """Return True if some step's cost is decided per image while sampling (a wrapped step with `drain`)."""
        return any(hasattr(self.denoiser(s), "drain") for s in self.steps)

    def static_flops(self) -> list[int]:
        """Return each step's FLOPs per image (a cached step's as measured, a dynamic step's: its cap's)."""
        return [self.supernet.step_flops(s) for s in self.steps]

    def flops(self) -> int:
        """Return the FLOPs per image of the whole schedule from the supernet's table."""
        return sum(self.static_flops())

    def full(self) -> "Plan":
        """Return full size's plan with the same solver and timesteps."""
        return self.runtime.plan([self.runtime.model.full] * len(self.steps), solver=self.solver,
                                 timesteps=self.timesteps)

    def with_steps(self, steps: Sequence) -> "Plan":
        """Return the plan of other steps (or subnets) with the same solver (and spacing, or timesteps)."""
        if self.spacing is not None:
            return self.runtime.plan(steps, solver=self.solver, spacing=self.spacing)
        return self.runtime.plan(steps, solver=self.solver, timesteps=self.timesteps)


def resolve_device(device: str) -> str:
    """Return 'cuda' or 'cpu' for 'auto' | 'cpu' | 'cuda', or raise DDSMError if CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DDSMError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise DDSMError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device
