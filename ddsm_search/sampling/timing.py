"""How much faster a plan samples than full size: the same batch and noise, taking turns, median of a few."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from ..errors import DDSMError
from ..space.steps import ExecutedRecord
from .generation import generate


def time_against_full(plan, *, n: int, seed: int, batch_size: int = 500, progress: bool = False,
                      repeats: int = 3, record: ExecutedRecord | None = None) -> tuple[torch.Tensor, float, float, dict]:
    """Return (the plan's images, its seconds, full size's seconds, {step key: the backend it ran on})
    for the same batch and noise, each time the median of `repeats` runs, plan and full size taking
    turns (a single pair of runs on a shared 2-core machine gave speed-ups from 1.26x to 1.65x).

    Make the plan on a runtime with backend "auto" to run each subnet on the faster backend here, so
    that full size's time is that of the fastest full-size path. Every step's callable is warmed up
    first, so both timings are of sampling alone. `record` gets what dynamic steps executed in the
    first timed run.
    """
    if repeats < 1:
        raise DDSMError(f"repeats must be at least 1, got {repeats}")
    full = plan.full()
    runtime, device = plan.runtime, plan.runtime.device
    batch = min(n, batch_size)
    warm = torch.randn((batch, *plan.supernet.model.image_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():  # warm-up: allocation and kernel choice are not sampling speed
        for p in (plan, full):
            for step, t in dict(zip(p.steps, p.timesteps)).items():
                denoiser = runtime.denoisers[step]
                denoiser(warm.to(device), torch.tensor(t, device=device))
                if hasattr(denoiser, "drain"):
                    denoiser.drain()
    backends = runtime.backends()
    paths = {s.key: backends[s.key] for s in dict.fromkeys(plan.steps + full.steps)}
    images, seconds = None, {"schedule": [], "full": []}
    # a bar over the timed runs, updated between them: nothing of it inside a timing
    bar = tqdm(total=2 * repeats, desc="timing against full size", unit="run", disable=not progress, leave=False)
    for i in range(repeats):
        for name, p in (("schedule", plan), ("full", full)):
            mine = record if name == "schedule" and i == 0 else None
            started = time.perf_counter()
            out = generate(p, n=n, seed=seed, batch_size=batch_size, record=mine)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
            bar.update(1)
            if name == "schedule" and images is None:
                images = out
    bar.close()
    return images, statistics.median(seconds["schedule"]), statistics.median(seconds["full"]), paths
