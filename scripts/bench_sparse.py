"""Sparse-to-sparse supernets (train.sparsity: Static, RigL, MagRan) against the dense one on digits, in one run.

1. Train a dense supernet and one per method x density (0.75, 0.5, 0.25 by default), each for the same
   number of steps, for every seed (at least two): the same config otherwise, and the same batches,
   timesteps and noise per seed (the masks draw from a generator of their own).
2. Held-out quality (n images of the "heldout" seed set, the same noise for every supernet): FID of
   each uniform schedule (full size, and each choice of every axis with the others full) and its
   difference from the dense supernet of the same seed on the same noise, with a 95% paired bootstrap
   interval; the spread (sd) over seeds beside the mean.
3. Fronts on sparse FLOPs: a search (search.cost: sparse) of each supernet of the first `--search-seeds`,
   its front drawn in GFLOPs counting nonzero weights only, and hypervolumes on one reference point in
   shares of the dense full size (a dense supernet's sparse FLOPs are its dense FLOPs).
4. Measured sampling time: full size and the smallest width of each sparse supernet against the dense
   one, same batch and noise, in rotation (median of 3): masks leave the dense kernels as slow as before.
Then one verdict per method and density: within the noise of dense, better, or worse (where it breaks).

    python scripts/bench_sparse.py --out /tmp/bench_sparse                    # the full benchmark
    python scripts/bench_sparse.py --steps 30 --seeds 0 1 --n 64 --densities 0.5 --methods static rigl \\
        --update-every 5 --search-seeds --time-n 32 --out /tmp/bench_sparse_tiny  # a smoke run, minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from ddsm_search.backends.choice import cpu_name
from ddsm_search.checkpoint import load_supernet, read_meta
from ddsm_search.config import SparsityConfig, load_config
from ddsm_search.evaluation.heldout import Confirmer
from ddsm_search.metrics.stats import fid_gap_interval
from ddsm_search.report.tables import front, load_run
from ddsm_search.sampling import Runtime, generate
from ddsm_search.search.pareto import hypervolume
from ddsm_search.search.runner import run_search
from ddsm_search.training import train

DENSE = "dense"


def label(method: str | None, density: float | None) -> str:
    """Return a supernet's name in the tables: dense, or method@density."""
    return DENSE if method is None else f"{method}@{density:g}"


def train_one(base, method, density, seed: int, args, out: Path) -> Path:
    """Train (or find, or finish) one supernet; return its folder."""
    name = label(method, density).replace("@", "_")
    folder = out / f"{name}_seed{seed}"
    sparsity = None if method is None else SparsityConfig(method=method, density=density,
                                                           update_every=args.update_every,
                                                           drop_fraction=args.drop_fraction,
                                                           distribution=args.distribution, stop_at=args.stop_at)
    cfg = replace(base, name=f"{base.name}-{name}-s{seed}",
                  train=replace(base.train, steps=args.steps, seed=seed, checkpoint_every=args.steps,
                                log_every=max(1, min(base.train.log_every, args.steps)), sparsity=sparsity))
    done = (folder / "meta.json").is_file()
    if done and read_meta(folder)["step"] >= args.steps:
        return folder
    started = time.perf_counter()
    train(cfg, folder, resume=done, progress=False, grids=False)
    print(f"  trained {name} seed {seed} ({time.perf_counter() - started:.0f} s)", flush=True)
    return folder


def uniform_schedules(space, steps: int) -> dict[str, list]:
    """Return full size and each choice of every axis with the others full, as uniform schedules."""
    subnets = dict.fromkeys(s for axis in space.names for s in space.along(axis))
    return {("full" if s == space.full else s.key): [s] * steps for s in subnets}


def heldout(nets: dict, args, search: dict) -> tuple[pd.DataFrame, dict]:
    """Score every supernet's uniform schedules on the same held-out noise; return the rows and the
    features kept for the paired intervals."""
    rows, feats, ref = [], {}, None
    for (name, seed), path in nets.items():
        net = load_supernet(path).with_cost("sparse")
        confirmer = Confirmer(net, search, n=args.n)
        ref = confirmer.scorer.reference
        dense_net = net.with_cost("dense")
        for key, subnets in uniform_schedules(net.model.space, args.sample_steps).items():
            result = confirmer.full_result if key == "full" else confirmer.result(confirmer.plan(subnets))
            feats[(name, seed, key)] = result["features"]
            rows.append({"supernet": name, "seed": seed, "schedule": key, "fid": result["fid"],
                         "sparse gflops": net.schedule_flops(subnets) / 1e9,
                         "dense gflops": dense_net.schedule_flops(subnets) / 1e9})
        print(f"  held-out {name} seed {seed}: full-size FID {confirmer.full_result['fid']:.3f}", flush=True)
    table = pd.DataFrame(rows)
    gaps = []
    for _, row in table.iterrows():
        if row["supernet"] == DENSE:
            gaps.append({"gap": 0.0, "gap low": 0.0, "gap high": 0.0})
            continue
        gap = fid_gap_interval(feats[(row["supernet"], row["seed"], row["schedule"])],
                               feats[(DENSE, row["seed"], row["schedule"])], ref.mu, ref.sigma, seed=0)
        gaps.append({"gap": gap["estimate"], "gap low": gap["low"], "gap high": gap["high"]})
    return pd.concat([table, pd.DataFrame(gaps)], axis=1), feats


def verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Return one row per supernet and schedule: FID mean and sd over seeds, the mean gap to dense, and
    the verdict (worse or better: every seed's interval on that side of zero; else within the noise)."""
    rows = []
    for (name, key), group in table.groupby(["supernet", "schedule"], sort=False):
        sd = statistics.stdev(group["fid"]) if len(group) > 1 else math.nan
        if name == DENSE:
            verdict = "reference"
        elif (group["gap low"] > 0).all():
            verdict = "worse than dense (breaks)"
        elif (group["gap high"] < 0).all():
            verdict = "better than dense"
        else:
            verdict = "within the noise of dense"
        rows.append({"supernet": name, "schedule": key, "seeds": len(group), "FID mean": group["fid"].mean(),
                     "FID sd over seeds": sd, "gap mean": group["gap"].mean(), "gap low (min)": group["gap low"].min(),
                     "gap high (max)": group["gap high"].max(), "sparse GFLOPs": group["sparse gflops"].iloc[0],
                     "dense GFLOPs": group["dense gflops"].iloc[0], "verdict": verdict})
    return pd.DataFrame(rows)


def fronts(nets: dict, args, base, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Search each supernet of the first seeds on sparse FLOPs; return the fronts (GFLOPs, shares of
    the dense full size) and their hypervolumes on one reference point."""
    q = replace(base.search, steps=args.sample_steps, segments=args.segments, population=args.population,
                generations=args.generations, samples=args.samples, workers=0, batch_size=min(500, args.samples),
                cost="sparse", metric="fid")
    cfg = replace(base, search=q)
    tables = {}
    for (name, seed), path in nets.items():
        if seed not in args.search_seeds:
            continue
        run = out / f"search_{Path(path).name}"
        started = time.perf_counter()
        run_search(cfg, path, run, resume=(run / "run.json").is_file(), progress=False)
        tables[(name, seed)] = front(load_run(run))
        print(f"  searched {name} seed {seed} ({time.perf_counter() - started:.0f} s)", flush=True)
    if not tables:
        return pd.DataFrame(), pd.DataFrame()
    dense_full = {seed: load_supernet(p).with_cost("dense").full_schedule_flops(args.sample_steps) / 1e9
                  for (name, seed), p in nets.items() if name == DENSE}
    parts = []
    for (name, seed), f in tables.items():
        f = f[["gflops", "fid", "schedule"]].copy()
        f.insert(0, "seed", seed)
        f.insert(0, "supernet", name)
        f["share of dense full size"] = f["gflops"] / dense_full[seed]
        parts.append(f)
    all_fronts = pd.concat(parts, ignore_index=True)
    reference = (1.0, float(all_fronts["fid"].max()) * 1.1)
    hv = [{"supernet": n, "seed": s, "front size": len(g),
           "hypervolume": hypervolume(g.rename(columns={"share of dense full size": "flops_share"}), reference, "fid"),
           "reference": str(reference)}
          for (n, s), g in all_fronts.groupby(["supernet", "seed"], sort=False)]
    return all_fronts, pd.DataFrame(hv)


def timing(nets: dict, args, base) -> pd.DataFrame:
    """Time full size and the smallest width of each supernet of the first seed against the dense one
    (same batch, noise and backend), in rotation, median of 3."""
    seed = min(s for _, s in nets)
    loaded = {name: load_supernet(p) for (name, s), p in nets.items() if s == seed}
    space = loaded[DENSE].model.space
    smallest = space.along("width")[-1] if "width" in space.names else space.full
    rows = []
    for key, subnet in (("full", space.full), (smallest.key, smallest)):
        runs = {}
        for name, net in loaded.items():
            runs[name] = (net, Runtime(net, backend=args.backend, batch_size=args.time_n).plan(
                [subnet] * args.sample_steps))
        times = {name: [] for name in runs}
        for turn in range(4):  # the first turn warms up
            for name, (net, plan) in runs.items():
                started = time.perf_counter()
                generate(plan, n=args.time_n, seed=0, batch_size=args.time_n)
                if turn:
                    times[name].append(time.perf_counter() - started)
        dense = statistics.median(times[DENSE])
        for name, ts in times.items():
            net = loaded[name]
            rows.append({"supernet": name, "schedule": key, "images": args.time_n, "steps": args.sample_steps,
                         "seconds": statistics.median(ts), "dense seconds": dense,
                         "time / dense": statistics.median(ts) / dense,
                         "sparse FLOPs / dense": net.flops_tables["sparse"][subnet] / net.flops_tables["dense"][subnet]})
    return pd.DataFrame(rows)


def plot_fronts(all_fronts: pd.DataFrame, path: Path) -> None:
    """Draw every front on sparse GFLOPs, one line per supernet and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, seed), g in all_fronts.groupby(["supernet", "seed"], sort=False):
        g = g.sort_values("gflops")
        ax.step(g["gflops"], g["fid"], where="post", marker="o", ms=3, lw=2 if name == DENSE else 1,
                color="black" if name == DENSE else None, label=f"{name} (seed {seed})")
    ax.set_xlabel("GFLOPs per image, nonzero weights only (sparse FLOPs)")
    ax.set_ylabel("FID (search seed set)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="search_spaces/digits.yaml")
    parser.add_argument("--out", default="/tmp/bench_sparse")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every supernet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["static", "rigl", "magran"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--distribution", default="uniform")
    parser.add_argument("--stop-at", type=float, default=0.75)
    parser.add_argument("--n", type=int, default=1000, help="held-out images per schedule")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--search-seeds", type=int, nargs="*", default=[0], help="seeds whose supernets are "
                        "searched (none: no fronts)")
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--time-n", type=int, default=500, help="images per timing (0: no timing)")
    parser.add_argument("--backend", default="torch", help="how the timed subnets run: torch | fused | auto")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        print("note: one seed gives no spread over seeds; the issue asks for at least two", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config)
    started = time.perf_counter()
    cpu = cpu_name()
    header = (f"{datetime.date.today()} | {base.name} | {cpu}, {torch.get_num_threads()} threads | {args.steps} steps "
              f"each, seeds {args.seeds}, held-out n={args.n}, {args.sample_steps} DDIM steps | sparsity: update every "
              f"{args.update_every}, drop fraction {args.drop_fraction}, {args.distribution}, stop at {args.stop_at}")
    print(header, flush=True)
    nets = {}
    for seed in args.seeds:
        nets[(DENSE, seed)] = train_one(base, None, None, seed, args, out)
        for method in args.methods:
            for density in args.densities:
                nets[(label(method, density), seed)] = train_one(base, method, density, seed, args, out)
    search = {"metric": "fid", "batch_size": min(500, args.n), "sampler": "ddim", "eta": 0.0,
              "steps": args.sample_steps, "backend": "torch"}
    table, _ = heldout(nets, args, search)
    summary = verdicts(table)
    all_fronts, hv = fronts(nets, args, base, out) if args.search_seeds else (pd.DataFrame(), pd.DataFrame())
    times = timing(nets, args, base) if args.time_n else pd.DataFrame()

    table.to_csv(out / "bench_sparse_heldout.csv", index=False)
    summary.to_csv(out / "bench_sparse_summary.csv", index=False)
    if not all_fronts.empty:
        all_fronts.to_csv(out / "bench_sparse_fronts.csv", index=False)
        hv.to_csv(out / "bench_sparse_hypervolume.csv", index=False)
        plot_fronts(all_fronts, out / "bench_sparse_fronts.png")
    if not times.empty:
        times.to_csv(out / "bench_sparse_time.csv", index=False)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    full = summary[summary["schedule"] == "full"]
    lines = [header, "", "held-out FID at full size (mean and sd over seeds) and FID - dense FID on the same noise "
             "(95% paired bootstrap; the widest interval over seeds):", full.to_string(**fmt), "",
             "every uniform schedule:", summary.to_string(**fmt)]
    if not hv.empty:
        lines += ["", "fronts on sparse FLOPs (search.cost: sparse), hypervolume in shares of the dense full size:",
                  hv.to_string(**fmt)]
    if not times.empty:
        lines += ["", f"sampling time ({args.backend} backend, dense kernels), against the dense supernet:",
                  times.to_string(**fmt)]
    lines += ["", "verdicts at full size:"]
    lines += [f"- {r['supernet']}: {r['verdict']} (gap {r['gap mean']:+.3f}, intervals {r['gap low (min)']:+.3f} .. "
              f"{r['gap high (max)']:+.3f}; dense FID sd over seeds "
              f"{full.loc[full['supernet'] == DENSE, 'FID sd over seeds'].iloc[0]:.3f})"
              for _, r in full.iterrows() if r["supernet"] != DENSE]
    if not times.empty:
        ratio = times.loc[times["supernet"] != DENSE, "time / dense"]
        lines.append(f"- time: sparse supernets sample in {ratio.min():.2f}x-{ratio.max():.2f}x the dense one's "
                     "time: unstructured masks save no time in dense kernels (see scripts/bench_sparse_time.py)")
    lines.append(f"{time.perf_counter() - started:.0f} s in all")
    text = "\n".join(lines) + "\n"
    (out / "bench_sparse.md").write_text(text)
    (out / "bench_sparse.json").write_text(json.dumps({"args": vars(args), "summary": summary.to_dict("records"),
                                                       "hypervolume": hv.to_dict("records"),
                                                       "time": times.to_dict("records")}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
