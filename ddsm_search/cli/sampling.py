"""`sample` and `evaluate`: one subnet at every step, or a schedule file, run as a plan."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from ..errors import DDSMError
from ..solvers.names import SOLVERS, SPACINGS
from .args import add_device, add_quiet, add_sample_steps, add_seed, device_of, eta, finite, positive


def cache_option(text: str) -> tuple[int, int]:
    """Parse --cache INTERVAL[:BRANCH] (whole numbers, interval >= 1, branch >= 1)."""
    interval, _, branch = text.partition(":")
    try:
        values = int(interval), int(branch or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INTERVAL[:BRANCH] (whole numbers), got {text!r}") from None
    if values[0] < 1 or values[1] < 1:
        raise argparse.ArgumentTypeError(f"interval and branch must be >= 1, got {text!r}")
    return values


def _solver(args: argparse.Namespace, default):
    """Return the solver --solver (or --sampler) and --eta ask for, over `default`'s."""
    from ..solvers.base import Solver

    solver = Solver.parse(args.solver) if args.solver else default
    if args.eta is not None:
        solver = replace(solver, eta=args.eta)  # re-checked: only ddim takes an eta
    return solver


def _schedule(args: argparse.Namespace, supernet):
    """Return the schedule to run: --schedule FILE, or one subnet at every step (--subnet/--width), with
    --solver, --eta, --spacing, --cache and --exit-threshold applied (an early exit's threshold at every step,
    over the schedule's own policy), checked against the supernet."""
    from ..schedule import Schedule, check_against, load_schedule
    from ..solvers.base import Solver, timesteps_for

    cfg = supernet.config.sample
    if args.schedule:
        schedule = load_schedule(args.schedule, supernet)
        if args.sample_steps is not None and args.sample_steps != schedule.steps:
            raise DDSMError(f"the schedule has {schedule.steps} subnets but --sample-steps asks for {args.sample_steps}")
        schedule = replace(schedule, solver=_solver(args, schedule.solver))
    else:
        # --width 0.5 is shorthand for --subnet width=0.5 (every other axis at its full value)
        subnet = supernet.model.check_subnet(args.subnet if args.subnet is not None else args.width)
        schedule = Schedule([subnet] * (args.sample_steps or cfg.steps), solver=_solver(args, Solver.of_sampler(
            cfg.sampler, cfg.eta)))
    if args.spacing:
        schedule = replace(schedule, timesteps=timesteps_for(supernet.config.diffusion.timesteps, schedule.steps,
                                                             args.spacing))
    if args.cache is not None:
        from ..methods.caching.plugin import CacheSetting
        from ..methods.caching.steps import uniform

        owners = [s.replace(cache=None) for s in schedule.step_keys()]
        values = uniform(owners, *args.cache)
        schedule = replace(schedule, settings={**schedule.settings, "cache": CacheSetting(tuple(values))})
        check_against(schedule, supernet, args.schedule or "(--cache)")
    if args.exit_threshold is not None:
        from ..methods.early_exit.policy import ExitPolicy

        schedule = replace(schedule, settings={**schedule.settings,
                                               "exit": ExitPolicy.of(args.exit_threshold, schedule.steps)})
        check_against(schedule, supernet, args.schedule or "(--exit-threshold)")
    return schedule


