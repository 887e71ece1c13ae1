"""The whole pipeline on the embedded digits: train, search, report, export at 50%, sample against full width."""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import META, read_meta
from .config import ExperimentConfig, load_config, parse_budget
from .errors import DDSMError


def default_config() -> ExperimentConfig:
    """Return the digits experiment: search_spaces/digits.yaml beside the package (an editable install)
    or in the working directory."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "search_spaces" / "digits.yaml").is_file():
            return load_config(candidate / "search_spaces" / "digits.yaml")
    raise DDSMError("quickstart reads search_spaces/digits.yaml: run it from a ddsm-search checkout")


def quickstart(out: str | Path = "results/quickstart", *, budget: str = "50%", device: str = "cpu",
               progress: bool = True, config: ExperimentConfig | None = None, n_speed: int = 1000) -> dict:
    """Run train -> search -> report -> export -> sample on digits (or `config`) into `out`; return the figures."""
    from .export import export_schedule
    from .report_stage import write_report
    from .sampling import time_against_full
    from .schedule import load_schedule
    from .search.runner import run_search
    from .training import train

    parse_budget(budget)  # a bad budget fails now, not after minutes of training
    out = Path(out)
    cfg = config or default_config()
    started = time.perf_counter()
    net, run = out / "supernet", out / "search"

    def say(text: str) -> None:
        if progress:
            print(f"[quickstart {time.perf_counter() - started:5.0f} s] {text}", flush=True)

    if (net / META).is_file() and read_meta(net)["step"] >= cfg.train.steps:
        say(f"1/5 supernet already trained in {net}")
    else:
        say("1/5 training the digits supernet")
        train(cfg, net, device=device, resume=(net / META).is_file(), progress=progress)
    say("2/5 searching per-step width schedules")
    run_search(cfg, net, run, resume=(run / "run.json").is_file(), progress=progress, device=device)
    say("3/5 writing the report")
    write_report(run, budget=budget, device=device, progress=progress)
    say(f"4/5 exporting the best schedule within {budget} of full width (re-checked on held-out noise)")
    path, exported = export_schedule(run, budget, out / "schedule.json", device=device,
                                     heldout_samples=None if config is None else cfg.search.samples)
    say("5/5 sampling with the exported schedule against full width, same batch and noise")
    from .checkpoint import load_supernet

    supernet = load_supernet(net, device)
    schedule = load_schedule(path, supernet)
    _, seconds, full_seconds, paths = time_against_full(supernet.model, supernet.config.diffusion, schedule.widths, n=n_speed,
                                                 seed=0, sampler=schedule.sampler, eta=schedule.eta, device=device)
    quality = exported["quality"]
    m = quality["metric"]  # the run's metric, fid unless the config chose kid
    figures = {"schedule": str(path), "flops_share": exported["flops_share"], "metric": m,
               "heldout": quality["heldout"][m], "full_width_heldout": quality["full_width_heldout"][m],
               "seconds": seconds, "full_width_seconds": full_seconds, "speedup": full_seconds / seconds,
               "paths": {repr(w): p for w, p in paths.items()},
               "total_seconds": time.perf_counter() - started}
    say(f"done: {path} uses {figures['flops_share']:.0%} of full width's FLOPs; held-out {m.upper()} "
        f"{figures['heldout']:.4g} vs full width {figures['full_width_heldout']:.4g}; {n_speed} images in "
        f"{seconds:.1f} s vs {full_seconds:.1f} s at full width ({figures['speedup']:.2f}x faster; each width on its "
        f"faster path here: {', '.join(f'{w} {p}' for w, p in figures['paths'].items())})")
    return figures
