"""The `ddsm-search` command line: parses arguments, calls the API, turns user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ..errors import DDSMError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        raise DDSMError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(what: str = "a finite number", at_least: float | None = None):
    """Return an argparse type: a finite float (nan would silently turn every image to zeros), at
    least `at_least` if given."""
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or (at_least is not None and value < at_least):
            bound = "" if at_least is None else f" >= {at_least:g}"
            raise argparse.ArgumentTypeError(f"must be {what}{bound}, got {text}")
        return value
    return parse


_eta = _number(at_least=0)  # DDIM's eta
_finite = _number()
_seconds = _number("a number of seconds", at_least=0)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a supernet from a YAML experiment."""
    from ..config import load_config
    from ..training import train

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("results") / cfg.name
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a directory")
    train(cfg, out, steps=args.steps, device=args.device, resume=args.resume, progress=not args.quiet)
    return 0


def _schedule_subnets(args: argparse.Namespace, supernet) -> tuple[list, str, float]:
    """Return (one subnet per step, sampler, eta) from --schedule, --subnet or --width and the sampler flags."""
    from ..schedule import load_schedule

    cfg = supernet.config.sample
    if args.schedule:
        schedule = load_schedule(args.schedule, supernet)
        if args.steps is not None and args.steps != schedule.steps:
            raise DDSMError(f"the schedule has {schedule.steps} subnets but --steps asks for {args.steps}")
        sampler = args.sampler or schedule.sampler
        eta = args.eta if args.eta is not None else schedule.eta
        subnets = supernet.step_subnets(schedule.subnets)
        return subnets, sampler, eta, _exit_policy(args, len(subnets), schedule.exit)
    # --width 0.5 is shorthand for --subnet width=0.5 (every other axis at its full value)
    subnet = supernet.model.check_subnet(args.subnet if args.subnet is not None else args.width)
    steps = args.steps or cfg.steps
    subnets = supernet.step_subnets([subnet] * steps)  # a multi-stage supernet: each step's stage from its t
    return (subnets, args.sampler or cfg.sampler, args.eta if args.eta is not None else cfg.eta,
            _exit_policy(args, steps, None))


