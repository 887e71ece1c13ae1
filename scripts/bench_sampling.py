"""Sampling speed against full size: FLOPs ratio and wall-clock ratio, measured side by side in one run.

For the uniform schedules of every axis (each width at full depth, each depth at full width, on a
DiT), one subnet small on both axes, and mixed schedules, sample a batch with DDIM (50 steps by
default) and time it; repetitions are interleaved across schedules so drift in machine speed hits all of them
alike, and the median is reported, with the range of the per-repetition ratios beside it. Weights
do not change the cost, so without --supernet a supernet with fresh weights is built from --config.

`--paths fused` (the default) runs the U-Net on the fused CPU kernel backend (ddsm_search/backends/fused)
where it can; `--paths fused torch` also times torch's own layers, interleaved, and prints how much
faster the kernel is. A DiT runs on torch's layers: `--paths torch`.

    python scripts/bench_sampling.py                      # digits on CPU, batches 256 and 1000
    python scripts/bench_sampling.py --paths fused torch  # and against torch's layers
    python scripts/bench_sampling.py --config search_spaces/digits-dit.yaml --paths torch   # the DiT
    python scripts/bench_sampling.py --config search_spaces/cifar10.yaml --device cuda --batches 256 1000
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ddsm_search.backbones.registry import build_supernet
from ddsm_search.backends import fused as kernels
from ddsm_search.checkpoint import in_memory, load_supernet
from ddsm_search.config import load_config
from ddsm_search.sampling import Runtime, generate, resolve_device
from ddsm_search.space.subnet import Subnet, SubnetSpace

TOLERANCE = 1.25  # target: wall-clock ratio within 1.25x of the FLOPs ratio (width >= 0.5, depth >= half, mixed)


def schedules(space: SubnetSpace, steps: int) -> dict[str, list[Subnet]]:
    """Return the schedules to time: the uniform ones of every axis, one small on every axis, then mixed
    ones (half the steps on a smaller subnet, and a ramp over each axis's choices)."""
    full = space.full
    out = {"full size": [full] * steps}
    for axis in space.names:
        for s in space.along(axis)[1:]:
            out[f"uniform {s.key}"] = [s] * steps
    if len(space.names) > 1:
        mid = Subnet(tuple((a, c[len(c) // 2]) for a, c in space.axes))
        out[f"uniform {mid.key}"] = [mid] * steps
    half = steps // 2
    for axis in space.names:
        choices = space.choices(axis)
        small = full.replace(**{axis: choices[len(choices) // 2]})
        out[f"mixed: {small.key} then full (halves)"] = [small] * half + [full] * (steps - half)
        quarter = [choices[::-1][min(i * len(choices) // 4, len(choices) - 1)] for i in range(4)]
        ramp = [full.replace(**{axis: quarter[min(4 * i // steps, 3)]}) for i in range(steps)]
        out[f"mixed: {axis} ramp " + " > ".join(map(str, quarter))] = ramp
    return out


def judged(space: SubnetSpace, name: str, plan: list[Subnet]) -> bool:
    """Return True where the target applies: mixed schedules, and every subnet at width >= 0.5 and at
    least half the full depth."""
    if name.startswith("mixed"):
        return True
    full = space.full
    return all(s.get("width", 1.0) >= 0.5 and s.get("depth", 1) >= full.get("depth", 1) / 2 for s in plan)


def main() -> None:
    """Time every schedule at every batch size and print the ratios table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="search_spaces/digits.yaml")
    parser.add_argument("--supernet", help="a trained supernet directory (default: fresh weights from --config)")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--paths", nargs="+", default=["fused"], choices=["fused", "torch"],
                        help="fused: the CPU kernel where available (the default sampler); torch: torch's layers")
    parser.add_argument("--csv", help="also write the table here")
    args = parser.parse_args()
    if "fused" in args.paths and not kernels.available():
        print(f"note: the fused kernel is not used here ({kernels.why_unavailable() or 'not a CPU run'})")

    device = resolve_device(args.device)
    if args.supernet:
        supernet = load_supernet(args.supernet, device)
        model, cfg, flops = supernet.model, supernet.config, supernet.flops
    else:
        cfg = load_config(args.config)
        shape = (3, 32, 32) if cfg.data.kind == "cifar10" else (1, 8, 8) if cfg.data.kind == "digits" else None
        if shape is None:
            raise SystemExit("--config with data.kind folder needs --supernet (the image shape is not known)")
        model = build_supernet(cfg.model, shape).to(device).eval()
        supernet = in_memory(cfg, model, shape)
        flops = supernet.flops
    plans = schedules(model.space, args.steps)
    # exported once per backend, as a deployed sampler would: "fused" runs the kernel where it can
    runtimes = {path: Runtime(supernet, device=device, backend=path) for path in args.paths}
    for runtime in runtimes.values():
        for plan in plans.values():
            runtime.plan(plan)
    print(f"{datetime.date.today()} | {device}: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or platform.machine()}"
          f" | torch {torch.__version__} | threads {torch.get_num_threads()} | {cfg.name} {tuple(model.image_shape)}")


    def run(subnets: list[Subnet], batch: int, path: str) -> None:
        generate(runtimes[path].plan(subnets), n=batch, seed=0, batch_size=batch)

    rows = []
    full_name = "full size"
    for batch in args.batches:
        times: dict[tuple[str, str], list[float]] = {(path, name): [] for path in args.paths for name in plans}
        for path, name in times:  # warm-up: first calls pay for allocation, kernel selection and packing
            run(plans[name][:2], batch, path)
        for _ in range(args.repeats):
            for path, name in times:
                started = time.perf_counter()
                run(plans[name], batch, path)
                times[path, name].append(time.perf_counter() - started)
        full_flops = flops[model.full] * args.steps
        for path, name in times:
            plan, full_times = plans[name], times[path, full_name]
            seconds, full_time = statistics.median(times[path, name]), statistics.median(full_times)
            flops_ratio = sum(flops[s] for s in plan) / full_flops
            wall_ratio = seconds / full_time
            # each repetition timed this schedule and full size back to back: their ratios show the noise
            paired = [t / f / flops_ratio for t, f in zip(times[path, name], full_times)]
            row = {"batch": batch, "path": path, "schedule": name,
                   "GFLOPs/img": round(sum(flops[s] for s in plan) / 1e9, 3),
                   "seconds": round(seconds, 3), "images/s": round(batch / seconds, 1),
                   "flops ratio": round(flops_ratio, 3), "wall ratio": round(wall_ratio, 3),
                   "wall/flops": round(wall_ratio / flops_ratio, 2),
                   "wall/flops per repeat": f"{min(paired):.2f}-{max(paired):.2f}",
                   "target": ("ok" if wall_ratio <= TOLERANCE * flops_ratio else "MISSED")
                   if judged(model.space, name, plan) else "-"}
            if set(args.paths) == {"fused", "torch"}:
                row["x faster than torch"] = round(statistics.median(times["torch", name]) / seconds, 2) if path == "fused" else "-"
            rows.append(row)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
