"""The multi-stage U-Net (arXiv 2312.09181) against the unified supernet on digits, in one run.

1. Training FLOPs per step of each supernet, counted by torch's FLOP counter over real training steps
   (forward and backward, the sandwich rule's draws; the multi-stage one draws one stage per batch).
2. Both trained at equal training FLOPs: the unified supernet (search_spaces/digits.yaml) for
   `--unified-steps`, the K = 3 multi-decoder one (search_spaces/digits-multistage.yaml) for as many
   steps as the same FLOPs buy. At `--points` checkpoints each, its full size's FID on held-out noise
   (`--heldout` images, 20 DDIM steps), and at each pair of checkpoints of equal training FLOPs the
   paired bootstrap difference FID(multi-stage) - FID(unified) on the same noise (95%). The paper's
   headline is that the multi-stage model reaches the unified one's quality in fewer iterations.
3. Both searched with the same settings and seed (NSGA-II, equal population and generations, so equal
   evaluations unless a space runs out of new schedules); each front re-scored on held-out noise; the
   hypervolume of each in (GFLOPs per image, held-out FID) below one reference point for both (the
   two models' full sizes differ in cost, so FLOPs are absolute, not shares).

    python scripts/bench_multistage.py --out /tmp/bench_multistage [--unified-steps 2000 --points 5]

Writes bench_multistage_{training,fronts}.csv, bench_multistage.json and bench_multistage.png in --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ddsm_search.backends.choice import cpu_name
from ddsm_search.checkpoint import load_supernet, read_meta
from ddsm_search.config import load_config
from ddsm_search.data import load_data
from ddsm_search.evaluation.heldout import Confirmer
from ddsm_search.metrics.stats import fid_gap_interval
from ddsm_search.images import new_figure, save_figure
from ddsm_search.report.tables import front, load_run, row_subnets
from ddsm_search.search.runner import run_search
from ddsm_search.training import TrainingRun, train

MODELS = {"unified": "search_spaces/digits.yaml", "multi-stage K=3": "search_spaces/digits-multistage.yaml"}


def training_flops_per_step(cfg, steps: int) -> float:
    """Return the mean FLOPs of one training step (forward and backward), counted by torch's FLOP
    counter over `steps` steps of a throwaway run with the config's seed (the draws a real run makes)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = TrainingRun(cfg, load_data(cfg.data), "cpu")
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(steps):
            run.train_step()
    return counter.get_total_flops() / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench_multistage")
    parser.add_argument("--unified-steps", type=int, default=2000)
    parser.add_argument("--points", type=int, default=5, help="checkpoints scored per supernet")
    parser.add_argument("--flop-steps", type=int, default=30, help="training steps the FLOP counter averages")
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--samples", type=int, default=250)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"{datetime.date.today()} | {platform.machine()} {cpu_name()} | digits, held-out n={args.heldout}",
          flush=True)

    cfgs = {name: load_config(path) for name, path in MODELS.items()}
    cfgs = {name: replace(c, train=replace(c.train, checkpoint_every=10**9)) for name, c in cfgs.items()}
    per_step = {name: training_flops_per_step(c, args.flop_steps) for name, c in cfgs.items()}
    budget = args.unified_steps * per_step["unified"]
    total = {name: int(round(budget / f)) for name, f in per_step.items()}
    for name in cfgs:
        print(f"  {name}: {per_step[name] / 1e9:.3f} GFLOPs per training step (forward + backward, mean of "
              f"{args.flop_steps}); {total[name]} steps for {budget / 1e12:.2f} TFLOPs", flush=True)

    search = dict(cfgs["unified"].search.__dict__)
    rows, features, scorer = [], {}, None
    for i in range(1, args.points + 1):
        for name, cfg in cfgs.items():
            target = int(round(total[name] * i / args.points))
            net = out / name.split()[0]
            train(cfg, net, steps=target, resume=(net / "meta.json").is_file(), progress=False, grids=False)
            supernet = load_supernet(net)
            confirmer = Confirmer(supernet, {**search, "backend": "torch"}, n=args.heldout)
            r = confirmer.full_result
            scorer = confirmer.scorer
            features[(name, i)] = r["features"]
            rows.append({"model": name, "point": i, "training steps": read_meta(net)["step"],
                         "training TFLOPs": read_meta(net)["step"] * per_step[name] / 1e12,
                         "sampling GFLOPs per image": r["gflops_per_image"], "held-out FID": r["fid"]})
            print(f"  {name} step {rows[-1]['training steps']}: held-out FID {r['fid']:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        ref = scorer.reference
        gap = fid_gap_interval(features[("multi-stage K=3", i)], features[("unified", i)], ref.mu, ref.sigma, seed=0)
        for row in rows[-2:]:
            row.update({"multi - unified": gap["estimate"], "low": gap["low"], "high": gap["high"]})
    training = pd.DataFrame(rows)
    training.to_csv(out / "bench_multistage_training.csv", index=False)
    with pd.option_context("display.width", 220):
        print(training.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    final_unified = training[(training["model"] == "unified") & (training["point"] == args.points)]["held-out FID"].item()
    multi = training[training["model"] == "multi-stage K=3"]
    reached = multi[multi["held-out FID"] <= final_unified]
    verdict = (f"the multi-stage supernet reaches the unified one's final held-out FID ({final_unified:.4f}) at "
               f"{reached['training TFLOPs'].iloc[0]:.2f} TFLOPs ({reached['training steps'].iloc[0]} steps) of "
               f"{budget / 1e12:.2f}" if len(reached) else
               f"the multi-stage supernet does not reach the unified one's final held-out FID ({final_unified:.4f}) "
               f"within the same training FLOPs (its best: {multi['held-out FID'].min():.4f})")
    print(verdict, flush=True)

    searched, held = {}, []
    for name, cfg in cfgs.items():
        net, run = out / name.split()[0], out / f"search_{name.split()[0]}"
        q = replace(cfg.search, population=args.population, generations=args.generations, samples=args.samples,
                    workers=0)
        run_search(replace(cfg, search=q), net, run, resume=(run / "run.json").is_file(), progress=False)
        table = load_run(run)
        searched[name] = len(table)
        supernet = load_supernet(net)
        confirmer = Confirmer(supernet, {**json.loads((run / "run.json").read_text())["search"], "backend": "torch"},
                              n=args.heldout)
        for _, row in front(table).sort_values("gflops").iterrows():
            r = confirmer.score(row_subnets(row))
            held.append({"model": name, "schedule": row["schedule"], "gflops": row["gflops"],
                         "search FID": row["fid"], "held-out FID": r["fid"]})
        print(f"  {name}: searched ({len(table)} evaluations), front of {len(front(table))} re-scored "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    fronts = pd.DataFrame(held)
    reference = (float(fronts["gflops"].max()) * 1.1, float(fronts["held-out FID"].max()) * 1.1)
    from pymoo.indicators.hv import HV

    hv = {}
    for name, group in fronts.groupby("model", sort=False):
        pts = group[["gflops", "held-out FID"]].to_numpy(dtype=float)
        # the held-out scores of a search front need not be mutually non-dominated: HV counts the best
        hv[name] = float(HV(ref_point=np.asarray(reference))(pts))
    fronts["front hypervolume"] = fronts["model"].map(hv)
    fronts.to_csv(out / "bench_multistage_fronts.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_colwidth", 60):
        print(fronts.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("front hypervolume in (GFLOPs per image, held-out FID) below "
          f"({reference[0]:.4g}, {reference[1]:.4g}): "
          + ", ".join(f"{n} {v:.4g} ({searched[n]} evaluations)" for n, v in hv.items()), flush=True)

    fig = new_figure(11, 4.2)
    a, b = fig.subplots(1, 2)
    for name, group in training.groupby("model", sort=False):
        a.plot(group["training TFLOPs"], group["held-out FID"], "-o", label=name)
    a.set_xlabel("training TFLOPs (forward + backward)")
    a.set_ylabel(f"full size held-out FID (n={args.heldout})")
    a.set_title("equal training FLOPs")
    for name, group in fronts.groupby("model", sort=False):
        b.plot(group["gflops"], group["held-out FID"], "-o", label=f"{name} ({searched[name]} evaluations)")
    b.set_xlabel("GFLOPs per image (20 DDIM steps)")
    b.set_ylabel("held-out FID")
    b.set_title("searched fronts, re-scored on held-out noise")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "bench_multistage.png")
    (out / "bench_multistage.json").write_text(json.dumps(
        {"date": str(datetime.date.today()), "machine": f"{platform.machine()} {cpu_name()}",
         "training_flops_per_step": per_step, "training_steps": total, "verdict": verdict,
         "evaluations": searched, "hypervolume": hv, "hv_reference": reference,
         "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {out}/bench_multistage_*.csv, .json, .png; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
