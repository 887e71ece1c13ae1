"""Generate images with a plan (sampling.plan.Plan): one callable per step, each subnet run as a static
exported network, from a named seed's noise, resuming shared prefixes from a cache; and what its dynamic
steps executed."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion import sample_loop
from ..errors import DDSMError
from ..space.steps import ExecutedRecord


class PrefixCache:
    """Latents after the first k steps of a schedule, keyed by its solver, its timesteps and those k
    steps, for one (supernet, n, seed) setup.

    Two schedules with the same solver and timesteps that start with the same steps, run from the same
    noise (common random numbers), pass through identical latents, so a later schedule can resume from
    the longest shared prefix. The solver's run (a multistep solver's history), the generator's state,
    the features steps kept for later ones (feature caching) and what dynamic steps executed are
    stored with the latent, so every solver and every cached step resumes exactly.
    Entries are kept at step boundaries only (`boundaries`: the same for every number of steps, or a
    function of it), least recently used first out beyond `max_bytes`.
    """

    def __init__(self, boundaries, max_bytes: int = 512 << 20):
        self.boundaries = boundaries if callable(boundaries) else (lambda n, kept=frozenset(boundaries): kept)
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()
        self.nbytes = 0
        self.steps_run = 0
        self.steps_saved = 0

    def longest(self, setup: tuple, steps: Sequence) -> tuple[int, tuple | None]:
        """Return (k, (latent, generator state, what the record held of those steps, the solver's run,
        the steps' kept state))
        for the longest cached prefix of `steps` under `setup` (a plan's cache_key), or (0, None)."""
        for k in sorted(self.boundaries(len(steps)), reverse=True):
            key = (setup, tuple(steps[:k]))
            if 0 < k < len(steps) and key in self.entries:
                self.entries.move_to_end(key)
                return k, self.entries[key]
        return 0, None

    def store(self, setup: tuple, steps: Sequence, k: int, x: torch.Tensor, state: torch.Tensor, record=None,
              run=None, kept: dict | None = None) -> None:
        """Keep the latent after the first `k` steps, if `k` is a boundary, with copies of the solver's
        `run` and of what steps `kept` for later ones (cached features), and what `record` holds of
        those steps (so a run resumed from it accounts for them)."""
        key = (setup, tuple(steps[:k]))
        if k not in self.boundaries(len(steps)) or key in self.entries:
            return
        x = x.detach().to("cpu", copy=True)
        kept = copy.deepcopy(kept or {})
        self.entries[key] = (x, state, record.prefix(k) if record is not None else {}, copy.deepcopy(run), kept)
        self.nbytes += x.nbytes + _nbytes(kept)
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, (old, *_, old_kept) = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes + _nbytes(old_kept)


def _nbytes(kept: dict) -> int:
    """Return the bytes of the tensors in a run's kept state (nested dicts, lists and tuples)."""
    if isinstance(kept, torch.Tensor):
        return kept.nbytes
    if isinstance(kept, dict):
        return sum(_nbytes(v) for v in kept.values())
    if isinstance(kept, (list, tuple)):
        return sum(_nbytes(v) for v in kept)
    return 0


def generate(plan, *, n: int, seed: int, batch_size: int = 500, progress: bool = False,
             cache: PrefixCache | None = None, record: ExecutedRecord | None = None,
             generator: torch.Generator | None = None, desc: str = "sampling") -> torch.Tensor:
    """Return `n` images in [-1, 1] (CPU tensor) sampled with `plan` from the seed's noise.

    `progress` shows a bar over the steps, labelled `desc`. `record` receives what dynamic steps executed per image. A CPU `generator` given replaces the
    seed's (the noise is drawn from it as it stands, then the sampler's step noise).
    """
    if n < 1:
        raise DDSMError(f"the number of images must be at least 1, got {n}")
    supernet, device = plan.supernet, plan.runtime.device
    steps = list(plan.steps)
    if record is None and plan.dynamic:  # so that cached prefixes carry what steps executed
        record = ExecutedRecord()
    if generator is None:
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same images on any device
    elif generator.device.type != "cpu":
        raise DDSMError(f"the generator must be a CPU generator (the same images on any device), not "
                        f"{generator.device}")
    x = torch.randn((n, *supernet.model.image_shape), generator=generator)
    run, start, kept = plan.run(), 0, {}
    if run.init_noise_sigma != 1.0:  # a sigma-space solver (Euler) starts from scaled noise
        x = x * run.init_noise_sigma
    if cache is not None:
        start, hit = cache.longest(plan.cache_key, steps)
        if hit is not None:
            x, state, done, run, kept = hit
            generator.set_state(state)
            run, kept = copy.deepcopy(run), copy.deepcopy(kept)  # the cache keeps its own for the next schedule
            if record is not None:
                record.restore(done)
        cache.steps_saved += start
        cache.steps_run += len(steps) - start
    bar = tqdm(total=len(steps), initial=start, desc=desc, unit="step", disable=not progress, leave=False)
    denoisers = plan.runtime.denoisers

    def after_step(i: int, latent: torch.Tensor) -> None:
        bar.update(1)
        drain = getattr(denoisers[steps[i]], "drain", None)
        if drain is not None:  # a dynamic step: what each image executed
            flops, stats = drain()
            if record is not None:
                record.add(i, flops, stats)
        if cache is not None:
            cache.store(plan.cache_key, steps, i + 1, latent, generator.get_state(), record, run, kept)

    out = sample_loop(denoisers, steps, list(plan.timesteps), x.to(device), run, generator=generator,
                      batch_size=batch_size, callback=after_step, start=start, state=kept)
    bar.close()
    return out.cpu()


def executed_summary(plan, record: ExecutedRecord, n: int) -> dict:
    """Return what a plan executed per image over a sampling run of n images whose dynamic steps wrote
    `record`: FLOPs per image (mean, sd, min, max), each recorded figure per step (e.g. depth_per_step:
    mean, sd) and `per_image` (the FLOPs tensor)."""
    flops = record.per_image(plan.static_flops(), n)
    out = {"flops_per_image": {"mean": float(flops.mean()), "sd": float(flops.std(unbiased=False)),
                               "min": float(flops.min()), "max": float(flops.max()), "images": n}}
    for stat in record.stat_names():
        out[f"{stat}_per_step"] = record.per_step(stat, [s.subnet.get(stat, 0) for s in plan.steps], n)
    out["per_image"] = flops
    return out


def describe_executed(flops: torch.Tensor, full: float) -> str:
    """Return 'mean +/- sd GFLOPs per image (share of full size)' for executed FLOPs."""
    return (f"{flops.mean() / 1e9:.4f} +/- {flops.std(unbiased=False) / 1e9:.4f} GFLOPs executed per image "
            f"({float(flops.mean()) / full:.0%} of full size)")


