"""Dynamic early exit (AdaDiff) against static depth schedules on the digits DiT, in one run.

On the same held-out noise (n images, seed set "heldout"), FID against the FLOPs executed per image
(mean over images, heads included), each with its loss against full size on the same noise (a paired
bootstrap interval), for:
- a threshold sweep of the per-image dynamic exit at full width (exits at the supernet's depth choices);
- the uniform depths (every step at one depth, full width);
- the front of a static width x depth search run (`--static-run`), each front schedule re-scored here;
- the front of a search that also had one exit threshold gene per segment (`--dynamic-run`).
With `--time-n N` every point is also timed against full size on the same N images and noise (median
of 3 turns each; dynamic steps on torch, full size on its fastest path here), so wall-clock speed-up
stands beside the FLOPs ratio. Then, at each point of the dynamic sweep, the best static front
schedule executing no more FLOPs is compared with it on the same images (paired bootstrap of the FID
difference), and the script says which wins there, or that the two are within the noise.

    python scripts/bench_exit.py --supernet SUPERNET --static-run RUN1 --dynamic-run RUN2 --n 1000 --time-n 500
(the supernet needs exit heads: `ddsm-search finetune-exit SUPERNET` first)
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import pandas as pd

from ddsm_search.backends.choice import cpu_name
from ddsm_search.checkpoint import load_supernet
from ddsm_search.evaluation.heldout import Confirmer
from ddsm_search.metrics.stats import fid_gap_interval
from ddsm_search.images import new_figure, save_figure
from ddsm_search.report.tables import load_run, row_steps
from ddsm_search.sampling import Runtime, time_against_full
from ddsm_search.space.steps import ExecutedRecord, steps_of


def main() -> None:
    """Score every policy on the same held-out noise; print the table and the verdict; write the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernet", required=True)
    parser.add_argument("--static-run", help="a static search run of this supernet: its front is re-scored")
    parser.add_argument("--dynamic-run", help="a search run with search.exit_thresholds: its front is re-scored")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--time-n", type=int, default=0, help="images per timing (0: no timing)")
    parser.add_argument("--out", default="results/reference/bench_exit")
    args = parser.parse_args()

    supernet = load_supernet(args.supernet)
    model = supernet.model
    runtime = Runtime(supernet, backend="auto", batch_size=min(args.time_n or 500, 500))  # for the timings
    search = {"metric": "fid", "batch_size": 500, "sampler": "ddim", "eta": 0.0, "steps": args.steps,
              "exit_thresholds": args.thresholds, "backend": "auto"}
    confirmer = Confirmer(supernet, search, n=args.n)
    full_flops = supernet.full_flops * args.steps
    cpu = cpu_name()
    print(f"{datetime.date.today()} | {platform.machine()} {cpu} | {supernet.config.name}: "
          f"n={args.n} held-out images, {args.steps} DDIM steps")

    plans = [("dynamic exit", f"threshold {t:g}", steps_of([model.full] * args.steps, exit=[t] * args.steps))
             for t in args.thresholds]
    plans += [("uniform depth", f"depth {d}", steps_of([model.full.replace(depth=d)] * args.steps))
              for d in model.space.choices("depth")]
    for policy, run in (("searched static front", args.static_run), ("searched dynamic front", args.dynamic_run)):
        if run:
            table = load_run(run)
            for _, row in table[table["on_front"]].sort_values("gflops").iterrows():
                if len(row_steps(row)) == args.steps:
                    plans.append((policy, row["schedule"], row_steps(row)))
    rows, features = [], {}
    for policy, setting, steps in plans:
        plan = confirmer.plan(steps)
        r = confirmer.result(plan)
        loss = confirmer.loss(r)
        spread = r["executed"]["flops_per_image"]["sd"] if r["executed"] else 0.0
        row = {"policy": policy, "setting": setting, "flops_share": r["gflops_per_image"] * 1e9 / full_flops,
               "flops_sd": spread / full_flops, "fid": r["fid"], "loss": loss["value"], "loss_low": loss["low"],
               "loss_high": loss["high"]}
        if args.time_n:
            _, seconds, full_seconds, _ = time_against_full(runtime.plan(steps, solver="ddim"),
                                                            n=args.time_n, seed=0, record=ExecutedRecord())
            row.update(seconds=seconds, full_seconds=full_seconds, speedup=full_seconds / seconds,
                       flops_speedup=full_flops / (r["gflops_per_image"] * 1e9))
        features[plan.key] = r["features"]
        row["key"] = plan.key
        rows.append(row)
        print(f"  {policy:24s} {row['flops_share']:.3f} (sd {row['flops_sd']:.3f}) FID {row['fid']:.3f} loss "
              f"{row['loss']:+.3f} [{row['loss_low']:+.3f}, {row['loss_high']:+.3f}]"
              + (f"  {row['speedup']:.2f}x wall-clock vs {row['flops_speedup']:.2f}x FLOPs" if args.time_n else ""),
              flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    with pd.option_context("display.width", 220, "display.max_colwidth", 60):
        print(table.drop(columns="key").to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    print("verdict, at each point of the dynamic sweep: the best static front schedule executing no more FLOPs, "
          "FID(static) - FID(dynamic) on the same images, 95% paired bootstrap")
    ref = confirmer.scorer.reference
    static = table[table["policy"] == "searched static front"]
    for _, dyn in table[table["policy"] == "dynamic exit"].sort_values("flops_share").iterrows():
        rivals = static[static["flops_share"] <= dyn["flops_share"]]
        if rivals.empty:
            print(f"  {dyn['setting']} at {dyn['flops_share']:.0%}: no static front schedule this cheap")
            continue
        best = rivals.sort_values("fid").iloc[0]
        gap = fid_gap_interval(features[best["key"]], features[dyn["key"]], ref.mu, ref.sigma, seed=0)
        word = ("dynamic wins" if gap["low"] > 0 else "static wins" if gap["high"] < 0 else "within the noise")
        print(f"  {dyn['setting']} at {dyn['flops_share']:.0%} (FID {dyn['fid']:.3f}) vs static at "
              f"{best['flops_share']:.0%} (FID {best['fid']:.3f}): {gap['estimate']:+.3f} "
              f"[{gap['low']:+.3f}, {gap['high']:+.3f}]: {word}")

    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    styles = {"dynamic exit": "-o", "uniform depth": "s", "searched static front": "-^", "searched dynamic front": "-v"}
    for policy, group in table.groupby("policy", sort=False):
        group = group.sort_values("flops_share")
        ax.errorbar(group["flops_share"], group["fid"], xerr=group["flops_sd"], fmt=styles[policy], capsize=2,
                    label=policy + (" (bars: sd of FLOPs over images)" if policy == "dynamic exit" else ""))
    ax.set_xlabel("FLOPs executed per image, share of full size")
    ax.set_ylabel(f"FID (held-out, n={args.n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
