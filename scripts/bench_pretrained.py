"""The pretrained path against training from scratch, on digits, in one run.

1. Train a plain diffusers UNet2DModel on digits (the "pretrained" model a user would bring).
2. Import it twice (`import_diffusers`): channels in diffusers' order, and ordered by Taylor importance.
3. Fine-tune each into a supernet (train.init_from, the sandwich rule, distilled from the frozen import).
4. Train a supernet of the same shape from scratch for as many steps as pre-training plus fine-tuning.
5. Search each (same search settings), then confirm its best schedule within 50% of the FLOPs on
   held-out noise beside its own full size.
One table: training steps, front hypervolume (one reference point for all runs), held-out FID at 50%
of the FLOPs with its loss against full size (95% paired bootstrap), and full size's held-out FID.
6. Step-Adaptive Training's per-group fine-tuning of each supernet's exported 50% schedule
   (`finetune_schedule`: each run of one subnet trained on its own timesteps, `--group-steps` steps per
   group), against the same schedule run on the supernet trained on for as many extra steps in all
   (the sandwich rule over every timestep, resumed from its checkpoint): held-out FID of both on the
   same noise and their paired bootstrap difference (equal FLOPs: the same subnets per step).

    python scripts/bench_pretrained.py --out /tmp/bench_pretrained [--pretrain 1500 --finetune 500]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ddsm_search.checkpoint import load_supernet, read_meta
from ddsm_search.config import load_config
from ddsm_search.data import load_dataset
from ddsm_search.deploy.export import export_schedule
from ddsm_search.diffusion import NoiseSchedule
from ddsm_search.evaluation.heldout import Confirmer
from ddsm_search.methods.pretrained.diffusers_config import unet2d_class
from ddsm_search.methods.pretrained.diffusers_unet import import_diffusers
from ddsm_search.methods.step_groups.finetune import finetune_schedule
from ddsm_search.metrics.stats import fid_gap_interval
from ddsm_search.report.tables import front, load_run
from ddsm_search.schedule import load_schedule
from ddsm_search.search.pareto import hypervolume
from ddsm_search.search.runner import run_search
from ddsm_search.training import train

# the digits U-Net's shape (search_spaces/digits.yaml) in diffusers' terms: 32-64-64 channels, one
# ResBlock per level, attention only in the middle block, 8 GroupNorm groups
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
            norm_num_groups=8, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)


def pretrain(out: Path, steps: int, seed: int = 0) -> Path:
    """Train a plain UNet2DModel with the DDPM loss (AdamW, warm-up, EMA 0.999); save it; return its folder."""
    if (out / "config.json").is_file():
        return out
    cfg = load_config("search_spaces/digits.yaml")
    data = load_dataset("digits", split="train")
    schedule = NoiseSchedule(cfg.diffusion)
    torch.manual_seed(seed)
    model = unet2d_class()(**UNET)
    ema = unet2d_class()(**UNET)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data), (128,), generator=g)
        x0, t = data.to_float(idx), torch.randint(schedule.timesteps, (128,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 100)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 250 == 0:
            print(f"  pretrain step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    ema.save_pretrained(out)
    return out


def group_gain(net: Path, run: Path, out: Path, *, group_steps: int, lr: float, heldout: int) -> dict:
    """Fine-tune the 50% schedule of `run` per group; train a copy of the supernet on for as many steps
    in all; return both schedules' held-out FID on the same noise and FID(groups) - FID(trained on)."""
    plain = run / "schedule_50pct.json"
    supernet = load_supernet(net)
    tuned = finetune_schedule(plain, net, out / f"{net.name}_groups.json", steps=group_steps, lr=lr,
                              batch_size=64, progress=False)
    extra = group_steps * len(tuned.groups)  # optimizer steps the groups took, in all
    continued = out / f"{net.name}_continued_{extra}"
    if not (continued / "meta.json").is_file():
        shutil.rmtree(continued, ignore_errors=True)
        shutil.copytree(net, continued)
    cfg = load_supernet(continued).config
    train(cfg, continued, steps=read_meta(net)["step"] + extra, resume=True, progress=False, grids=False)
    search = json.loads((run / "run.json").read_text())["search"]
    subnets = load_schedule(plain, supernet).subnets
    here = Confirmer(supernet, search, n=heldout)
    with_groups = load_schedule(tuned.schedule, supernet)
    groups = here.result(here.plan(with_groups.step_keys(), settings=with_groups.settings))
    before = here.result(here.plan(subnets))
    there = Confirmer(load_supernet(continued), search, n=heldout)
    on = there.result(there.plan(subnets))
    ref = here.scorer.reference
    gap = fid_gap_interval(groups["features"], on["features"], ref.mu, ref.sigma, seed=0)
    return {"groups": len(tuned.groups), "group steps": group_steps, "extra steps": extra,
            "FID before": before["fid"], "FID group-tuned": groups["fid"], "FID trained on": on["fid"],
            "groups - trained on": gap["estimate"], "low": gap["low"], "high": gap["high"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench_pretrained")
    parser.add_argument("--pretrain", type=int, default=1500)
    parser.add_argument("--finetune", type=int, default=500)
    parser.add_argument("--importance-images", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--group-steps", type=int, default=200, help="per-group fine-tuning steps (0: skip)")
    parser.add_argument("--group-lr", type=float, default=2e-4,
                        help="per-group fine-tuning learning rate (default 2e-4, a tenth of training's)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"{datetime.date.today()} | digits | pretrain {args.pretrain} + finetune {args.finetune} steps", flush=True)
    unet = pretrain(out / "pretrained", args.pretrain)
    digits = load_config("search_spaces/digits.yaml")
    supernets = {}
    for name, importance in (("imported, diffusers order", 0), ("imported, importance order", args.importance_images)):
        folder = out / ("import_importance" if importance else "import_plain")
        if not (folder / "meta.json").is_file():
            import_diffusers(unet, folder, config=digits, importance=importance)
        base = load_supernet(folder).config
        cfg = replace(base, train=replace(digits.train, steps=args.finetune, init_from=str(folder), teacher="frozen",
                                          distill_weight=0.5, warmup_steps=50))
        supernets[name] = (train(cfg, out / f"{folder.name}_finetuned", resume=(out / f"{folder.name}_finetuned" /
                                                                            "meta.json").is_file(),
                                 progress=False, grids=False), args.pretrain + args.finetune)
        print(f"  {name}: fine-tuned ({time.perf_counter() - started:.0f} s)", flush=True)
    # from scratch, the same shape as the import (diffusers' GroupNorm layout), as many steps in all
    scratch_cfg = replace(load_supernet(out / "import_plain").config,
                          train=replace(digits.train, steps=args.pretrain + args.finetune))
    scratch = out / "scratch"
    supernets["from scratch"] = (train(scratch_cfg, scratch, resume=(scratch / "meta.json").is_file(), progress=False,
                                       grids=False), args.pretrain + args.finetune)
    print(f"  from scratch: trained ({time.perf_counter() - started:.0f} s)", flush=True)

    search = dict(population=args.population, generations=args.generations, samples=args.samples, workers=0,
                  steps=20, segments=5)
    rows, tables = [], {}
    for name, (net, steps) in supernets.items():
        run = out / f"search_{Path(net).name}"
        cfg = replace(digits, search=replace(digits.search, **search))
        run_search(cfg, net, run, resume=(run / "run.json").is_file(), progress=False)
        tables[name] = load_run(run)
        path, exported = export_schedule(run, "50%", run / "schedule_50pct.json", heldout_samples=args.heldout)
        q = exported["quality"]
        rows.append({"supernet": name, "training steps": steps, "evaluations": len(tables[name]),
                     "export FLOPs share": exported["flops_share"], "held-out FID": q["heldout"]["fid"],
                     "full size held-out FID": q["full_size_heldout"]["fid"], "loss": q["loss"]["value"],
                     "loss low": q["loss"]["low"], "loss high": q["loss"]["high"]})
        print(f"  {name}: searched and exported ({time.perf_counter() - started:.0f} s)", flush=True)
    # one reference point for every run, so hypervolumes compare: beyond every front's worst FID
    worst = max(float(front(t)["fid"].max()) for t in tables.values())
    reference = (1.0, worst * 1.1)
    for row in rows:
        row["front hypervolume"] = hypervolume(front(tables[row["supernet"]]), reference, "fid")
    table = pd.DataFrame(rows)
    table.to_csv(out / "bench_pretrained.csv", index=False)
    (out / "bench_pretrained.json").write_text(json.dumps({"reference": reference, "rows": rows}, indent=1))
    with pd.option_context("display.width", 220):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"hypervolume reference (FLOPs share, FID): {reference}; {time.perf_counter() - started:.0f} s in all")
    if not args.group_steps:
        return
    gains = []
    for name, (net, _) in supernets.items():
        gains.append({"supernet": name, **group_gain(Path(net), out / f"search_{Path(net).name}", out,
                                                     group_steps=args.group_steps, lr=args.group_lr,
                                                     heldout=args.heldout)})
        print(f"  {name}: group fine-tuning measured ({time.perf_counter() - started:.0f} s)", flush=True)
    gains = pd.DataFrame(gains)
    gains.to_csv(out / "bench_pretrained_groups.csv", index=False)
    print(f"per-group fine-tuning of each 50% schedule ({args.group_steps} steps per group, lr {args.group_lr:g}, "
          f"batch 64) against the same schedule on its supernet trained on for as many steps in all; held-out "
          f"FID (n={args.heldout}, same noise), FID(groups) - FID(trained on) with its 95% paired bootstrap:")
    with pd.option_context("display.width", 220):
        print(gains.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