def _exit_policy(args: argparse.Namespace, steps: int, policy):
    """Return the exit policy to sample with: --exit-threshold (every step) over the schedule's own."""
    from ..methods.early_exit.policy import ExitPolicy

    if args.exit_threshold is not None:
        return ExitPolicy.of(args.exit_threshold, steps)
    return policy if policy is not None and policy.dynamic else None


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample images from a supernet with one subnet at every step or a schedule file."""
    from ..checkpoint import load_supernet
    from ..images import OUTPUT_SUFFIXES, save_images
    from ..sampling import generate, resolve_device, time_against_full

    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DDSMError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out.name}")
    device = resolve_device(args.device)
    supernet = load_supernet(args.supernet, device)
    subnets, sampler, eta, exit = _schedule_subnets(args, supernet)
    kwargs = dict(n=args.n, seed=args.seed, sampler=sampler, eta=eta, batch_size=args.batch_size, device=device,
                  progress=not args.quiet, backend=args.backend or supernet.config.sample.backend)
    from .finetune import sampling_weights

    kwargs["weights"] = sampling_weights(args, supernet, exit)  # a schedule's fine-tuned group weights, if any
    gflops = supernet.schedule_flops(subnets) / 1e9
    full = supernet.full_schedule_flops(len(subnets)) / 1e9
    cost = f"{gflops:.3f} GFLOPs per image ({gflops / full:.0%} of full size)"
    record = None
    if exit is not None:  # AdaDiff's dynamic exit: FLOPs are those executed, per image
        from ..methods.early_exit.policy import ExitRecord
        from ..methods.early_exit.finetune import describe, executed, load_exit_heads

        record = ExitRecord()
        kwargs.update(exit=exit, heads=load_exit_heads(supernet, device), record=record)
    if args.compare:  # what a schedule buys: measured against full size on the same batch and noise
        images, seconds, full_seconds, paths = time_against_full(supernet.model, supernet.config.diffusion, subnets,
                                                                 **kwargs)
        from ..methods.early_exit.policy import step_label

        chosen = ", ".join(f"{step_label(s)} {p}" for s, p in paths.items())
        timing = (f"{seconds:.2f} s against {full_seconds:.2f} s at full size on the same batch and noise: "
                  f"{full_seconds / seconds:.2f}x faster (backends: {chosen})")
    else:
        started = time.perf_counter()
        images = generate(supernet.model, supernet.config.diffusion, subnets, **kwargs)
        timing = f"{time.perf_counter() - started:.2f} s"
    if record is not None:
        done = executed(supernet, subnets, record, args.n)
        depth = done["depth_per_step"]["mean"]
        cost = (f"exit policy {exit.key}: {describe(done['per_image'], full * 1e9)} (the static schedule: "
                f"{gflops:.3f}); mean depth per step {min(depth):.2f}-{max(depth):.2f}")
    save_images(out, images, subnets=[s.key for s in subnets], seed=args.seed)
    print(f"wrote {args.n} images to {out}: {cost}, {timing}")
    return 0


def cmd_finetune_exit(args: argparse.Namespace) -> int:
    """Train AdaDiff certainty heads on a DiT supernet (its weights frozen) and keep them beside it."""
    from ..methods.early_exit.finetune import finetune_exit
    from ..sampling import resolve_device

    path = finetune_exit(args.supernet, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=resolve_device(args.device), progress=not args.quiet)
    print(f"exit heads written beside the supernet: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a subnet or schedule: FID and KID against the training images (and drift from full size),
    GFLOPs per image, wall time."""
    from ..checkpoint import load_supernet
    from ..evaluation.quality import evaluate
    from ..io import write_json_atomic
    from ..metrics import default_extractor_for, get_extractor, seed_for
    from ..sampling import resolve_device

    if args.json and Path(args.json).suffix.lower() != ".json":
        raise DDSMError(f"--json must end in .json, got {Path(args.json).name}")
    if args.n < 2:
        raise DDSMError(f"--n must be at least 2 (FID needs a covariance), got {args.n}")
    seed_for(args.seeds)  # a bad seed set fails before anything slow runs
    device = resolve_device(args.device)
    supernet = load_supernet(args.supernet, device)
    subnets, sampler, eta, exit = _schedule_subnets(args, supernet)
    from .finetune import sampling_weights

    weights = sampling_weights(args, supernet, exit)  # a schedule's fine-tuned group weights, if any
    heads = None
    if exit is not None:  # a dynamic exit: FLOPs per image are those executed, measured while sampling
        from ..methods.early_exit.finetune import load_exit_heads

        heads = load_exit_heads(supernet, device)
    if args.drift and args.extractor is None:  # FID and KID where their extractor loads; drift in any case
        from ..evaluation.scoring import make_scorer

        scorer = make_scorer(supernet, metric="drift", device=device)
    else:
        from ..evaluation.quality import training_reference
        from ..evaluation.scoring import Scorer, drift_space_for

        extractor = get_extractor(args.extractor or default_extractor_for(supernet.config.data.kind), device)
        features = drift_space_for(supernet.config.data.kind, "auto") == "features"
        scorer = Scorer(extractor, training_reference(supernet.config.data, extractor, batch_size=args.batch_size),
                        extractor if features else None)
    result = evaluate(supernet, subnets, n=args.n, seed_set=args.seeds, scorer=scorer, device=device,
                      batch_size=args.batch_size, sampler=sampler, eta=eta, progress=not args.quiet, drift=args.drift,
                      backend=args.backend or supernet.config.sample.backend, exit=exit, heads=heads,
                      weights=weights)
    full = supernet.full_schedule_flops(len(subnets)) / 1e9
    fid = (f"FID {result['fid']:.4f}  KID {result['kid']:.5f} (+/- {result['kid_std']:.5f} over subsets)  "
           if result["extractor"] else "FID/KID n/a (no extractor here)  ")
    drift = f"drift {result['drift']:.4f} from full size ({result['drift_space']})  " if args.drift else ""
    spread = (f" +/- {result['executed']['flops_per_image']['sd'] / 1e9:.4f} executed, exit policy {exit.key}"
              if result["executed"] else "")
    print(f"{fid}{drift}{result['gflops_per_image']:.4f}{spread} GFLOPs per image "
          f"({result['gflops_per_image'] / full:.0%} of full size)  sampling {result['seconds']:.2f} s, scoring {result['eval_seconds']:.2f} s  "
          f"[n={result['n']}, seeds {result['seed_set']}, {result['extractor'] or 'pixels'}]")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search per-step schedules of subnets on the FLOPs-quality front."""
    from ..config import load_config
    from ..sampling import resolve_device
    from ..search.pareto import front_of
    from ..search.runner import run_search

    cfg = load_config(args.config)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path("results") / f"{cfg.name}-search"
    files = run_search(cfg, args.supernet, out, resume=args.resume, address=args.address, progress=not args.quiet,
                       device=device, generations=args.generations, population=args.population,
                       algorithm=args.algorithm, workers=args.workers, budget=args.budget,
                       wait_for_workers=args.wait_for_workers, executor=args.executor,
                       loggers=args.tune_logger or ())
    search = files.read_run()["search"]
    front = front_of(files.table(), search["metric"], search["samples"])
    print(f"{len(files.rows)} schedules evaluated; the front ({len(front)}) is in {out / 'front.csv'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print a search run's front and write its plots."""
    from ..report.writer import write_report
    from ..sampling import resolve_device

    write_report(args.run, budget=args.budget, device=resolve_device(args.device), supernet=args.supernet,
                 heldout=args.heldout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the best schedule within a FLOP budget, re-checked on the held-out seeds."""
    from ..deploy.export import export_schedule
    from ..sampling import resolve_device

    if args.out and Path(args.out).suffix.lower() != ".json":
        raise DDSMError(f"--out must end in .json, got {Path(args.out).name}")
    if args.budget is None and args.max_loss is None:
        raise DDSMError("export needs --budget, --max-loss or both")
    path, data = export_schedule(args.run, args.budget, args.out, max_loss=args.max_loss, confidence=args.confidence,
                                 heldout_samples=args.n, candidates=args.candidates, device=resolve_device(args.device),
                                 progress=not args.quiet, supernet=args.supernet)
    q = data["quality"]
    m, loss = q["metric"], q["loss"]

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    print(f"wrote {path}: {data['gflops_per_image']:.4f} GFLOPs per image ({data['flops_share']:.0%} of full size); "
          f"{m.upper()} {fmt(q['search'][m])} at search time, {fmt(q['heldout'][m])} on held-out noise (full size: "
          f"{fmt(q['full_size_heldout'][m])}, n={q['heldout']['samples']}); loss against full size "
          f"{loss['value']:.4g}, {loss['confidence']:.0%} interval [{loss['low']:.4g}, {loss['high']:.4g}]; "
          f"{len(q['confirmed'])} candidate(s) confirmed")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train, search, report and export on the embedded digits (or the experiment given)."""
    from ..config import load_config
    from ..pipeline import quickstart

    from ..sampling import resolve_device

    config = load_config(args.config) if args.config else None
    out = args.out or (f"results/quickstart-{config.name}" if config is not None else "results/quickstart")
    quickstart(out, max_loss=args.max_loss, budget=args.budget, device=resolve_device(args.device),
               progress=True, config=config)
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Add the supernet, the subnet or schedule, and the sampler options shared by sample and evaluate."""
    p.add_argument("supernet", help="supernet directory written by 'train'")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--subnet", help="run every step on this subnet, e.g. width=0.5,depth=6 (axes left out: full)")
    which.add_argument("--width", type=float, help="shorthand for --subnet width=W")
    which.add_argument("--schedule", help="schedule JSON: one subnet per sampling step")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the schedule's, else the config's")
    p.add_argument("--steps", type=_positive, help="sampling steps with --subnet/--width (default: the config's)")
    p.add_argument("--eta", type=_eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--batch-size", type=_positive, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", choices=["auto", "torch", "fused"],
                   help="how subnets run: torch's layers, the fused CPU kernel (U-Net), or auto: the faster here, "
                   "measured per subnet and batch size and remembered per machine (default: the config's "
                   "sample.backend, auto)")
    p.add_argument("--exit-threshold", type=_finite, metavar="T",
                   help="DiT with exit heads (finetune-exit): at every step each image leaves at the first depth "
                   "choice whose certainty reaches T (overrides a schedule's own exit policy); FLOPs are then "
                   "those executed per image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every sub-command."""
    parser = _Parser(prog="ddsm-search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a supernet (model.kind: unet or dit)")
    p.add_argument("config", help="experiment YAML, e.g. search_spaces/digits.yaml")
    p.add_argument("--out", help="checkpoint directory (default: results/<experiment name>)")
    p.add_argument("--steps", type=_positive, help="total training steps (overrides train.steps)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images with one subnet or a per-step schedule")
    _add_sampling_args(p)
    p.add_argument("--n", type=_positive, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .png (grid) or .npz (uint8 images)")
    p.add_argument("--compare", action="store_true",
                   help="also time full size on the same batch and noise (median of 3 turns each) and print "
                   "the speed-up")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("finetune-exit", help="train AdaDiff certainty heads on a DiT supernet (frozen), for "
                       "sample --exit-threshold")
    p.add_argument("supernet", help="a DiT supernet directory written by 'train'")
    p.add_argument("--steps", type=_positive, default=500)
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--lr", type=_finite, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_finetune_exit)

    p = sub.add_parser("evaluate", help="FID/KID, GFLOPs and wall time of one subnet or a schedule")
    _add_sampling_args(p)
    p.add_argument("--n", type=_positive, default=1000, help="number of generated images (default 1000)")
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

    p = sub.add_parser("search", help="evolutionary search for per-step schedules (FLOPs vs quality)")
    p.add_argument("config", help="experiment YAML whose 'search' section describes the search")
    p.add_argument("--supernet", required=True, help="supernet directory written by 'train'")
    p.add_argument("--out", help="run directory (default: results/<experiment name>-search)")
    p.add_argument("--generations", type=_positive)
    p.add_argument("--population", type=_positive)
    p.add_argument("--algorithm", choices=["nsga2", "nevergrad", "random"])
    p.add_argument("--workers", type=int, help="parallel evaluations on Ray (0: in this process, no Ray)")
    p.add_argument("--address", help="Ray cluster address, or auto (default: start a local Ray; inside a Ray job, "
                   "the job's cluster)")
    # not --backend: that names the kernel backend (search.backend, sample/evaluate --backend)
    p.add_argument("--executor", choices=["pool", "tune"],
                   help="where evaluations run: pool, the search's own Ray actor pool (default: search.executor, "
                   "pool), or tune, a Ray Tune experiment in OUT/tune with Tune's loggers and Tuner.restore on "
                   "--resume (--backend is the kernel backend's name)")
    p.add_argument("--tune-logger", action="append", choices=["mlflow", "wandb"], metavar="NAME",
                   help="with --executor tune: also log to MLflow or W&B (mlflow, wandb; repeatable) where "
                   "installed; Tune's CSV, JSON and TensorBoard logs are always written")
    p.add_argument("--wait-for-workers", type=_seconds, default=0.0, metavar="SECONDS",
                   help="if every Ray worker is lost, wait this long for restarted or new ones (default 0: stop; "
                   "--resume continues)")
    p.add_argument("--budget", help="max GFLOPs per image, or a share of full size such as 50%%")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from what is on disk")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="print a search run's front and write its plots")
    p.add_argument("run", help="search run directory")
    p.add_argument("--budget", default="50%", help="also show the best schedule within this budget (default 50%%)")
    p.add_argument("--heldout", type=_positive, metavar="N",
                   help="also re-score the front on N held-out images, print the Spearman rank correlation with "
                   "the search's scores and plot both fronts (kept in RUN/heldout.csv)")
    p.add_argument("--supernet", help="the run's supernet, if it moved since the search (its hash must match)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the cheapest schedule that keeps full-size quality (--max-loss), or the "
                       "best within a FLOP budget, confirmed on held-out noise, as a deployable JSON")
    p.add_argument("run", help="search run directory")
    p.add_argument("--budget", help="GFLOPs per image, or a share of full size such as 50%%")
    p.add_argument("--max-loss", type=float, metavar="X",
                   help="largest loss against full size on held-out noise, in the run's metric (FID +X, or drift "
                   "X), at --confidence: exports the cheapest front schedule that meets it")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the loss interval (default 0.95)")
    p.add_argument("--candidates", type=_positive,
                   help="schedules to confirm (default: with --max-loss the whole front, cheapest first; "
                   "with --budget alone its 3 best)")
    p.add_argument("--out", help="schedule JSON (default: RUN/schedule_<budget>.json)")
    p.add_argument("--n", type=_positive, help="held-out images for the check (default: max(4 x search samples, 1000))")
    p.add_argument("--supernet", help="the run's supernet, if it moved since the search (its hash must match)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    from .deploy import add_export_onnx_parser
    from .imports import add_import_parser
    from .stages import add_stages_parser
    from .finetune import add_finetune_parser

    add_import_parser(sub)  # import-diffusers
    add_export_onnx_parser(sub)  # export-onnx: ONNX graphs + manifest for deploy/onnx_sampler.py
    add_stages_parser(sub)
    add_finetune_parser(sub)  # finetune: per-group fine-tuned weights of a schedule

    p = sub.add_parser("quickstart", help="train, search, report and export on the embedded digits "
                       "(or on the experiment given, e.g. search_spaces/digits-dit.yaml)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: search_spaces/digits.yaml)")
    p.add_argument("--out", help="default: results/quickstart, or results/quickstart-<name> for a config")
    p.add_argument("--max-loss", type=float, default=0.05,
                   help="export the cheapest schedule within FID +X of full size on 2,000 held-out images at 95%% "
                   "confidence (default 0.05)")
    p.add_argument("--budget", help="also keep the export within this FLOP budget, e.g. 50%%")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for user errors)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DDSMError as exc:
        print(f"ddsm-search: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddsm-search: interrupted", file=sys.stderr)
        return 130
