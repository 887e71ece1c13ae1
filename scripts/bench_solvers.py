"""Solvers, step counts and feature caching against the searched schedules, on one backbone, in one run.

On the same held-out noise (n images of the seed set "heldout"), FID against the FLOPs share (of full
size under DDIM over 20 steps) and against wall-clock seconds per image (all points timed side by
side: one batch, median of 3 turns, each subnet on its faster backend here) for:
- full size under DDIM, DPM-Solver++ and UniPC at each number of steps (`--steps`) on each spacing of
  the config and this project's uniform grid (that of the default reference, 20-step DDIM);
- full size with uniform feature caching (every 2, 3 and 5 steps at the config's first cache branch)
  under DDIM at 20 steps on the uniform grid;
- the front of today's width-only search (20 DDIM steps; the config's axes) and the front of the
  joint search (the config's search: solver x steps x spacing x subnets x caching), both run here with
  the same number of evaluations (population x generations) and re-scored on the held-out noise.
Then: hypervolumes of each front on FLOPs-FID and seconds-FID (one reference point for all: beyond the
worst point of all of them), whether any baseline strictly beats a joint front point at no more
FLOPs, and the targets: the joint export (`export --max-loss 0.05`) against 20-step DDIM full size and
against the cheapest baseline as good, and with `--reference unipc:20` against 20-step UniPC.

    python scripts/bench_solvers.py --config digits --supernet SUPERNET --work WORKDIR
    python scripts/bench_solvers.py --config digits-dit --supernet SUPERNET --work WORKDIR
Run nothing else on the machine meanwhile (timings). Writes OUT.csv (every point), OUT.json (the
figures) and OUT.png (FID against FLOPs and against seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddsm_search.backends.choice import cpu_name
from ddsm_search.checkpoint import load_supernet
from ddsm_search.config import load_config
from ddsm_search.deploy.export import export_schedule
from ddsm_search.evaluation.heldout import Confirmer
from ddsm_search.images import new_figure, save_figure
from ddsm_search.report.tables import front, load_run
from ddsm_search.search.baselines import candidates, time_schedules
from ddsm_search.search.pareto import pareto_mask
from ddsm_search.search.runner import run_search
from ddsm_search.schedule import load_schedule
from ddsm_search.solvers.base import Solver, head_of, spacing_of, timesteps_for
from ddsm_search.space.steps import Step, plan_key


def baseline_keys(supernet, search) -> list[tuple[str, str, str]]:
    """Return (group, label, plan key) of the baselines report and export measure for `search`
    (search.baselines.candidates: full size under each solver at each step count on each spacing, and
    each method family's uniform schedules at full size), the families' ones under DDIM only."""
    out = []
    for label, kind, c in candidates(supernet, search):
        if kind == "full size":
            out.append((f"full size, {c.solver.key} {c.spacing}", label, c.key))
        elif c.solver.name == "ddim":
            out.append(("full size, ddim, cached" if kind.startswith("cache") else f"full size, ddim, {kind}", label,
                        c.key))
    return out


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Return the area dominated by `points` (x and y minimised) up to `reference`."""
    pts = points[pareto_mask(points)]
    pts = pts[np.argsort(pts[:, 0])]
    area, best_y = 0.0, reference[1]
    for i, (x, y) in enumerate(pts):
        nxt = pts[i + 1, 0] if i + 1 < len(pts) else reference[0]
        best_y = min(best_y, y)
        area += max(0.0, nxt - x) * max(0.0, reference[1] - best_y)
    return area


def main() -> None:
    """Measure, print and write everything (see the module's docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment (digits, digits-dit) whose search section is the joint search")
    p.add_argument("--supernet", required=True, help="its trained supernet")
    p.add_argument("--work", required=True, help="a folder for the two search runs and the exports")
    p.add_argument("--n", type=int, default=2000, help="held-out images per point (default 2000)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 5, 6, 8, 10, 12, 16, 20])
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpmsolver++", "unipc"])
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--time-batch", type=int, default=250, help="images per timed run (default 250)")
    p.add_argument("--out", help="default: results/reference/bench_solvers_<config>")
    args = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)  # one thread: the numbers of the 2-core machines the figures are quoted for

    cfg = load_config(args.config)
    supernet = load_supernet(args.supernet)
    q = cfg.search
    work = Path(args.work)
    out = Path(args.out or f"results/reference/bench_solvers_{cfg.name}")
    spacings = tuple(dict.fromkeys(("uniform", *q.spacings)))  # uniform: the reference's grid, and this project's
    # the baselines: as report and export measure them, over this benchmark's solvers, steps and intervals
    # at the config's first cache branch
    baseline_search = dataclasses.replace(q, solvers=tuple(args.solvers), step_choices=tuple(args.steps),
                                          spacings=spacings, cache_intervals=tuple(args.intervals),
                                          cache_branches=(q.cache_branches or (1,))[:1])
    reference_search = {"metric": "fid", "batch_size": 500, "sampler": "ddim", "eta": 0.0, "steps": 20,
                        "backend": "auto"}
    print(f"{datetime.date.today()} | {platform.machine()} {cpu_name()} | torch {torch.__version__}, 1 thread | "
          f"{cfg.name} ({cfg.model.kind}), n={args.n} held-out images per point", flush=True)

    # the two searches, the same number of evaluations
    width_only = dataclasses.replace(q, solvers=(), step_choices=(), spacings=(), cache_intervals=(), steps=20,
                                     sampler="ddim", eta=0.0, segments=5)
    runs = {}
    for name, search in (("width-only search", width_only), ("joint search", q)):
        run = work / name.replace(" ", "-")
        began = time.perf_counter()
        run_search(dataclasses.replace(cfg, search=search), args.supernet, run, resume=(run / "run.json").is_file(),
                   progress=False)
        table = load_run(run)
        runs[name] = table
        print(f"{name}: {len(table)} evaluations in {time.perf_counter() - began:.0f} s, "
              f"{int(table['on_front'].sum())} on the front", flush=True)

    # every point on the same held-out noise, scored against 20-step DDIM full size
    confirmer = Confirmer(supernet, reference_search, n=args.n, boundaries=lambda n: set())
    points = baseline_keys(supernet, baseline_search)
    for name, table in runs.items():
        points += [(name, f"{name} {i}", key) for i, key in enumerate(front(table)["schedule"])]
    rows = []
    for group, label, key in points:
        r = confirmer.confirm(key)
        rows.append({"group": group, "label": label, "schedule": key, "gflops": r["gflops"], "fid": r["fid"],
                     "loss": r["loss"]["value"], "loss_low": r["loss"]["low"], "loss_high": r["loss"]["high"]})
        print(f"  {label:28s} {r['gflops']:.4f} GFLOPs  held-out FID {r['fid']:.3f}", flush=True)
    frame = pd.DataFrame(rows)
    full_gflops = confirmer.full_record()["gflops_per_image"]
    frame["flops_share"] = frame["gflops"] / full_gflops
    seconds = time_schedules(supernet, dict(zip(frame["label"], frame["schedule"])), batch=args.time_batch)
    frame["seconds_per_image"] = frame["label"].map(seconds)

    # fronts, hypervolumes and domination
    worst = (frame["flops_share"].max() * 1.05, frame["seconds_per_image"].max() * 1.05, frame["fid"].max() * 1.05)
    summary = {}
    groups = {"baselines (all)": frame[frame["group"].str.startswith("full size")], **{
        name: frame[frame["group"] == name] for name in runs}}
    for name, part in groups.items():
        summary[name] = {
            "hv_flops": hypervolume_2d(part[["flops_share", "fid"]].to_numpy(float), (worst[0], worst[2])),
            "hv_seconds": hypervolume_2d(part[["seconds_per_image", "fid"]].to_numpy(float), (worst[1], worst[2]))}
    joint = frame[frame["group"] == "joint search"]
    base = groups["baselines (all)"]
    # baseline points no joint front point matches at no more FLOPs (the joint front dominates them all when empty)
    beaten = [b["label"] for _, b in base.iterrows()
              if not ((joint["flops_share"] <= b["flops_share"] * (1 + 1e-9)) & (joint["fid"] <= b["fid"])).any()]
    # the targets: exports of the joint run at 20-step DDIM quality, and at 20-step UniPC quality
    exports = {}
    for reference in ("ddim:20", "unipc:20"):
        try:
            path, data = export_schedule(work / "joint-search", None, work / f"export-{reference.replace(':', '-')}.json",
                                         max_loss=0.05, heldout_samples=args.n, reference=reference)
        except Exception as exc:  # a target missed is reported, not hidden
            exports[reference] = {"error": str(exc).splitlines()[0]}
            continue
        speed = data["speed"]
        against_reference = speed["against_default"]
        if reference != "ddim:20":  # the export against the full-size run it was held to, side by side
            T = supernet.config.diffusion.timesteps
            grid = timesteps_for(T, 20, "uniform")  # --reference runs on the uniform grid
            ref_key = plan_key([Step(s) for s in supernet.step_subnets([supernet.model.full] * 20, grid)],
                               head_of(Solver("unipc"), grid, "uniform"))
            schedule = load_schedule(path, supernet)
            mine = plan_key(schedule.step_keys(), head_of(schedule.solver, schedule.timesteps,
                                                          spacing_of(schedule.timesteps, T)))
            timed = time_schedules(supernet, {"export": mine, "reference": ref_key}, batch=args.time_batch)
            against_reference = timed["reference"] / timed["export"]
        exports[reference] = {"solver": Solver(**data["solver"]).key, "steps": len(data["steps"]),
                              "flops_share": data["flops_share"],
                              "heldout_fid": data["quality"]["heldout"]["fid"], "loss": data["quality"]["loss"],
                              "against_ddim20": speed["against_default"], "against_reference": against_reference,
                              "against_cheapest_baseline_as_good": speed["against_baseline"],
                              "baseline": speed["baseline"]["label"] if speed["baseline"] else None}

    # print, write
    pd.set_option("display.width", 200)
    shown = frame[["group", "label", "flops_share", "seconds_per_image", "fid", "loss_high"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for name, s in summary.items():
        print(f"hypervolume {name}: FLOPs-FID {s['hv_flops']:.4f}, seconds-FID {s['hv_seconds'] * 1e3:.4f} (x1e-3)")
    print(f"baseline points no joint front point matches at no more FLOPs: {beaten if beaten else 'none'}")
    for reference, e in exports.items():
        print(f"export at --max-loss 0.05 against {reference}: {json.dumps(e)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out.with_suffix(".csv"), index=False)
    figures = {"date": str(datetime.date.today()), "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
               "config": cfg.name, "n": args.n, "time_batch": args.time_batch, "hypervolume": summary,
               "beaten": beaten, "exports": exports, "seconds": time.perf_counter() - started}
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1, default=float) + "\n")
    fig = new_figure(12, 4.6)
    axes = fig.subplots(1, 2)
    for ax, x, label in ((axes[0], "flops_share", "FLOPs share of 20-step DDIM full size"),
                         (axes[1], "seconds_per_image", "seconds per image (this machine)")):
        for k, (group, part) in enumerate(frame.groupby("group", sort=False)):
            part = part.sort_values(x)
            style = dict(marker="o", ms=4, lw=2.2) if "search" in group else dict(marker="s", ms=3, lw=1, ls="--")
            ax.plot(part[x], part["fid"], color=f"C{k}", label=group, **style)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out FID")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{cfg.name}: held-out FID (n={args.n}) | {cpu_name()}, 1 thread, {datetime.date.today()}", fontsize=9)
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.json')}, {out.with_suffix('.png')} in "
          f"{time.perf_counter() - started:.0f} s")
    if not math.isfinite(frame["fid"].sum()):
        raise SystemExit("some FID is not finite")


if __name__ == "__main__":
    main()
