"""The cost of running a search as a Ray Tune experiment: the same search (same seed, same evaluations)
on the actor pool and on Tune, side by side on one Ray, in seconds per evaluation.

    python scripts/bench_tune.py [--supernet DIR] [--out /tmp/bench_tune] [--workers 2] [--samples 100]

Without --supernet it trains the tests' tiny supernet (a few seconds). Both executors start their
workers (and each worker its Evaluator) inside the timed search, so the figures include that start-up;
Ray itself is started once, before either. The two runs must reach the same front (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from ddsm_search.backends.choice import cpu_name  # noqa: E402
from ddsm_search.cli.main import main as cli  # noqa: E402
from ddsm_search.config import config_from_dict  # noqa: E402
from ddsm_search.search.runner import run_search  # noqa: E402
from tests.conftest import tiny_dict  # noqa: E402

COMPARED = ["schedule", "gflops", "fid", "kid", "drift", "samples", "generation", "screen_score"]


def main() -> None:
    """Run the search on both executors and print (and write) seconds per evaluation and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet", help="a supernet directory (default: train the tiny one)")
    parser.add_argument("--config", help="its experiment YAML (default: the tiny one)")
    parser.add_argument("--out", default="/tmp/bench_tune")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--segments", type=int, default=5)
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ.setdefault("DDSM_SEARCH_CACHE", str(out / "cache"))
    search = {"steps": args.steps, "segments": args.segments, "population": args.population,
              "generations": args.generations, "samples": args.samples, "batch_size": args.samples,
              "workers": args.workers}
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text())
        data["search"] = {**data.get("search", {}), **search}
    else:
        data = tiny_dict(search=search)
    supernet = args.supernet
    if supernet is None:
        (out / "tiny.yaml").write_text(yaml.safe_dump(data))
        supernet = str(out / "net")
        assert cli(["train", str(out / "tiny.yaml"), "--out", supernet, "--train-steps", "3", "--quiet"]) == 0
    cfg = config_from_dict(data)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    # the reference statistics and full-size samples once, outside both timings
    run_search(cfg, supernet, out / "warm-up", progress=False, workers=0, generations=1)
    rows = []
    try:
        for executor in ("pool", "tune"):
            started = time.perf_counter()
            files = run_search(cfg, supernet, out / executor, progress=False, executor=executor)
            seconds = time.perf_counter() - started
            n = len(files.rows)
            rows.append({"executor": executor, "evaluations": n, "seconds": round(seconds, 2),
                         "seconds_per_evaluation": round(seconds / n, 3),
                         "evaluating_seconds": round(float(files.table()["seconds"].sum()), 2),
                         "denoising_steps_run": int(files.table()["steps_run"].sum())})
    finally:
        ray.shutdown()
    tables = [pd.read_csv(out / e / "front.csv")[COMPARED] for e in ("pool", "tune")]
    same = tables[0].equals(tables[1])
    pool, tune = rows
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} | {cpu_name()} | "
              f"{os.cpu_count()} cores", "ray": ray.__version__, "search": search, "runs": rows,
              "ratio": round(tune["seconds_per_evaluation"] / pool["seconds_per_evaluation"], 2),
              "overhead_seconds_per_evaluation": round(tune["seconds_per_evaluation"] - pool["seconds_per_evaluation"], 3),
              "same_front": same}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['date']} | {result['machine']} | ray {result['ray']}")
    print(f"search: {args.generations} generations x {args.population}, {args.samples} images per evaluation, "
          f"{args.steps} steps in {args.segments} segments, {args.workers} workers")
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"Tune / pool: {result['ratio']}x seconds per evaluation "
          f"({result['overhead_seconds_per_evaluation']:+.3f} s per evaluation); same front: {same}")
    print(f"written to {out / 'result.json'}")
    if not same:
        sys.exit("the two executors reached different fronts")


if __name__ == "__main__":
    main()
