"""How fast plans sample, side by side: the same batch and noise, taking turns, median of a few."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from ..errors import DDSMError
from ..space.steps import ExecutedRecord
from .generation import generate


def time_plans(plans: dict, *, n: int, seed: int, batch_size: int = 500, progress: bool = False, repeats: int = 3,
               record: ExecutedRecord | None = None, desc: str = "timing") -> tuple[dict, dict, dict]:
    """Return ({name: median seconds}, {name: images of its first timed run}, {step key: the backend it
    ran on}) for `plans` ({name: Plan}), all sampling the same batch and noise, taking turns run by run
    (a single pair of runs on a shared 2-core machine gave speed-ups from 1.26x to 1.65x).

    Make the plans on a runtime with backend "auto" to run each subnet on the faster backend here, so
    that each plan's time is that of its fastest path. Each plan samples once untimed first (allocation
    and kernel choice are not sampling speed). `record` gets what the dynamic steps of the first plan
    executed in its first timed run.
    """
    if repeats < 1:
        raise DDSMError(f"repeats must be at least 1, got {repeats}")
    if not plans:
        return {}, {}, {}
    first = next(iter(plans))
    devices = {p.runtime.device for p in plans.values()}
    with torch.inference_mode():  # warm-up
        for plan in plans.values():
            generate(plan, n=min(n, batch_size), seed=seed, batch_size=batch_size)
    paths = {}
    for plan in plans.values():
        paths.update({s.key: plan.runtime.backends()[s.key] for s in plan.steps})
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    images = {}
    # a bar over the timed runs, updated between them: nothing of it inside a timing
    bar = tqdm(total=len(plans) * repeats, desc=desc, unit="run", disable=not progress, leave=False)
    for i in range(repeats):
        for name, plan in plans.items():
            mine = record if name == first and i == 0 else None
            started = time.perf_counter()
            out = generate(plan, n=n, seed=seed, batch_size=batch_size, record=mine)
            if "cuda" in devices:
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
            bar.update(1)
            images.setdefault(name, out)
    bar.close()
    return {name: statistics.median(v) for name, v in seconds.items()}, images, paths


def time_against_full(plan, *, n: int, seed: int, batch_size: int = 500, progress: bool = False,
                      repeats: int = 3, record: ExecutedRecord | None = None,
                      full=None) -> tuple[torch.Tensor, float, float, dict]:
    """Return (the plan's images, its seconds, full size's seconds, {step key: the backend it ran on})
    for the same batch and noise (`time_plans`); `full`: the full-size plan to compare with (default:
    full size under the plan's own solver and timesteps)."""
    seconds, images, paths = time_plans({"schedule": plan, "full": full or plan.full()}, n=n, seed=seed,
                                        batch_size=batch_size, progress=progress, repeats=repeats, record=record,
                                        desc="timing against full size")
    return images["schedule"], seconds["schedule"], seconds["full"], paths
