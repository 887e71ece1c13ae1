"""The whole pipeline on the embedded digits (or any experiment): train, search, report, export the
cheapest schedule that keeps full size's quality (confirmed on held-out noise), sample with it against
full size."""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import META, read_meta
from .config import ExperimentConfig, load_config, parse_budget
from .errors import DDSMError


DEFAULT_CONFIG = "digits"  # the shipped experiment quickstart runs unless given another


def default_config() -> ExperimentConfig:
    """Return the shipped digits experiment (`ddsm-search configs show digits`)."""
    return load_config(DEFAULT_CONFIG)


MAX_LOSS = 0.05  # FID above full size's on the same 2,000 held-out images, at 95% confidence
HELDOUT = 2000


def quickstart(out: str | Path = "results/quickstart", *, max_loss: float | None = MAX_LOSS, budget: str | None = None,
               device: str = "cpu", progress: bool = True, config: ExperimentConfig | None = None,
               heldout: int = HELDOUT) -> dict:
    """Run train -> search -> report -> export on digits (or `config`) into `out`; return the figures.

    The export is the cheapest schedule of the front whose held-out FID is within `max_loss` of full
    size's on the same noise at 95% confidence (within `budget` too, if given), timed against the
    default full size and the cheapest baseline as good (deploy.speed).
    """
    from .deploy.export import export_schedule
    from .deploy.speed import describe
    from .report.writer import write_report
    from .search.runner import run_search
    from .solvers.base import Solver
    from .training import train

    if budget is not None:
        parse_budget(budget)  # a bad budget fails now, not after minutes of training
    if max_loss is None and budget is None:
        raise DDSMError("quickstart needs --max-loss, --budget or both")
    if max_loss is not None and not max_loss >= 0:
        raise DDSMError(f"--max-loss must be a number >= 0, got {max_loss}")
    out = Path(out)
    cfg = config or default_config()
    started = time.perf_counter()
    net, run = out / "supernet", out / "search"

    def say(text: str) -> None:
        if progress:
            print(f"[quickstart {time.perf_counter() - started:5.0f} s] {text}", flush=True)

    if (net / META).is_file() and read_meta(net)["step"] >= cfg.train.steps:
        say(f"1/4 supernet already trained in {net}")
    else:
        say(f"1/4 training the {cfg.name} supernet ({cfg.model.kind})")
        train(cfg, net, device=device, resume=(net / META).is_file(), progress=progress)
    say(f"2/4 searching per-step schedules over {searched(cfg.search, cfg.model)}")
    run_search(cfg, net, run, resume=(run / "run.json").is_file(), progress=progress, device=device)
    say("3/4 writing the report")
    write_report(run, budget=budget or "50%", device=device, progress=progress)
    goal = " and ".join(([f"within {cfg.search.metric.upper()} +{max_loss:g} of full size"] if max_loss is not None else [])
                        + ([f"within {budget} of its FLOPs"] if budget is not None else []))
    say(f"4/4 exporting the cheapest schedule {goal}, confirmed on {heldout} held-out images, and timing it "
        "against full size and the baselines")
    path, exported = export_schedule(run, budget, out / "schedule.json", max_loss=max_loss, device=device,
                                     heldout_samples=heldout, progress=progress)
    quality, speed = exported["quality"], exported["speed"]
    m = quality["metric"]  # the run's metric, fid unless the config chose another
    solver, steps = Solver(**exported["solver"]).key, len(exported["steps"])
    figures = {"schedule": str(path), "flops_share": exported["flops_share"], "metric": m,
               "heldout": quality["heldout"][m], "full_size_heldout": quality["full_size_heldout"][m],
               "loss": quality["loss"], "solver": solver, "steps": steps, "speed": speed,
               "speedup": speed["against_default"], "total_seconds": time.perf_counter() - started}
    loss = quality["loss"]
    say(f"done: {path} runs {solver} over {steps} steps at {figures['flops_share']:.0%} of full size's FLOPs; "
        f"held-out {m.upper()} {figures['heldout']:.4g} vs full size {figures['full_size_heldout']:.4g} (loss "
        f"{loss['value']:+.3g}, {loss['confidence']:.0%} interval [{loss['low']:+.3g}, {loss['high']:+.3g}], "
        f"n={loss['samples']}); {describe(speed)}; each subnet on its faster path here: "
        f"{', '.join(f'{s} {p}' for s, p in speed['paths'].items())}")
    return figures


def searched(search, model) -> str:
    """Return what the search chooses, in words: e.g. "solver (ddim, unipc), steps (4-20), spacing
    (trailing, uniform), width, caching (every 2, 3)"."""
    parts = []
    if len(search.solvers) > 1:
        parts.append(f"solver ({', '.join(search.solvers)})")
    if len(search.step_choices) > 1:
        parts.append(f"steps ({min(search.step_choices)}-{max(search.step_choices)})")
    if len(search.spacings) > 1:
        parts.append(f"spacing ({', '.join(search.spacings)})")
    parts += list(search.axes or model.axes())
    if search.cache_intervals:
        parts.append(f"caching (every {', '.join(map(str, search.cache_intervals))})")
    return ", ".join(parts)