def _plan(args: argparse.Namespace, backend: str | None = None):
    """Return (the supernet, the plan of what --schedule/--subnet/--width ask for) on --device."""
    from ..checkpoint import load_supernet
    from ..sampling import Runtime

    device = device_of(args)
    supernet = load_supernet(args.supernet, device)
    schedule = _schedule(args, supernet)
    runtime = Runtime(supernet, device=device, backend=backend or args.backend or supernet.config.sample.backend,
                      batch_size=min(args.n, args.batch_size))
    return supernet, runtime.plan_schedule(schedule)


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample images from a supernet with one subnet at every step or a schedule file."""
    from ..images import OUTPUT_SUFFIXES, save_images
    from ..sampling import describe_executed, executed_summary, generate, time_against_full
    from ..space.steps import ExecutedRecord

    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DDSMError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out.name}")
    supernet, plan = _plan(args)
    gflops = plan.flops() / 1e9
    full = plan.full().flops() / 1e9
    cost = f"{gflops:.3f} GFLOPs per image ({gflops / full:.0%} of full size)"
    record = ExecutedRecord() if plan.dynamic else None  # a dynamic step's FLOPs are those executed, per image
    kwargs = dict(n=args.n, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet, record=record)
    if args.compare:  # what a schedule buys: measured against full size on the same batch and noise
        images, seconds, full_seconds, paths = time_against_full(plan, **kwargs)
        chosen = ", ".join(f"{s} {p}" for s, p in paths.items())
        timing = (f"{seconds:.2f} s against {full_seconds:.2f} s at full size on the same batch and noise: "
                  f"{full_seconds / seconds:.2f}x faster (backends: {chosen})")
    else:
        started = time.perf_counter()
        images = generate(plan, **kwargs)
        timing = f"{time.perf_counter() - started:.2f} s"
    if record is not None:
        done = executed_summary(plan, record, args.n)
        per_step = "; ".join(f"mean {k.removesuffix('_per_step')} per step {min(v['mean']):.2f}-{max(v['mean']):.2f}"
                             for k, v in done.items() if k.endswith("_per_step"))
        cost = (f"{plan.key}: {describe_executed(done['per_image'], full * 1e9)} (the static schedule: "
                f"{gflops:.3f}){'; ' + per_step if per_step else ''}")
    save_images(out, images, subnets=[s.key for s in plan.subnets], seed=args.seed)
    print(f"wrote {args.n} images to {out}: {cost}, {timing}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a subnet or schedule: FID and KID against the training images (and drift from full size),
    GFLOPs per image, wall time."""
    from ..evaluation.quality import evaluate
    from ..evaluation.scoring import make_scorer, scorer_for
    from ..io import write_json_atomic
    from ..metrics import seed_for

    if args.json and Path(args.json).suffix.lower() != ".json":
        raise DDSMError(f"--json must end in .json, got {Path(args.json).name}")
    if args.n < 2:
        raise DDSMError(f"--n must be at least 2 (FID needs a covariance), got {args.n}")
    seed_for(args.seeds)  # a bad seed set fails before anything slow runs
    supernet, plan = _plan(args)
    device = plan.runtime.device
    if args.drift and args.extractor is None:  # FID and KID where their extractor loads; drift in any case
        scorer = make_scorer(supernet, metric="drift", device=device)
    else:
        scorer = scorer_for(supernet, extractor=args.extractor, device=device, batch_size=args.batch_size)
    result = evaluate(plan, scorer, n=args.n, seed_set=args.seeds, batch_size=args.batch_size,
                      progress=not args.quiet, drift=args.drift)
    full = plan.full().flops() / 1e9
    fid = (f"FID {result['fid']:.4f}  KID {result['kid']:.5f} (+/- {result['kid_std']:.5f} over subsets)  "
           if result["extractor"] else "FID/KID n/a (no extractor here)  ")
    drift = f"drift {result['drift']:.4f} from full size ({result['drift_space']})  " if args.drift else ""
    spread = (f" +/- {result['executed']['flops_per_image']['sd'] / 1e9:.4f} executed ({plan.key})"
              if result["executed"] else "")
    print(f"{fid}{drift}{result['gflops_per_image']:.4f}{spread} GFLOPs per image "
          f"({result['gflops_per_image'] / full:.0%} of full size)  sampling {result['seconds']:.2f} s, scoring "
          f"{result['eval_seconds']:.2f} s  [n={result['n']}, seeds {result['seed_set']}, "
          f"{result['extractor'] or 'pixels'}]")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Add the supernet, the subnet or schedule, and the sampler options shared by sample and evaluate."""
    p.add_argument("supernet", help="supernet directory written by 'train'")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--subnet", help="run every step on this subnet, e.g. width=0.5,depth=6 (axes left out: full)")
    which.add_argument("--width", type=float, help="shorthand for --subnet width=W")
    which.add_argument("--schedule", help="schedule JSON: one subnet per sampling step")
    p.add_argument("--solver", "--sampler", dest="solver", metavar="SOLVER",
                   help=f"how each step updates the latent: {', '.join(SOLVERS)}, with options such as "
                   "dpmsolver++(order=3) or ddim(eta=0.5) (default: the schedule's, else the config's sampler)")
    add_sample_steps(p, "sampling steps with --subnet/--width (default: the config's)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="timesteps: uniform (T-1 down to 0), or diffusers' linspace, leading, trailing "
                   "(default: the schedule's, else uniform)")
    p.add_argument("--eta", type=eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--batch-size", type=positive, default=500)
    add_device(p)
    p.add_argument("--backend", choices=["auto", "torch", "fused"],
                   help="how subnets run: torch's layers, the fused CPU kernel (U-Net), or auto: the faster here, "
                   "measured per subnet and batch size and remembered per machine (default: the config's "
                   "sample.backend, auto)")
    p.add_argument("--cache", type=cache_option, metavar="INTERVAL[:BRANCH]",
                   help="feature caching (DeepCache on a U-Net, block caching on a DiT): a full step every INTERVAL "
                   "steps, the steps between it run only the BRANCH outermost branches (U-Net skip branches, DiT "
                   "leading blocks; default 1) and reuse its features; overrides a schedule's own caching")
    p.add_argument("--exit-threshold", type=finite, metavar="T",
                   help="DiT with exit heads (finetune-exit): at every step each image leaves at the first depth "
                   "choice whose certainty reaches T (overrides a schedule's own exit policy); FLOPs are then "
                   "those executed per image")
    add_quiet(p)


def add_parsers(sub) -> None:
    """Add `sample` and `evaluate` to the CLI's sub-parsers."""
    p = sub.add_parser("sample", help="sample images with one subnet or a per-step schedule")
    _add_sampling_args(p)
    p.add_argument("--n", type=positive, default=64, help="number of images (default 64)")
    add_seed(p)
    p.add_argument("--out", required=True, help="output .png (grid) or .npz (uint8 images)")
    p.add_argument("--compare", action="store_true",
                   help="also time full size on the same batch and noise (median of 3 turns each) and print "
                   "the speed-up")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FID/KID, GFLOPs and wall time of one subnet or a schedule")
    _add_sampling_args(p)
    p.add_argument("--n", type=positive, default=1000, help="number of generated images (default 1000)")
    p.add_argument("--seeds", default="search", help="seed set of the initial noise: search (default), heldout, "
                   "or a replicate such as search/1")
    p.add_argument("--extractor", choices=["digits-cnn", "inception"],
                   help="feature network (default: digits-cnn for digits, inception otherwise; inception reads "
                   "clean-fid's inception-2015-12-05.pt from $DDSM_INCEPTION_WEIGHTS, never downloading)")
    p.add_argument("--drift", action="store_true",
                   help="also measure drift from full size on the same noise (full size's samples are kept "
                   "beside the supernet); without --extractor, FID and KID only where their extractor loads")
    p.add_argument("--json", help="also write the results to this .json file")
    p.set_defaults(func=cmd_evaluate)
