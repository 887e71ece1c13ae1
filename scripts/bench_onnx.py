"""Sampling speed of an exported ONNX schedule (numpy + onnxruntime) against torch's `generate`.

For a schedule and for full size (the full subnet at every step, same sampler and steps), export both
to ONNX, then time torch's `generate` (static exported subnets, made once) and `OnnxSampler` with one
session and with two single-thread sessions in two threads, on the same batch and noise; each time is
the median of --repeats turns, the paths taking turns so drift in machine speed hits all alike. The
images of every path are compared with torch's (max |difference|).

    python scripts/bench_onnx.py --supernet results/digits --schedule results/digits-search/schedule_50%.json
    python scripts/bench_onnx.py --supernet /tmp/onnx_digits          # a width ramp, smallest first

Without --schedule the schedule is a ramp over the width choices, the smallest on the noisiest
quarter of the steps and full width on the last (`--steps`, default the config's sample.steps), under
`--solver` (default the config's sampler) on `--spacing`'s timesteps; every solver runs in ONNX (DDIM
and DDPM written out, the others as the manifest's linear form).

    python scripts/bench_onnx.py --supernet /tmp/onnx_digits --solver unipc --spacing trailing --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddsm_search.backends.choice import cpu_name  # noqa: E402
from ddsm_search.checkpoint import load_supernet  # noqa: E402
from ddsm_search.deploy.onnx_export import export_onnx  # noqa: E402
from ddsm_search.deploy.onnx_sampler import OnnxSampler  # noqa: E402
from ddsm_search.sampling import (
    Runtime,  # noqa: E402
    generate,  # noqa: E402
)
from ddsm_search.schedule import Schedule, load_schedule, save_schedule  # noqa: E402
from ddsm_search.solvers.base import Solver, timesteps_for  # noqa: E402
from ddsm_search.solvers.names import SPACINGS  # noqa: E402
from ddsm_search.space.subnet import schedule_key  # noqa: E402


def ramp(supernet, steps: int) -> list:
    """Return a width ramp: the width choices smallest first over equal quarters of the steps."""
    widths = supernet.model.space.choices("width")[::-1]
    quarter = [widths[min(i * len(widths) // 4, len(widths) - 1)] for i in range(4)]
    return [supernet.model.check_subnet(quarter[min(4 * i // steps, 3)]) for i in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet", required=True)
    parser.add_argument("--schedule", help="schedule JSON (default: a width ramp, see above)")
    parser.add_argument("--steps", type=int, help="steps of the default ramp (default: the config's sample.steps)")
    parser.add_argument("--solver", help="solver of the default ramp, e.g. ddim, dpmsolver++(order=3), unipc, euler "
                        "(default: the config's sample.sampler)")
    parser.add_argument("--spacing", default="uniform", choices=SPACINGS, help="timesteps of the default ramp")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch", choices=["torch", "auto", "fused"],
                        help="torch's path (default torch's layers; auto: the faster of torch and the fused kernel)")
    args = parser.parse_args()

    import onnxruntime

    supernet = load_supernet(args.supernet)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    try:
        bench(args, supernet, work, onnxruntime.__version__)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, supernet, work: Path, ort_version: str) -> None:
    """Export, time and print (see the module's docstring); temporary files go into `work`."""
    model = supernet.model
    if args.schedule:
        schedule = load_schedule(args.schedule, supernet)
        schedule_path = Path(args.schedule)
    else:
        steps = args.steps or supernet.config.sample.steps
        solver = Solver.parse(args.solver) if args.solver else \
            Solver.of_sampler(supernet.config.sample.sampler, supernet.config.sample.eta)
        schedule = Schedule(subnets=ramp(supernet, steps), solver=solver,
                            timesteps=timesteps_for(supernet.config.diffusion.timesteps, steps, args.spacing))
        schedule_path = save_schedule(work / "schedule.json", schedule, supernet)
    subnets = [model.check_subnet(s) for s in schedule.subnets]
    full = Schedule(subnets=[model.full] * len(subnets), solver=schedule.solver, timesteps=schedule.timesteps)
    plans = {"schedule": (subnets, schedule_path), "full size": (full.subnets, save_schedule(work / "full.json", full,
                                                                                           supernet))}
    n, steps = args.batch, len(subnets)
    g = torch.Generator().manual_seed(args.seed)  # the draws `generate` makes from this seed, in its order
    noise = torch.randn((n, *supernet.image_shape), generator=g)
    # one noise per step but the last, as `generate` draws them (SDE-DPM-Solver++'s last, unused, aside)
    step_noise = np.stack([torch.randn(noise.shape, generator=g).numpy() for _ in range(steps - 1)]) \
        if schedule.solver.stochastic else None
    runners, reference, chosen = {}, {}, {}
    for name, (plan, path) in plans.items():
        started = time.perf_counter()
        folder, _ = export_onnx(path, work / f"onnx-{name.replace(' ', '-')}", supernet=supernet)
        print(f"exported {name} in {time.perf_counter() - started:.1f} s: {folder}", flush=True)
        runtime = Runtime(supernet, backend=args.backend, batch_size=n)
        torch_plan = runtime.plan(plan, solver=schedule.solver, timesteps=schedule.timesteps)
        chosen.update(runtime.backends())

        def torch_run(torch_plan=torch_plan):
            return generate(torch_plan, n=n, seed=args.seed, batch_size=n).numpy()

        runners[(name, "torch")] = torch_run
        for sessions in (1, 2):
            sampler = OnnxSampler(folder, sessions=sessions)
            runners[(name, f"onnx x{sessions}")] = (
                lambda sampler=sampler: sampler.sample(n, noise=noise.numpy(), step_noise=step_noise))
    for key, run in runners.items():  # warm-up: allocation and kernel choice are not sampling speed
        out = run()
        if key[1] == "torch":
            reference[key[0]] = out
        else:
            reference[key] = float(np.abs(out - reference[key[0]]).max())
    seconds = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, run in runners.items():
            started = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - started)
    median = {key: statistics.median(v) for key, v in seconds.items()}

    gflops = supernet.schedule_flops(subnets) / 1e9
    print(f"\n{datetime.date.today()} | {cpu_name()} | {torch.get_num_threads()} torch threads, onnxruntime "
          f"{ort_version}, torch {torch.__version__} | batch {n}, {steps} {schedule.solver} steps, "
          f"median of {args.repeats} | torch path: {args.backend} ("
          + ", ".join(f"{k} {v}" for k, v in chosen.items()) + ")")
    print(f"schedule: {schedule_key(subnets)} ({gflops:.3f} GFLOPs per image, "
          f"{gflops / (supernet.full_flops * steps / 1e9):.0%} of full size)\n")
    paths = ["torch", "onnx x1", "onnx x2"]
    print("| plan | " + " | ".join(f"{p} s" for p in paths) + " | onnx x1 vs torch | onnx x2 vs torch | "
          "max |onnx - torch| |")
    print("|---|" + "---|" * (len(paths) + 3))
    for name in plans:
        t = [median[(name, p)] for p in paths]
        diff = max(reference[(name, p)] for p in paths[1:])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in t) + f" | {t[0] / t[1]:.2f}x | {t[0] / t[2]:.2f}x | "
              f"{diff:.1e} |")
    print("\nschedule against full size on the same path: " + ", ".join(
        f"{p} {median[('full size', p)] / median[('schedule', p)]:.2f}x" for p in paths)
          + f"; the schedule on onnx x2 against full size on torch: "
          f"{median[('full size', 'torch')] / median[('schedule', 'onnx x2')]:.2f}x")
    print("per-turn seconds: " + "; ".join(f"{k[0]}/{k[1]} " + ", ".join(f"{v:.2f}" for v in s)
                                           for k, s in seconds.items()))


if __name__ == "__main__":
    main()
