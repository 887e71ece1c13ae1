"""DDIM and ancestral DDPM over a respaced chain, written by hand.

Why by hand when diffusers has both: these updates clip the predicted x0 to [-1, 1] and recompute the
noise from it (diffusers' DDIMScheduler with clip_sample does the same), work in float64
coefficients, and draw step noise for the whole batch from the run's CPU generator; every schedule
written before solvers could be chosen (format versions 1 and 2) ran exactly these, and must keep
sampling bit for bit. tests/test_samplers.py holds them equal to diffusers' DDIMScheduler and
DDPMScheduler step by step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, ancestral: bool, eta: float,
              z: torch.Tensor | None) -> torch.Tensor:
    """Return x at the previous timestep from x_t and the predicted noise (x0 clipped to [-1, 1]):
    DDIM with `eta`, or with `ancestral` the DDPM posterior q(x_prev | x_t, x0) over the respaced chain."""
    x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp_(-1, 1)
    if a_prev >= 1.0:
        return x0
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clipped x0
    if ancestral:
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        return mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return x_prev + sigma * z if sigma > 0 else x_prev


class DDIMRun:
    """One sampling run of DDIM or DDPM: no state besides the noise schedule and the timesteps."""

    init_noise_sigma = 1.0

    def __init__(self, solver, noise_schedule, timesteps: Sequence[int]):
        self.ancestral, self.eta, self.stochastic = solver.name == "ddpm", solver.eta, solver.stochastic
        abar = noise_schedule.alphas_cumprod
        self.a = [float(abar[t]) for t in timesteps] + [1.0]  # the last step lands on x0

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The network sees the latent itself."""
        return x

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the latent after step i; step noise is drawn on the CPU for the whole batch."""
        a_t, a_prev = self.a[i], self.a[i + 1]
        if self.stochastic and generator is None:
            raise ValueError("a stochastic solver needs a generator")
        z = torch.randn(x.shape, generator=generator).to(x.device) if self.stochastic and a_prev < 1.0 else None
        return ddim_step(x, eps, a_t, a_prev, self.ancestral, self.eta, z)
