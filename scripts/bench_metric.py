"""How trustworthy is FID/KID for the search: scores of every width at several sample counts and seed sets.

For each width of a supernet (every step at that width), each sample count and each replicate of the
"search" seed set, run `evaluate` and record FID, KID and the time taken. Beside them, the real-vs-real
noise floor at each sample count: held-out test images (disjoint from the training reference; drawn
with replacement beyond the split's size, so there an upper bound) and training images themselves
(a lower bound). Last, for widths next to each other, the FID gap and its spread over seed sets,
paired (same noise for both widths, as the search compares them) and unpaired.

    python scripts/bench_metric.py --supernet results/digits --csv results/bench_metric.csv

With --run (a finished search of that supernet), drift too: for every uniform width at --drift-ns
images (the search's sampler and steps) and each seed set, the drift from full width on the same
noise beside the paired FID gap to full width, with their spread over seed sets and z = mean / sd (how
well each tells the width from full width); then, for the run's front, how the search's ranking by
drift and by FID agrees with FID on --heldout held-out images (Spearman).

    python scripts/bench_metric.py --supernet results/quickstart/supernet --run results/quickstart/search --only-drift
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pandas as pd
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.evaluation.quality import evaluate, noise_floor
from ddsm_search.evaluation.scoring import Scorer, drift_space_for, training_reference
from ddsm_search.io import write_text_atomic
from ddsm_search.metrics import default_extractor_for, get_extractor, replicates
from ddsm_search.sampling import Runtime, resolve_device


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    """Return mean and spread over seed sets of every (what, n) group."""
    table = raw.groupby(["what", "n"], sort=False).agg(
        fid=("fid", "mean"), fid_sd=("fid", "std"), kid=("kid", "mean"), kid_sd=("kid", "std"),
        gflops=("gflops", "mean"), sample_s=("sample_s", "mean"), metric_s=("metric_s", "mean"), sets=("fid", "size"))
    return table.reset_index()


def gaps(raw: pd.DataFrame, widths: list[float]) -> pd.DataFrame:
    """Return, for neighbouring widths at each n, the FID gap and its paired and unpaired spread over seed sets."""
    rows = []
    gen = raw[raw.kind == "generated"]
    for n in sorted(gen.n.unique()):
        for wide, narrow in zip(widths, widths[1:]):
            a = gen[(gen.n == n) & (gen.width == wide)].set_index("seed_set").fid
            b = gen[(gen.n == n) & (gen.width == narrow)].set_index("seed_set").fid
            diff = (b - a).dropna()
            paired, unpaired = diff.std(), np.sqrt(a.var() + b.var())
            rows.append({"n": n, "pair": f"{narrow:g} - {wide:g}", "fid_gap": diff.mean(), "sd_paired": paired,
                         "sd_unpaired": unpaired, "z_paired": diff.mean() / paired if paired > 0 else np.inf,
                         "gap_sign_always_same": bool((diff > 0).all() or (diff < 0).all())})
    return pd.DataFrame(rows)


def drift_spread(supernet, search: dict, ns: list[int], sets: list[str], device: str, batch_size: int,
                 cache_dir) -> pd.DataFrame:
    """Return, per uniform width and n, drift and the paired FID gap to full width: mean, sd over seed sets, z."""
    from ddsm_search.evaluation.full_samples import full_size_samples
    from ddsm_search.evaluation.scoring import FullReference, make_scorer
    from ddsm_search.solvers.base import Solver

    scorer = make_scorer(supernet, metric="fid", device=device, cache_dir=cache_dir)
    steps, sampler, eta = int(search["steps"]), search["sampler"], float(search["eta"])
    widths = list(supernet.model.space.choices("width"))
    runtime = Runtime(supernet, device=device)
    plans = {w: runtime.plan([w] * steps, solver=Solver.of_sampler(sampler, eta)) for w in widths}
    rows = []
    for n in ns:
        for seed_set in sets:
            full = FullReference(full_size_samples(plans[widths[0]], n=n, seed_set=seed_set, batch_size=batch_size,
                                                   cache_dir=cache_dir))
            scores = {}
            for width in widths:
                scores[width] = evaluate(plans[width], scorer, n=n, seed_set=seed_set, full=full,
                                         batch_size=batch_size)
            for width in widths[1:]:
                rows.append({"n": n, "seed_set": seed_set, "width": width, "drift": scores[width]["drift"],
                             "fid_gap": scores[width]["fid"] - scores[widths[0]]["fid"]})
            print(f"  drift n={n} {seed_set}: " + ", ".join(f"{w:g} {scores[w]['drift']:.4f}" for w in widths[1:]),
                  flush=True)
    raw = pd.DataFrame(rows)
    table = raw.groupby(["n", "width"], sort=False).agg(drift=("drift", "mean"), drift_sd=("drift", "std"),
                                                        fid_gap=("fid_gap", "mean"), fid_gap_sd=("fid_gap", "std"),
                                                        sets=("drift", "size")).reset_index()
    table["z_drift"] = table["drift"] / table["drift_sd"]
    table["z_fid_gap"] = table["fid_gap"] / table["fid_gap_sd"]
    return table


def front_agreement(run: str, n: int, device: str) -> tuple[pd.DataFrame, dict]:
    """Return the run's front with its search-time FID and drift and its held-out FID on n images, and the
    Spearman rank correlation of each search-time score with held-out FID."""
    from scipy.stats import spearmanr

    from ddsm_search.report.heldout import heldout_front
    from ddsm_search.report.tables import front, load_run, run_info

    if run_info(run)["search"]["metric"] != "fid":
        raise SystemExit("--run must be a search whose metric is fid (its held-out check scores FID)")
    checked, _ = heldout_front(run, n, device=device, progress=True)
    table = front(load_run(run))[["schedule", "gflops", "flops_share", "fid", "drift"]].merge(
        checked[["schedule", "heldout_fid"]], on="schedule")
    rho = {score: float(spearmanr(table[score], table["heldout_fid"]).statistic) for score in ("fid", "drift")}
    return table, rho


def main() -> None:
    """Measure, print the tables, and write CSVs if asked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernet", required=True, help="a trained supernet directory")
    parser.add_argument("--ns", type=int, nargs="+", default=[256, 1000, 2000], help="sample counts")
    parser.add_argument("--replicates", type=int, default=3, help="seed sets per point: search, search/1, ...")
    parser.add_argument("--widths", type=float, nargs="+", help="default: every width of the supernet")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--cache-dir", help="reference statistics cache (default: $DDSM_SEARCH_CACHE or ~/.cache)")
    parser.add_argument("--csv", help="write the summary here, the raw rows beside it (<name>_raw.csv)")
    parser.add_argument("--run", help="a finished FID search of this supernet: also measure drift (see above)")
    parser.add_argument("--drift-ns", type=int, nargs="+", default=[250, 500], help="sample counts for drift")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out images for the front's check")
    parser.add_argument("--only-drift", action="store_true", help="with --run: skip the FID/KID table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    supernet = load_supernet(args.supernet, device)
    if args.run:
        from ddsm_search.report.tables import run_info

        search = run_info(args.run)["search"]
        print(f"drift: {supernet.path}, {search['steps']} {search['sampler']} steps, seed sets "
              f"{', '.join(replicates('search', args.replicates))}; {platform.node()}, {args.threads} thread(s)")
        spread = drift_spread(supernet, search, args.drift_ns, replicates("search", args.replicates), device,
                              args.batch_size, args.cache_dir)
        agreement, rho = front_agreement(args.run, args.heldout, device)
        with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
            print(spread.to_string(index=False))
            print()
            print(agreement.drop(columns="schedule").to_string(index=False))
        print(f"Spearman with held-out FID on {args.heldout} images over the {len(agreement)} front schedules: "
              f"search FID {rho['fid']:.3f}, search drift {rho['drift']:.3f}")
        if args.csv:
            stem = args.csv[:-4] if args.csv.endswith(".csv") else args.csv
            write_text_atomic(f"{stem}_drift.csv", spread.to_csv(index=False))
            write_text_atomic(f"{stem}_front_agreement.csv", agreement.to_csv(index=False))
        if args.only_drift:
            return
    widths = sorted(args.widths or supernet.model.space.choices("width"), reverse=True)
    steps = supernet.config.sample.steps
    extractor = get_extractor(default_extractor_for(supernet.config.data.kind), device)
    reference = training_reference(supernet.config.data, extractor, cache_dir=args.cache_dir)
    sets = replicates("search", args.replicates)
    print(f"{supernet.path} (step {supernet.step}), {steps} {supernet.config.sample.sampler} steps, extractor "
          f"{extractor.key}, reference {reference.name}; {platform.node()}, {args.threads} thread(s)")
    rows = []
    for n in args.ns:
        for source, label in (("test", "real: test (held out)"), ("train", "real: train (in reference)")):
            for k in range(args.replicates):
                started = time.perf_counter()
                r = noise_floor(supernet.config.data, n=n, source=source, seed=k, extractor=extractor, reference=reference)
                rows.append({"what": label, "kind": "real", "width": np.nan, "n": n, "seed_set": f"real/{k}",
                             "fid": r["fid"], "kid": r["kid"], "kid_subset_sd": r["kid_std"], "gflops": 0.0,
                             "sample_s": 0.0, "metric_s": time.perf_counter() - started})
    runtime = Runtime(supernet, device=device)
    features = drift_space_for(supernet.config.data.kind, "auto") == "features"
    scorer = Scorer(extractor, reference, extractor if features else None)
    for width in widths:
        plan = runtime.plan([width] * steps)  # the config's sampler
        for n in args.ns:
            for seed_set in sets:
                r = evaluate(plan, scorer, n=n, seed_set=seed_set, batch_size=args.batch_size)
                rows.append({"what": f"width {width:g}", "kind": "generated", "width": width, "n": n,
                             "seed_set": seed_set, "fid": r["fid"], "kid": r["kid"], "kid_subset_sd": r["kid_std"],
                             "gflops": r["gflops_per_image"], "sample_s": r["seconds"], "metric_s": r["eval_seconds"]})
                print(f"  width {width:g} n={n} {seed_set}: FID {r['fid']:.3f} KID {r['kid']:.4f} "
                      f"({r['seconds']:.1f} s + {r['eval_seconds']:.2f} s)", flush=True)
    raw = pd.DataFrame(rows)
    summary, gap = summarise(raw), gaps(raw, widths)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
        print(summary.to_string(index=False))
        print()
        print(gap.to_string(index=False))
    if args.csv:
        write_text_atomic(args.csv, summary.to_csv(index=False))
        stem = args.csv[:-4] if args.csv.endswith(".csv") else args.csv
        write_text_atomic(f"{stem}_raw.csv", raw.to_csv(index=False))
        write_text_atomic(f"{stem}_gaps.csv", gap.to_csv(index=False))


if __name__ == "__main__":
    main()
