"""Noise schedule and the DDIM / ancestral DDPM samplers that run a schedule (one subnet per step).

A sampler takes one subnet per sampling step (noisiest step first) and a denoiser for each subnet. It
loops over steps outermost and over chunks of the batch inside, so the noise drawn for image i never
depends on the chunk size: the same seed gives the same images at any batch size.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from .config import DiffusionConfig
from .errors import DDSMError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


class NoiseSchedule:
    """The forward process q(x_t | x_0): betas and cumulative alphas for t = 0 .. T-1."""

    def __init__(self, cfg: DiffusionConfig):
        self.timesteps = cfg.timesteps
        if cfg.beta_schedule == "linear":
            betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=np.float64)
        else:  # cosine (Nichol & Dhariwal 2021)
            s, steps = 0.008, np.arange(cfg.timesteps + 1, dtype=np.float64) / cfg.timesteps
            f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # float64 for exact sampler coefficients

    def log_snr(self) -> np.ndarray:
        """Return log(abar_t / (1 - abar_t)) for t = 0 .. T-1 (float64, falling with t)."""
        return log_snr(self.alphas_cumprod)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Return x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise for per-image timesteps t."""
        a = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def log_snr(alphas_cumprod) -> np.ndarray:
    """Return log SNR = log(abar / (1 - abar)) of cumulative alphas (float64), as one array."""
    a = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    return np.log(a) - np.log1p(-a)


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Return `steps` evenly spaced timesteps from T-1 down to 0 (noisiest first)."""
    if not 1 <= steps <= num_timesteps:
        raise DDSMError(f"sampler steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return [int(v) for v in np.round(np.linspace(num_timesteps - 1, 0, steps))]


def _step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, sampler: str, eta: float,
          z: torch.Tensor | None) -> torch.Tensor:
    """Return x at the previous timestep from x_t and the predicted noise (x0 clipped to [-1, 1])."""
    x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp_(-1, 1)
    if a_prev >= 1.0:
        return x0
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clipped x0
    if sampler == "ddpm":
        # ancestral step: mean and variance of the posterior q(x_prev | x_t, x0) over the respaced chain
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        return mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return x_prev + sigma * z if sigma > 0 else x_prev


def check_schedule(subnets: Sequence[Hashable], timesteps: Sequence[int]) -> None:
    """Raise DDSMError unless there is exactly one subnet per sampling step."""
    if len(subnets) != len(timesteps):
        raise DDSMError(f"the schedule has {len(subnets)} subnets but the sampler runs {len(timesteps)} steps")


@torch.inference_mode()
def sample_loop(denoisers: Mapping[Hashable, Denoiser], schedule: NoiseSchedule, subnets: Sequence[Hashable],
                timesteps: Sequence[int], x: torch.Tensor, *, sampler: str = "ddim", eta: float = 0.0,
                generator: torch.Generator | None = None, batch_size: int = 500,
                callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0) -> torch.Tensor:
    """Return images in [-1, 1] after denoising `x` along `timesteps` with one subnet per step.

    `x` is pure noise, or with `start` = k the latent after the first k steps (resuming a shared
    prefix). Step noise (DDPM, or DDIM with eta > 0) is drawn on the CPU from `generator` for the
    whole batch, so results do not depend on `batch_size` or on the device's random number generator.
    `callback(i, x)` sees the latent after step i.
    """
    if sampler not in SAMPLERS:
        raise DDSMError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    check_schedule(subnets, timesteps)
    stochastic = sampler == "ddpm" or eta > 0
    if stochastic and generator is None:
        raise ValueError("a stochastic sampler needs a generator")
    abar = schedule.alphas_cumprod
    for i in range(start, len(timesteps)):
        t, net = timesteps[i], denoisers[subnets[i]]
        a_t = float(abar[t])
        a_prev = float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        t_tensor = torch.tensor(t, device=x.device)
        chunks = x.split(batch_size)
        # one chunk: no concatenation copy in the sampling loop
        eps = net(x, t_tensor) if len(chunks) == 1 else torch.cat([net(c, t_tensor) for c in chunks])
        z = torch.randn(x.shape, generator=generator).to(x.device) if stochastic and a_prev < 1.0 else None
        x = _step(x, eps, a_t, a_prev, sampler, eta, z)
        if callback is not None:
            callback(i, x)
    return x
