"""The report stage: print a run's front and write its plots (front, hypervolume, a chosen schedule)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import parse_budget
from ..errors import DDSMError
from .baselines import compare, format_comparison
from .plots import plot_baselines, plot_front, plot_grids, plot_heldout_front, plot_hypervolume, plot_schedule
from .tables import front, generations, load_run, pick, run_info

FRONT_COLUMNS = ["gflops", "gflops_sd", "flops_share", "fid", "kid", "drift", "samples", "generation", "schedule"]


def format_front(table: pd.DataFrame) -> str:
    """Return the front as a readable text table."""
    shown = front(table)[FRONT_COLUMNS].copy()
    shown["flops_share"] = shown["flops_share"].map("{:.0%}".format)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def cost_note(table: pd.DataFrame) -> str:
    """Return what the run's GFLOPs count: dense, or sparse (a sparse supernet's nonzero weights only)."""
    if table.attrs.get("cost") == "sparse":
        return "sparse FLOPs: nonzero weights under the masks only; dense kernels run the dense FLOPs"
    return "dense FLOPs"


def _against_baselines(run: Path, info: dict, table: pd.DataFrame, net, out: Path, *, device: str, cache_dir,
                       timing: bool, progress: bool, bars: bool) -> list[Path]:
    """Measure the run's baselines, compare the front with them, write the tables and plots; return the
    files written."""
    from ..io import write_atomic
    from ..search.baselines import measure, time_schedules

    metric = info["search"]["metric"]
    base = measure(net.path, info["search"], device=device, cache_dir=cache_dir, known=table, timing=False,
                   progress=bars)
    points = front(table)
    if timing:  # the front and the baselines side by side, in turns, now: one occasion for every ratio
        keys = list(dict.fromkeys([*points["schedule"], *base["schedule"]]))
        seconds = time_schedules(net, dict(zip(keys, keys)), device=device, progress=bars)
        points["seconds_per_image"] = points["schedule"].map(seconds)
        base["seconds_per_image"] = base["schedule"].map(seconds)
    compared = compare(points, base, metric)
    files = [out / "baselines.csv", out / "front_vs_baselines.csv", out / "front_vs_baselines.png"]
    for frame, path in ((base, files[0]), (compared, files[1])):
        text = frame.to_csv(index=False)
        write_atomic(path, lambda tmp, text=text: tmp.write_text(text))
    plot_baselines(points, base, files[2], metric)
    if timing:
        files.append(out / "front_vs_baselines_seconds.png")
        plot_baselines(points, base, files[-1], metric, x="seconds_per_image")
    if progress:
        print(f"the front against {len(base)} baselines (full size per solver and number of steps, and uniform "
              f"caching; {info['search']['samples']} images of the search's seeds):")
        print(format_comparison(compared, metric))
    return files


def write_report(run: str | Path, *, budget: str | None = "50%", device: str = "cpu", n_grid: int = 64,
                 progress: bool = True, supernet: str | Path | None = None, heldout: int | None = None,
                 cache_dir=None, bars: bool | None = None, baselines: bool = True, timing: bool = True) -> list[Path]:
    """Print the front and write report/*.png into the run directory; return the files written.

    `progress` prints the front and what was written; `bars` (default: as `progress`) shows progress
    bars while the grids are sampled and the held-out front is scored. With `baselines`, the run's
    baselines (search.baselines: full size under each solver at each number of steps, uniform caching)
    are measured (kept beside the supernet) and compared with the front, on FLOPs and, with `timing`,
    on seconds per image measured here (the front's schedules timed side by side).

    Everything the report needs is read and checked first (run files, budget, supernet), so a bad
    input writes no plot.
    """
    from ..sampling import Runtime, executed_summary, generate
    from ..search.results import supernet_of_run
    from ..space.steps import ExecutedRecord

    run = Path(run)
    bars = progress if bars is None else bars
    if budget is not None:
        parse_budget(budget)
    info = run_info(run)
    metric = info["search"]["metric"]
    table = load_run(run)
    history = generations(run)
    if not table["fully_evaluated"].any():
        raise DDSMError(f"{run} has no fully evaluated schedule yet; resume the search with --resume")
    out = run / "report"
    chosen = None
    if budget is not None:
        try:
            chosen = pick(table, budget, metric)
        except DDSMError as exc:  # a report is still useful without the budget's schedule
            print(f"(no schedule shown for budget {budget}: {exc})")
    if heldout is not None and heldout < 2:
        raise DDSMError(f"--heldout must be at least 2 images, got {heldout}")
    net = supernet_of_run(run, device, supernet) if chosen is not None or heldout or baselines else None
    paths = [out / "front.png", out / "hypervolume.png"]
    plot_front(table, paths[0], metric, chosen)
    plot_hypervolume(history, paths[1])
    if progress:
        print(f"{len(table)} schedules evaluated, {int(table['on_front'].sum())} on the front ({cost_note(table)}):")
        print(format_front(table))
    if baselines:
        paths += _against_baselines(run, info, table, net, out, device=device, cache_dir=cache_dir, timing=timing,
                                    progress=progress, bars=bars)
    if chosen is not None:
        plan = Runtime(net, device=device).plan_key(chosen["schedule"])
        title = f"best within {budget}: {chosen['gflops']:.3f} GFLOPs ({chosen['flops_share']:.0%}), {metric.upper()} {chosen[metric]:.3f}"
        record = ExecutedRecord()  # what dynamic steps executed, on the same images as the grid
        images = generate(plan, n=n_grid, seed=0, record=record, progress=bars, desc="schedule's grid")
        executed = executed_summary(plan, record, n_grid) if plan.dynamic else None
        if executed is not None:
            title += f"\nexecuted per step over {n_grid} images (mean, sd)"
        paths.append(out / "schedule.png")
        plot_schedule(list(plan.steps), paths[-1], title, net.model.space, executed)
        full = generate(plan.full(), n=n_grid, seed=0, progress=bars, desc="full size's grid")
        paths.append(out / "samples.png")
        plot_grids(images, full, paths[-1], (f"schedule ({chosen['flops_share']:.0%} of the FLOPs)", "full size, same noise"))
    if heldout:
        from .heldout import heldout_front

        checked, rho = heldout_front(run, heldout, device=device, supernet=supernet, progress=bars,
                                     cache_dir=cache_dir)
        paths.append(out / "heldout_front.png")
        plot_heldout_front(checked, paths[-1], rho)
        if progress:
            print(f"the front on held-out noise ({heldout} images; kept in {run / 'heldout.csv'}):")
            print(checked.drop(columns="schedule").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            print(f"Spearman rank correlation between search and held-out {metric.upper()}: {rho:.3f} "
                  f"over {len(checked)} schedules")
    if progress:
        print("plots: " + ", ".join(str(p) for p in paths))
    return paths
