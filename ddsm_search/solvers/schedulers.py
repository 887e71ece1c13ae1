"""diffusers' multistep schedulers as solvers: DPM-Solver++ (2M, 3M, SDE), UniPC and Euler.

Each run builds the scheduler from the supernet's own noise schedule (its betas as `trained_betas`)
and sets the schedule's explicit timesteps, then hands it the predicted noise of each step, whatever
subnet made it: a multistep scheduler keeps its history of model outputs across steps in the run.
Stochastic steps take their noise from the run's CPU generator for the whole batch (`variance_noise`),
so images do not depend on the batch size or the device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DDSMError


def diffusers_failure(exc: Exception) -> str:
    """Return one line saying why diffusers did not import."""
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "diffusers":
        return "diffusers is not installed (pip install 'ddsm-search[diffusers]')"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # diffusers wraps a dependency that fails to load in a RuntimeError whose last line is the cause
    cause = (lines[-1] if isinstance(exc, RuntimeError) else lines[0]) if lines else type(exc).__name__
    hint = (" (a torchvision built for another torch? pip uninstall torchvision, or install the one made for this "
            "torch)") if "torchvision" in str(exc) else ""
    return f"diffusers does not import: {cause}{hint}"


def diffusers_schedulers():
    """Return diffusers' scheduler module, or raise DDSMError saying in one line why it does not import."""
    try:
        import diffusers.schedulers as schedulers
    except (ImportError, RuntimeError) as exc:
        raise DDSMError(f"this solver runs diffusers' scheduler, but {diffusers_failure(exc)}") from None
    return schedulers


def build_scheduler(solver, noise_schedule):
    """Return the diffusers scheduler of `solver` on `noise_schedule`'s betas (epsilon prediction)."""
    schedulers = diffusers_schedulers()
    common = dict(num_train_timesteps=noise_schedule.timesteps, trained_betas=noise_schedule.betas.numpy(),
                  prediction_type="epsilon")
    # clip: diffusers' dynamic thresholding with sample_max_value 1 clips the predicted x0 to [-1, 1]
    # (its per-image scale s, the 99.5th percentile of |x0|, is clamped to [1, sample_max_value] = 1), as
    # DDIM does here; DPM-Solver++ recommends thresholding for pixel-space models
    clip = dict(thresholding=bool(solver.clip), dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    if solver.name in ("dpmsolver++", "sde-dpmsolver++"):
        return schedulers.DPMSolverMultistepScheduler(**common, **clip, algorithm_type=solver.name,
                                                      solver_order=solver.order)
    if solver.name == "unipc":
        return schedulers.UniPCMultistepScheduler(**common, **clip, solver_order=solver.order, solver_type="bh2")
    if solver.name == "euler":
        return schedulers.EulerDiscreteScheduler(**common)
    raise DDSMError(f"solver {solver.name} is not one of diffusers' schedulers")


def set_timesteps(scheduler, timesteps: Sequence[int]) -> None:
    """Set explicit timesteps (noisiest first) on a scheduler, with the sigmas its default grid would give.

    DPM-Solver++ and Euler take them (`set_timesteps(timesteps=...)`); UniPC takes explicit sigmas only
    for flow models, so after its own set_timesteps(n) resets its state, its timesteps and sigmas are
    replaced by those of the given grid, computed as its default (non-Karras) branch computes them:
    sigma(t) = sqrt((1 - abar_t) / abar_t) at each timestep, then the final sigma (0, "zero").
    """
    ts = [int(t) for t in timesteps]
    if isinstance(scheduler, diffusers_schedulers().UniPCMultistepScheduler):
        scheduler.set_timesteps(len(ts))
        abar = scheduler.alphas_cumprod.numpy()
        sigmas = np.interp(ts, np.arange(len(abar)), ((1 - abar) / abar) ** 0.5)
        scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        scheduler.timesteps = torch.tensor(ts, dtype=torch.int64)
        return
    scheduler.set_timesteps(timesteps=ts)


class SchedulerRun:
    """One sampling run of a diffusers scheduler over explicit timesteps."""

    def __init__(self, solver, noise_schedule, timesteps: Sequence[int]):
        self.scheduler = build_scheduler(solver, noise_schedule)
        set_timesteps(self.scheduler, timesteps)
        self.stochastic = solver.stochastic
        # the initial latent's scale: 1 for the VP solvers; Euler works on x / sqrt(abar), whose start is
        # N(0, sigma_max^2 + 1). diffusers' Euler returns sigma_max instead under its linspace and trailing
        # spacings (a shortcut for sigma_max >> 1); the exact value is used whatever the spacing
        self.init_noise_sigma = float((self.scheduler.sigmas[0] ** 2 + 1) ** 0.5) if solver.name == "euler" else 1.0

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Return the latent as the network sees it (Euler scales its sigma-space latent)."""
        return self.scheduler.scale_model_input(x, self.scheduler.timesteps[i])

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the latent after step i from the predicted noise."""
        noise = None
        if self.stochastic:
            if generator is None:
                raise ValueError("a stochastic solver needs a generator")
            noise = torch.randn(x.shape, generator=generator).to(x.device)
        return self.advance(i, eps, x, noise)

    def advance(self, i: int, eps: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Return the latent after step i from the predicted noise and, for a stochastic solver, its step
        noise (`step` draws it; solvers/linear.py hands in its own)."""
        kwargs = {"variance_noise": noise} if self.stochastic else {}
        return self.scheduler.step(eps, self.scheduler.timesteps[i], x, return_dict=False, **kwargs)[0]
