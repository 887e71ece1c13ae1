"""Search benchmark, side by side in one run at the same budget of asks (generations x population).

--compare algorithms (the default on a one-axis supernet):
- hypervolume reached by NSGA-II, nevergrad and random search (one common reference point);
- the share of denoising work saved by the prefix cache and by deduplication;
- evaluations per minute with 1 and 2 Ray workers (the same NSGA-II search both times).

--compare axes (the default on a supernet with several axes, e.g. the DiT's width and depth):
- NSGA-II over every axis against NSGA-II over each axis alone (the others at full size), at the same
  number of asks: hypervolume (one common reference point), front size, evaluations;
- each search's best schedule within --at of the FLOPs, re-scored on --heldout held-out images beside
  full size on the same noise (the loss and its 95% interval), so the comparison is not the
  search's own noise.

    python scripts/bench_search.py --supernet results/digits
    python scripts/bench_search.py --config search_spaces/digits-dit.yaml --supernet results/digits-dit
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ddsm_search.checkpoint import load_supernet
from ddsm_search.config import load_config
from ddsm_search.errors import DDSMError
from ddsm_search.search.pareto import front_of, hypervolume
from ddsm_search.search.results import read_evaluations
from ddsm_search.search.runner import run_search


def _run(cfg, supernet, out: Path, reuse: bool = False, **search) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Run one search into `out` (or, with `reuse`, read the finished one there); return its tables and seconds."""
    started = time.perf_counter()
    if not (reuse and (out / "generations.csv").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        run_search(replace(cfg, search=replace(cfg.search, **search)), supernet, out, progress=False)
    seconds = time.perf_counter() - started
    return read_evaluations(out / "evaluations.csv"), pd.read_csv(out / "generations.csv"), seconds


def main() -> None:
    """Run the searches and print the three tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="search_spaces/digits.yaml")
    parser.add_argument("--supernet", default="results/digits")
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--compare", choices=["algorithms", "axes"],
                        help="default: axes on a supernet with several axes, else algorithms")
    parser.add_argument("--at", default="50%", help="with --compare axes: the FLOPs budget of the held-out check")
    parser.add_argument("--heldout", type=int, default=1000, help="with --compare axes: held-out images")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of searching again")
    args = parser.parse_args()

    cfg = load_config(args.config)
    base = dict(generations=args.generations, population=args.population, samples=args.samples, steps=args.steps,
                segments=args.segments, budget=None)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-search-"))
    axes = load_supernet(args.supernet).model.space.names
    compare = args.compare or ("axes" if len(axes) > 1 else "algorithms")
    print(f"{datetime.date.today()} | {platform.machine()} | {cfg.name}: {args.generations} generations x "
          f"{args.population}, {args.samples} samples, {args.steps} steps in {args.segments} segments")
    if compare == "axes":
        compare_axes(cfg, args, base, root, axes)
    else:
        compare_algorithms(cfg, args, base, root)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


def compare_axes(cfg, args, base: dict, root: Path, axes: tuple[str, ...]) -> None:
    """Search every axis together and each alone at the same asks; print hypervolume and held-out quality."""
    from ddsm_search.evaluation.heldout import Confirmer
    from ddsm_search.report.tables import load_run, pick, row_subnets, run_info

    metric = cfg.search.metric
    plans = {" x ".join(axes): list(axes), **{f"{a} only": [a] for a in axes}}
    runs = {name: _run(cfg, args.supernet, root / name.replace(" ", "_"), args.reuse, algorithm="nsga2", workers=0,
                       axes=tuple(searched), **base) for name, searched in plans.items()}
    everything = pd.concat([t for t, _, _ in runs.values()])
    worst = float(everything[metric].max())
    reference = (1.05, worst + 0.1 * max(abs(worst), 1e-12))
    supernet = load_supernet(args.supernet)
    first = root / next(iter(plans)).replace(" ", "_")
    confirmer = Confirmer(supernet, run_info(first)["search"], n=args.heldout,
                          boundaries=[start for start, _ in run_info(first)["segments"][1:]])
    full = confirmer.full_record()
    rows = []
    for name, (table, gens, seconds) in runs.items():
        run_table = load_run(root / name.replace(" ", "_"))
        front = front_of(table, metric, args.samples)
        row = {"searched": name, "asked": int(gens["asked"].sum()), "evaluated": len(table),
               "hypervolume": round(hypervolume(front, reference, metric), 4), "front size": len(front),
               f"best {metric.upper()}": round(float(table[metric].min()), 3), "seconds": round(seconds, 1)}
        try:
            chosen = pick(run_table, args.at, metric)
        except DDSMError as exc:  # this axis alone cannot go that low (e.g. depths >= half the blocks)
            row[f"pick within {args.at}"] = f"none: {exc}"
            rows.append(row)
            continue
        held = confirmer.confirm(row_subnets(chosen))
        row.update({f"pick within {args.at}": chosen["schedule"], "its flops share": f"{chosen['flops_share']:.0%}",
                    f"search {metric.upper()}": round(float(chosen[metric]), 3),
                    f"held-out {metric.upper()}": round(float(held[metric]), 3),
                    "loss vs full [95%]": f"{held['loss']['value']:+.3f} [{held['loss']['low']:+.3f}, "
                                          f"{held['loss']['high']:+.3f}]"})
        rows.append(row)
    print(f"\naxes searched (NSGA-II, in-process; common hypervolume reference (flops share {reference[0]}, "
          f"{metric.upper()} {reference[1]:.3f}); held-out: n={args.heldout}, full size "
          f"{metric.upper()} {float(full[metric]):.3f}):")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        print(pd.DataFrame(rows).to_string(index=False))


def compare_algorithms(cfg, args, base: dict, root: Path) -> None:
    """Compare NSGA-II, nevergrad and random search, then Ray throughput with 1 and 2 workers."""
    metric = cfg.search.metric

    runs = {name: _run(cfg, args.supernet, root / name, algorithm=name, workers=0, **base)
            for name in ("nsga2", "nevergrad", "random")}
    everything = pd.concat([t for t, _, _ in runs.values()])
    reference = (1.05, 1.1 * float(everything[metric].max()))
    rows = []
    for name, (table, gens, seconds) in runs.items():
        steps_total = table["steps_run"].sum() + table["steps_saved"].sum()
        asked_steps = gens["asked"].sum() * args.steps
        dedup_steps = gens["answered_from_table"].sum() * args.steps
        rows.append({"algorithm": name, "asked": int(gens["asked"].sum()), "evaluated": len(table),
                     "hypervolume": round(hypervolume(front_of(table, metric, args.samples), reference, metric), 4),
                     f"best {metric.upper()}": round(table[metric].min(), 3),
                     "front size": len(front_of(table, metric, args.samples)),
                     "prefix cache saved": f"{table['steps_saved'].sum() / steps_total:.0%}",
                     "dedup saved": f"{dedup_steps / asked_steps:.0%}",
                     "denoising steps run": int(table["steps_run"].sum()), "of asked": int(asked_steps),
                     "seconds": round(seconds, 1)})
    print("\nalgorithms (in-process evaluation, common hypervolume reference "
          f"(flops share {reference[0]}, {metric.upper()} {reference[1]:.2f})):")
    print(pd.DataFrame(rows).to_string(index=False))

    speed = []
    for workers in (1, 2):
        table, gens, seconds = _run(cfg, args.supernet, root / f"ray{workers}", algorithm="nsga2", workers=workers, **base)
        speed.append({"Ray workers": workers, "evaluations": len(table), "seconds (incl. Ray start)": round(seconds, 1),
                      "evaluations/min": round(60 * len(table) / seconds, 1),
                      "evaluations/min (search loop only)": round(60 * len(table) / gens["seconds"].sum(), 1)})
    print("\nthroughput (NSGA-II, the same search with 1 and 2 Ray workers):")
    print(pd.DataFrame(speed).to_string(index=False))


if __name__ == "__main__":
    main()
