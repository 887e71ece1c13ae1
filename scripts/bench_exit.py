"""Dynamic early exit (AdaDiff) against static depth schedules on the digits DiT, in one run.

On the same held-out noise (n images, seed set "heldout"), FID against executed FLOPs per image for:
- a threshold sweep of the per-image dynamic exit (full width, exits at the supernet's depth choices;
  FLOPs are those executed, heads included, mean over images);
- the uniform depths (every step at one depth, full width);
- the searched static width x depth front of a run (each front schedule re-scored here).
Writes a table and a plot, and says which wins where.

    python scripts/bench_exit.py --supernet results/quickstart-digits-dit/supernet \\
        --run results/quickstart-digits-dit/search --n 1000
(the supernet needs exit heads: `ddsm-search finetune-exit SUPERNET` first)
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import pandas as pd

from ddsm_search.checkpoint import load_supernet
from ddsm_search.evaluation import evaluate
from ddsm_search.exit_stage import ExecutedFlops, exit_denoisers
from ddsm_search.plots import _figure, _save
from ddsm_search.report import load_run
from ddsm_search.scoring import make_scorer
from ddsm_search.subnet import schedule_key


def main() -> None:
    """Score every policy on the same held-out noise; print the table and write the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernet", required=True)
    parser.add_argument("--run", help="a search run of this supernet: its front is re-scored too")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--out", default="results/reference/bench_exit")
    args = parser.parse_args()

    supernet = load_supernet(args.supernet)
    model = supernet.model
    scorer = make_scorer(supernet, metric="fid")
    full_flops = supernet.full_flops * args.steps
    kwargs = dict(n=args.n, seed_set="heldout", scorer=scorer, kid=False)
    rows = []
    print(f"{datetime.date.today()} | {platform.machine()} | {supernet.config.name}: n={args.n} held-out, "
          f"{args.steps} DDIM steps")
    for t in args.thresholds:
        record = ExecutedFlops()
        plan = [model.full] * args.steps
        r = evaluate(supernet, plan, denoisers=exit_denoisers(supernet, plan, t, record=record), **kwargs)
        flops = record.per_image(args.n)
        rows.append({"policy": "dynamic exit", "setting": f"threshold {t:g}", "flops_share": float(flops.mean()) / full_flops,
                     "flops_sd": float(flops.std(unbiased=False)) / full_flops, "fid": r["fid"]})
        print(f"  {rows[-1]}", flush=True)
    for depth in model.space.choices("depth"):
        plan = [model.full.replace(depth=depth)] * args.steps
        r = evaluate(supernet, plan, **kwargs)
        rows.append({"policy": "uniform depth", "setting": f"depth {depth}",
                     "flops_share": supernet.schedule_flops(plan) / full_flops, "flops_sd": 0.0, "fid": r["fid"]})
        print(f"  {rows[-1]}", flush=True)
    if args.run:
        front = load_run(args.run)
        for _, row in front[front["on_front"]].sort_values("gflops").iterrows():
            plan = list(row["subnets"])
            if len(plan) != args.steps:
                continue
            r = evaluate(supernet, plan, **kwargs)
            rows.append({"policy": "searched static front", "setting": schedule_key(plan),
                         "flops_share": supernet.schedule_flops(plan) / full_flops, "flops_sd": 0.0, "fid": r["fid"]})
            print(f"  {rows[-1]['flops_share']:.2f} {rows[-1]['fid']:.3f}", flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (policy, group), style in zip(table.groupby("policy", sort=False), ("-o", "s", "-^")):
        group = group.sort_values("flops_share")
        ax.plot(group["flops_share"], group["fid"], style, label=policy)
    ax.set_xlabel("FLOPs executed per image, share of full size")
    ax.set_ylabel(f"FID (held-out, n={args.n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
