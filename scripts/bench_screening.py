"""Does multi-fidelity screening pay? The same search with and without it, side by side in one run.

Each candidate is first scored on `screen_samples` images and fully evaluated only unless a cheaper
schedule of an earlier generation screened better by more than `screen_margin`. Screened-out
candidates are told to the algorithm with their screen score, so the search itself changes: this
compares what each setting costs (full evaluations, images sampled, seconds) with what it finds (the
front, its hypervolume against one common reference point, and how far its front is from the one
without screening).

    python scripts/bench_screening.py --supernet results/quickstart/supernet
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
from ddsm_search.report.tables import load_run
from ddsm_search.search.pareto import front_of, hv_reference, hypervolume


def _run(cfg, supernet: str, out: Path, **search) -> tuple[pd.DataFrame, float]:
    from ddsm_search.search.runner import run_search

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_search(replace(cfg, search=replace(cfg.search, **search)), supernet, out, progress=False)
    return load_run(out), time.perf_counter() - started


def main() -> None:
    """Run the searches and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="search_spaces/digits.yaml")
    parser.add_argument("--supernet", default="results/quickstart/supernet")
    parser.add_argument("--screens", type=int, nargs="+", default=[100, 200], help="screen_samples to try")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.3], help="screen_margin to try")
    parser.add_argument("--workers", type=int, default=0, help="Ray workers (0: in this process)")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    q = cfg.search
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-screening-"))
    print(f"{datetime.date.today()} | {platform.machine()} | {platform.processor() or '?'} | {cfg.name}: "
          f"{q.generations} generations x {q.population}, {q.samples} samples, {q.steps} steps in {q.segments} segments")
    settings = [("no screening", {"screen_samples": None})]
    settings += [(f"screen {s}, margin {m:g}", {"screen_samples": s, "screen_margin": m})
                 for s in args.screens for m in args.margins]
    runs = {name: _run(cfg, args.supernet, root / f"run{i}", workers=args.workers, **extra)
            for i, (name, extra) in enumerate(settings)}
    base_table, _ = runs["no screening"]
    reference = hv_reference(base_table, q.metric, q.samples)
    base_front = front_of(base_table, q.metric, q.samples)
    rows = []
    for (name, extra), (table, seconds) in zip(settings, runs.values()):
        front = front_of(table, q.metric, q.samples)
        full = table["fully_evaluated"]
        screen = extra.get("screen_samples") or 0
        # every candidate is screened first when screening is on; the full ones are sampled again on q.samples
        images = int(full.sum()) * q.samples + (len(table) * screen)
        # the front's worst shortfall against the one without screening, at the same or lower FLOPs
        shortfall = max(float(front.loc[front["gflops"] <= g * (1 + 1e-9), q.metric].min() - v)
                        if (front["gflops"] <= g * (1 + 1e-9)).any() else float("inf")
                        for g, v in zip(base_front["gflops"], base_front[q.metric]))
        rows.append({"setting": name, "candidates": len(table), "full evaluations": int(full.sum()),
                     "screened out": int((~full).sum()), "images sampled": images, "seconds": round(seconds, 1),
                     "front size": len(front), "same front": set(front["schedule"]) == set(base_front["schedule"]),
                     f"worst {q.metric} shortfall vs no screening": round(shortfall, 4),
                     "hypervolume": round(hypervolume(front, reference, q.metric), 4)})
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"common hypervolume reference: {reference}")
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
