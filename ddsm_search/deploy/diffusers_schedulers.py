"""diffusers' schedulers as DDSMPipeline's scheduler component: the scheduler of a solver, and the solver
of a scheduler.

`scheduler_for(solver, noise_schedule)` returns the diffusers scheduler that takes the steps a
`solvers.Solver` takes, built from the supernet's betas: DDIM and DDPM as tests/test_samplers.py holds
our hand-written updates equal to them (x0 clipped to [-1, 1], alpha_bar = 1 past the last step,
DDPM's fixed_small variance), the others as `solvers.schedulers.build_scheduler` builds the scheduler a
run steps with. `solver_for(scheduler, noise_schedule)` maps a scheduler back: DDIMScheduler -> ddim,
DDPMScheduler -> ddpm, DPMSolverMultistepScheduler(algorithm_type=dpmsolver++ | sde-dpmsolver++,
solver_order=k) -> dpmsolver++(order=k) | sde-dpmsolver++(order=k), UniPCMultistepScheduler(solver_order=k)
-> unipc(order=k), EulerDiscreteScheduler -> euler; thresholding (at sample_max_value 1) is the multistep
solvers' clip. Its config must equal that of the solver's own
scheduler in every option that changes a step: another class, or an option a solver does not take
(UniPC's solver_type='bh1', DDIM without clipping, Karras sigmas, v-prediction), is refused in one
line naming it. What a pipeline runs is the solver: on the schedule's own timesteps, with the
supernet's betas; so the options that only pick timesteps (timestep_spacing, steps_offset) do not
matter, and betas given another way than the supernet's (a named beta_schedule) must give the same
betas to float32 rounding.
"""

from __future__ import annotations

import torch

from ..errors import DDSMError
from ..solvers.base import Solver
from ..solvers.schedulers import build_scheduler, diffusers_schedulers

# diffusers' scheduler class -> the solver it steps as
SOLVER_OF = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmsolver++",
             "UniPCMultistepScheduler": "unipc", "EulerDiscreteScheduler": "euler"}
# options that do not change a run on explicit timesteps with the supernet's betas (the betas are compared)
TIMESTEP_ONLY = {"timestep_spacing", "steps_offset", "trained_betas", "beta_schedule", "beta_start", "beta_end"}
# the options of DDIM and DDPM under which diffusers' step is the update solvers/ddim.py writes by hand
CLIPPED = dict(prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0, thresholding=False,
               rescale_betas_zero_snr=False)


def scheduler_for(solver: Solver, noise_schedule):
    """Return the diffusers scheduler of `solver` on `noise_schedule`'s betas."""
    schedulers = diffusers_schedulers()
    common = dict(num_train_timesteps=noise_schedule.timesteps, trained_betas=noise_schedule.betas.numpy())
    if solver.name == "ddim":
        return schedulers.DDIMScheduler(**common, **CLIPPED, set_alpha_to_one=True)
    if solver.name == "ddpm":
        return schedulers.DDPMScheduler(**common, **CLIPPED, variance_type="fixed_small")
    return build_scheduler(solver, noise_schedule)


def solver_for(scheduler, noise_schedule, eta: float = 0.0) -> Solver:
    """Return the solver that steps as `scheduler` does (DDIM with `eta`: the scheduler's config has none),
    or raise DDSMError naming the class or the option that has none."""
    name = type(scheduler).__name__
    schedulers = diffusers_schedulers()
    kind = SOLVER_OF.get(name)
    if kind is None or type(scheduler) is not getattr(schedulers, name, None):
        raise DDSMError(f"scheduler {name} has no solver in ddsm-search (choose from {', '.join(SOLVER_OF)}, "
                        "diffusers' own classes)")
    config = dict(scheduler.config)
    options = {}
    if kind == "dpmsolver++":
        kind = config.get("algorithm_type")
        if kind not in ("dpmsolver++", "sde-dpmsolver++"):
            raise DDSMError(f"{name}(algorithm_type={kind!r}) is not supported (dpmsolver++ or sde-dpmsolver++)")
    if kind in ("dpmsolver++", "sde-dpmsolver++", "unipc"):
        # thresholding (with sample_max_value 1: x0 clipped to [-1, 1]) is the solver's clip
        options["order"], options["clip"] = config.get("solver_order"), bool(config.get("thresholding"))
    elif kind == "ddim":
        options["eta"] = eta
    try:
        solver = Solver(kind, **options)
    except DDSMError as exc:
        raise DDSMError(f"{name}(solver_order={options.get('order')!r}): {exc}") from None
    reference = scheduler_for(solver, noise_schedule).config
    for key, value in reference.items():
        if key.startswith("_") or key in TIMESTEP_ONLY:
            continue
        if _plain(config.get(key)) != _plain(value):
            raise DDSMError(f"{name}({key}={config.get(key)!r}) is not supported: ddsm-search's {solver} steps as "
                            f"{name}({key}={value!r})")
    betas, ours = scheduler.betas, noise_schedule.betas
    if betas.shape != ours.shape or not torch.allclose(betas.double(), ours, rtol=1e-5, atol=0):
        raise DDSMError(f"{name}'s betas are not the supernet's ({len(ours)} timesteps, its beta_schedule): build "
                        "it from the pipeline's scheduler config, e.g. UniPCMultistepScheduler.from_config("
                        "pipe.scheduler.config)")
    return solver


def _plain(value):
    """Return a config value with tuples as lists (a config read back from JSON holds lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
