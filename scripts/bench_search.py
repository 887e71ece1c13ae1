"""Search benchmark, side by side in one run at the same budget of asks (generations x population):

- hypervolume reached by NSGA-II, nevergrad and random search (one common reference point);
- the share of denoising work saved by the prefix cache and by deduplication;
- evaluations per minute with 1 and 2 Ray workers (the same NSGA-II search both times).

    python scripts/bench_search.py --supernet results/digits
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

from ddsm_search.config import load_config
from ddsm_search.search.results import front_of, hypervolume
from ddsm_search.search.runner import run_search


def _run(cfg, supernet, out: Path, **search) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_search(replace(cfg, search=replace(cfg.search, **search)), supernet, out, progress=False)
    seconds = time.perf_counter() - started
    return pd.read_csv(out / "evaluations.csv"), pd.read_csv(out / "generations.csv"), seconds


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
    args = parser.parse_args()

    cfg = load_config(args.config)
    base = dict(generations=args.generations, population=args.population, samples=args.samples, steps=args.steps,
                segments=args.segments, budget=None)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-search-"))
    print(f"{datetime.date.today()} | {platform.machine()} | {cfg.name}: {args.generations} generations x "
          f"{args.population}, {args.samples} samples, {args.steps} steps in {args.segments} segments")

    runs = {name: _run(cfg, args.supernet, root / name, algorithm=name, workers=0, **base)
            for name in ("nsga2", "nevergrad", "random")}
    everything = pd.concat([t for t, _, _ in runs.values()])
    reference = (1.05, 1.1 * float(everything["fid"].max()))
    rows = []
    for name, (table, gens, seconds) in runs.items():
        steps_total = table["steps_run"].sum() + table["steps_saved"].sum()
        asked_steps = gens["asked"].sum() * args.steps
        dedup_steps = gens["answered_from_table"].sum() * args.steps
        rows.append({"algorithm": name, "asked": int(gens["asked"].sum()), "evaluated": len(table),
                     "hypervolume": round(hypervolume(front_of(table), reference), 4),
                     "best FID": round(table["fid"].min(), 3), "front size": len(front_of(table)),
                     "prefix cache saved": f"{table['steps_saved'].sum() / steps_total:.0%}",
                     "dedup saved": f"{dedup_steps / asked_steps:.0%}",
                     "denoising steps run": int(table["steps_run"].sum()), "of asked": int(asked_steps),
                     "seconds": round(seconds, 1)})
    print("\nalgorithms (in-process evaluation, common hypervolume reference "
          f"(flops share {reference[0]}, FID {reference[1]:.2f})):")
    print(pd.DataFrame(rows).to_string(index=False))

    speed = []
    for workers in (1, 2):
        table, gens, seconds = _run(cfg, args.supernet, root / f"ray{workers}", algorithm="nsga2", workers=workers, **base)
        speed.append({"Ray workers": workers, "evaluations": len(table), "seconds (incl. Ray start)": round(seconds, 1),
                      "evaluations/min": round(60 * len(table) / seconds, 1),
                      "evaluations/min (search loop only)": round(60 * len(table) / gens["seconds"].sum(), 1)})
    print("\nthroughput (NSGA-II, the same search with 1 and 2 Ray workers):")
    print(pd.DataFrame(speed).to_string(index=False))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
