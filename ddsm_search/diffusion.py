"""The noise schedule (betas, cumulative alphas, log-SNR), the uniform timestep grid, and the sampling
loop that runs one denoiser per step under a solver's run (solvers/).

The loop goes over steps outermost and over chunks of the batch inside, so the noise drawn for image i
never depends on the chunk size: the same seed gives the same images at any batch size.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

from .config import DiffusionConfig
from .errors import DDSMError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def check_schedule(subnets: Sequence[Hashable], timesteps: Sequence[int]) -> None:
    """Raise DDSMError unless there is exactly one subnet per sampling step."""
    if len(subnets) != len(timesteps):
        raise DDSMError(f"the schedule has {len(subnets)} subnets but the sampler runs {len(timesteps)} steps")


@torch.inference_mode()
def sample_loop(denoisers: Mapping[Hashable, Denoiser], steps: Sequence[Hashable], timesteps: Sequence[int],
                x: torch.Tensor, run, *, generator: torch.Generator | None = None, batch_size: int = 500,
                callback: Callable[[int, torch.Tensor], None] | None = None, start: int = 0,
                state: dict | None = None) -> torch.Tensor:
    """Return images after denoising `x` along `timesteps` with one denoiser per step and a solver's run
    (solvers.SolverRun: what the network sees, and the update to the next step).

    `x` is the run's initial latent, or with `start` = k the latent after the first k steps (resuming a
    shared prefix, `run` and `state` then as they stood). Step noise is drawn on the CPU from `generator`
    for the whole batch, so results do not depend on `batch_size` or on the device's random number
    generator. A denoiser marked `stateful` (a step that keeps or reuses features of earlier steps) is
    called on the whole batch as `net(x, t, state=, batch_size=)`, `state` being the run's dict it keeps
    them in. `callback(i, x)` sees the latent after step i.
    """
    check_schedule(steps, timesteps)
    state = {} if state is None else state
    for i in range(start, len(timesteps)):
        net = denoisers[steps[i]]
        t_tensor = torch.tensor(timesteps[i], device=x.device)
        inp = run.model_input(x, i)
        chunks = inp.split(batch_size)
        if getattr(net, "stateful", False):
            eps = net(inp, t_tensor, state=state, batch_size=batch_size)
        else:  # one chunk: no concatenation copy in the sampling loop
            eps = net(inp, t_tensor) if len(chunks) == 1 else torch.cat([net(c, t_tensor) for c in chunks])
        x = run.step(i, eps, x, generator)
        if callback is not None:
            callback(i, x)
    return x
