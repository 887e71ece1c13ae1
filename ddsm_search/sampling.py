"""Generate images from a supernet with a schedule (one subnet per step), each subnet run as a static
exported network."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import DiffusionConfig
from .diffusion import NoiseSchedule, check_schedule, sample_loop, sampling_timesteps
from .errors import DDSMError
from .backbones import SlimModel
from .subnet import Subnet


def resolve_device(device: str) -> str:
    """Return 'cuda' or 'cpu' for 'auto' | 'cpu' | 'cuda', or raise DDSMError if CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DDSMError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise DDSMError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device


def make_denoisers(model: SlimModel, subnets: Sequence, device: str, backend: str | dict = "torch",
                   batch_size: int | None = None) -> dict:
    """Return one denoiser per distinct subnet: its static network, in eval mode on `device`, run on
    `backend` (torch | fused | auto: the faster here at `batch_size` images, see backends.choice; or
    {subnet key: backend}, a choice made before, e.g. by a search's driver for all its workers).

    Exported subnets hold contiguous, already-sliced weights (and only the blocks they run), so
    sampling pays no slicing cost and a smaller subnet is genuinely cheaper.
    """
    from .backends.choice import choose

    distinct = dict.fromkeys(model.check_subnet(s) for s in subnets)
    nets = {s: model.export(s).to(device).eval() for s in distinct}
    if isinstance(backend, dict):
        from .backends import wrap

        return {s: wrap(net, backend.get(s.key, "torch")) for s, net in nets.items()}
    if backend == "torch":
        return nets
    return choose(nets, model.image_shape, batch_size or 500, backend, device)


class PrefixCache:
    """Latents after the first k steps of a schedule, keyed by those k subnets, for one sampling setup.

    Two schedules that start with the same subnets, run from the same noise (common random numbers),
    pass through identical latents, so a later schedule can resume from the longest shared prefix.
    The generator state is stored too, so stochastic samplers resume exactly as well. Entries are
    kept at the given step boundaries only, least recently used first out beyond `max_bytes`.
    """

    def __init__(self, boundaries: Sequence[int], max_bytes: int = 512 << 20):
        self.boundaries = set(int(b) for b in boundaries)
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.steps_run = 0
        self.steps_saved = 0

    def longest(self, subnets: Sequence[Subnet]) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """Return (k, (latent, generator state)) for the longest cached prefix of `subnets`, or (0, None)."""
        for k in sorted(self.boundaries, reverse=True):
            key = tuple(subnets[:k])
            if k < len(subnets) and key in self.entries:
                self.entries.move_to_end(key)
                return k, self.entries[key]
        return 0, None

    def store(self, subnets: Sequence[Subnet], k: int, x: torch.Tensor, state: torch.Tensor) -> None:
        """Keep the latent after the first `k` steps of `subnets`, if `k` is a boundary."""
        key = tuple(subnets[:k])
        if k not in self.boundaries or key in self.entries:
            return
        x = x.detach().to("cpu", copy=True)
        self.entries[key] = (x, state)
        self.nbytes += x.nbytes
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, (old, _) = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes


def generate(model: SlimModel, diffusion: DiffusionConfig, subnets: Sequence, *, n: int, seed: int,
             sampler: str = "ddim", eta: float = 0.0, batch_size: int = 500, device: str = "cpu",
             progress: bool = False, denoisers: dict | None = None, cache: PrefixCache | None = None,
             backend: str = "torch") -> torch.Tensor:
    """Return `n` images in [-1, 1] (CPU tensor) sampled with one subnet per step from the seed's noise.

    Subnets run on `backend` unless `denoisers` are given. A `cache` must only ever see one (model, n,
    seed, sampler, eta, number of steps) setup.
    """
    if n < 1:
        raise DDSMError(f"the number of images must be at least 1, got {n}")
    timesteps = sampling_timesteps(diffusion.timesteps, len(subnets))
    check_schedule(subnets, timesteps)
    subnets = [model.check_subnet(s) for s in subnets]
    if denoisers is None:
        denoisers = make_denoisers(model, subnets, device, backend, min(n, batch_size))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same images on any device
    x = torch.randn((n, *model.image_shape), generator=generator)
    start = 0
    if cache is not None:
        start, hit = cache.longest(subnets)
        if hit is not None:
            x = hit[0]
            generator.set_state(hit[1])
        cache.steps_saved += start
        cache.steps_run += len(subnets) - start
    bar = tqdm(total=len(subnets), initial=start, desc="sampling", unit="step", disable=not progress, leave=False)

    def after_step(i: int, latent: torch.Tensor) -> None:
        bar.update(1)
        if cache is not None:
            cache.store(subnets, i + 1, latent, generator.get_state())

    out = sample_loop(denoisers, NoiseSchedule(diffusion), subnets, timesteps, x.to(device), sampler=sampler, eta=eta,
                      generator=generator, batch_size=batch_size, callback=after_step, start=start)
    bar.close()
    return out.cpu()


def time_against_full(model: SlimModel, diffusion: DiffusionConfig, subnets: Sequence, *, n: int, seed: int,
                      sampler: str = "ddim", eta: float = 0.0, batch_size: int = 500, device: str = "cpu",
                      progress: bool = False, backend: str = "auto",
                      repeats: int = 3) -> tuple[torch.Tensor, float, float, dict]:
    """Return (the schedule's images, its seconds, full size's seconds, {subnet: the backend it ran on})
    for the same batch and noise, each time the median of `repeats` runs, schedule and full size taking
    turns (a single pair of runs on a shared 2-core machine gave speed-ups from 1.26x to 1.65x).

    With backend "auto" each subnet runs on the faster backend on this machine, measured first, so
    full size's time is that of the fastest full-size path. Subnets are exported and each warmed up
    first, so both timings are of sampling alone.
    """
    import statistics

    from .backends import backend_of

    if repeats < 1:
        raise DDSMError(f"repeats must be at least 1, got {repeats}")
    subnets = [model.check_subnet(s) for s in subnets]
    full = [model.full] * len(subnets)
    denoisers = make_denoisers(model, subnets + full, device, backend, min(n, batch_size))
    paths = {s: backend_of(d) for s, d in denoisers.items()}
    for s in denoisers:  # warm-up: allocation and kernel choice are not sampling speed
        generate(model, diffusion, [s], n=min(n, batch_size), seed=seed, batch_size=batch_size, device=device,
                 denoisers=denoisers)
    images, seconds = None, {"schedule": [], "full": []}
    for i in range(repeats):
        for name, plan in (("schedule", subnets), ("full", full)):
            started = time.perf_counter()
            out = generate(model, diffusion, plan, n=n, seed=seed, sampler=sampler, eta=eta, batch_size=batch_size,
                           device=device, progress=progress and i == 0, denoisers=denoisers)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
            if name == "schedule" and images is None:
                images = out
    return images, statistics.median(seconds["schedule"]), statistics.median(seconds["full"]), paths
