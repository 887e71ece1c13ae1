"""How trustworthy is FID/KID for the search: scores of every width at several sample counts and seed sets.

For each width of a supernet (every step at that width), each sample count and each replicate of the
"search" seed set, run `evaluate` and record FID, KID and the time taken. Beside them, the real-vs-real
noise floor at each sample count: held-out test images (disjoint from the training reference; drawn
with replacement beyond the split's size, so there an upper bound) and training images themselves
(a lower bound). Last, for widths next to each other, the FID gap and its spread over seed sets,
paired (same noise for both widths, as the search compares them) and unpaired.

    python scripts/bench_metric.py --supernet results/digits --csv results/bench_metric.csv
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pandas as pd
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.evaluation import evaluate, noise_floor, training_reference
from ddsm_search.io import write_text_atomic
from ddsm_search.metrics import default_extractor_for, get_extractor, replicates
from ddsm_search.sampling import make_denoisers, resolve_device


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
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    supernet = load_supernet(args.supernet, device)
    widths = sorted(args.widths or supernet.model.widths, reverse=True)
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
    for width in widths:
        denoisers = make_denoisers(supernet.model, [width], device)
        for n in args.ns:
            for seed_set in sets:
                r = evaluate(supernet, [width] * steps, n=n, seed_set=seed_set, extractor=extractor, device=device,
                             batch_size=args.batch_size, reference=reference, denoisers=denoisers)
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
