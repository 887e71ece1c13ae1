"""What an exported schedule is worth against what a user has without it: held-out quality and measured
speed against the default full size (the config's sampler over search.steps) and against the cheapest
baseline of the same quality (search.baselines, confirmed on the same held-out noise)."""

from __future__ import annotations

import math

from ..backends.choice import cpu_name
from ..config import SearchConfig
from ..sampling import Runtime, time_plans
from ..search.baselines import TIME_BATCH, candidates


def cheapest_as_good(confirmer, chosen: dict, search: dict, max_loss: float | None, *, progress: bool = False):
    """Return (label, held-out record) of the cheapest baseline as good as the export on held-out noise
    (within `max_loss` of the reference at the confirmer's confidence, as the export was; without one: a
    metric no worse than the export's), trying them cheapest first; (None, None) if none is."""
    from tqdm.auto import tqdm

    net, metric = confirmer.supernet, confirmer.metric
    pool = [(label, c) for label, _, c in candidates(net, SearchConfig(**search))]
    pool.sort(key=lambda item: net.steps_flops(item[1].steps, item[1].timesteps))
    for label, candidate in tqdm(pool, desc="baselines, held out", unit="schedule", disable=not progress,
                                 leave=False):
        record = confirmer.confirm(candidate.key)
        good = (record["loss"]["high"] <= max_loss if max_loss is not None
                else record[metric] <= chosen[metric])
        if good:
            return label, record
    return None, None


def speed_figures(confirmer, chosen: dict, search: dict, max_loss: float | None, *, device: str = "cpu",
                  progress: bool = False) -> dict:
    """Return the export's speed against the default full size and the cheapest baseline as good: seconds
    for one batch of TIME_BATCH images, each plan on its faster backend here, taking turns (median of
    3), and the ratios; with the baseline's held-out record."""
    net = confirmer.supernet
    label, record = cheapest_as_good(confirmer, chosen, search, max_loss, progress=progress)
    runtime = Runtime(net, device=device, backend="auto", batch_size=TIME_BATCH)
    default = confirmer.default  # the search's sampler, as the confirmer reads it
    steps = int(search["steps"])
    plans = {"export": runtime.plan_key(chosen["schedule"]),
             "default": runtime.plan([net.model.full] * steps, solver=default)}
    if record is not None:
        plans["baseline"] = runtime.plan_key(record["schedule"])
    seconds, _, paths = time_plans(plans, n=TIME_BATCH, seed=0, batch_size=TIME_BATCH, progress=progress,
                                   desc="timing the export")
    metric = confirmer.metric
    out = {"images": TIME_BATCH, "cpu": cpu_name(), "device": device, "seconds": seconds, "paths": paths,
           "default": f"full size, {default.key}, {steps} steps",
           "against_default": seconds["default"] / seconds["export"],
           "baseline": None, "against_baseline": None}
    if record is not None:
        out["baseline"] = {"label": label, "schedule": record["schedule"], "gflops_per_image": record["gflops"],
                           metric: _plain(record[metric]), "loss": record["loss"]}
        out["against_baseline"] = seconds["baseline"] / seconds["export"]
    return out


def _plain(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def describe(speed: dict) -> str:
    """Return one clause on the export's measured speed-ups."""
    text = f"{speed['against_default']:.2f}x faster than {speed['default']}"
    if speed["baseline"] is None:
        return text + "; no baseline is as good on held-out noise"
    return (text + f", {speed['against_baseline']:.2f}x faster than the cheapest baseline as good "
            f"({speed['baseline']['label']}) [{speed['images']} images, {speed['cpu']}]")
