"""Generate images from a supernet with a width schedule, each width run as a static exported subnet."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import DiffusionConfig
from .diffusion import NoiseSchedule, check_schedule, sample_loop, sampling_timesteps
from .errors import DDSMError
from .nn.unet import SlimUNet


def resolve_device(device: str) -> str:
    """Return 'cuda' or 'cpu' for 'auto' | 'cpu' | 'cuda', or raise DDSMError if CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DDSMError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise DDSMError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device


def make_denoisers(model: SlimUNet, widths: Sequence[float], device: str) -> dict[float, torch.nn.Module]:
    """Return one static subnet per distinct width, in eval mode on `device`.

    Exported subnets hold contiguous, already-sliced weights, so sampling pays no slicing cost and a
    smaller width is genuinely cheaper.
    """
    return {w: model.export(w).to(device).eval() for w in sorted({model.check_width(w) for w in widths})}


def generate(model: SlimUNet, diffusion: DiffusionConfig, widths: Sequence[float], *, n: int, seed: int,
             sampler: str = "ddim", eta: float = 0.0, batch_size: int = 500, device: str = "cpu",
             progress: bool = False, denoisers: dict | None = None) -> torch.Tensor:
    """Return `n` images in [-1, 1] (CPU tensor) sampled with one width per step from the seed's noise."""
    if n < 1:
        raise DDSMError(f"the number of images must be at least 1, got {n}")
    timesteps = sampling_timesteps(diffusion.timesteps, len(widths))
    check_schedule(widths, timesteps)
    denoisers = denoisers if denoisers is not None else make_denoisers(model, widths, device)
    widths = [model.check_width(w) for w in widths]
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same images on any device
    x = torch.randn((n, *model.image_shape), generator=generator).to(device)
    bar = tqdm(total=len(widths), desc="sampling", unit="step", disable=not progress, leave=False)
    out = sample_loop(denoisers, NoiseSchedule(diffusion), widths, timesteps, x, sampler=sampler, eta=eta,
                      generator=generator, batch_size=batch_size, callback=lambda i, _: bar.update(1))
    bar.close()
    return out.cpu()
