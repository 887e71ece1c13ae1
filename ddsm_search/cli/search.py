"""`search`, `report`, `export` and `quickstart`: the flow from a supernet to a deployable schedule."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DDSMError
from .args import add_device, add_quiet, device_of, positive, seconds


def cmd_search(args: argparse.Namespace) -> int:
    """Search per-step schedules of subnets on the FLOPs-quality front."""
    from ..config import load_config
    from ..search.pareto import front_of
    from ..search.runner import run_search

    cfg = load_config(args.config)
    device = device_of(args)
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

    write_report(args.run, budget=args.budget, device=device_of(args), supernet=args.supernet, heldout=args.heldout,
                 bars=not args.quiet, baselines=args.baselines, timing=args.timing)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the best schedule within a FLOP budget, re-checked on the held-out seeds."""
    from ..deploy.export import export_schedule
    from ..deploy.speed import describe
    from ..solvers.base import Solver

    if args.out and Path(args.out).suffix.lower() != ".json":
        raise DDSMError(f"--out must end in .json, got {Path(args.out).name}")
    if args.budget is None and args.max_loss is None:
        raise DDSMError("export needs --budget, --max-loss or both")
    path, data = export_schedule(args.run, args.budget, args.out, max_loss=args.max_loss, confidence=args.confidence,
                                 heldout_samples=args.n, candidates=args.candidates, device=device_of(args),
                                 progress=not args.quiet, supernet=args.supernet, reference=args.reference)
    q = data["quality"]
    m, loss = q["metric"], q["loss"]

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    print(f"wrote {path}: {data['gflops_per_image']:.4f} GFLOPs per image ({data['flops_share']:.0%} of full size); "
          f"{m.upper()} {fmt(q['search'][m])} at search time, {fmt(q['heldout'][m])} on held-out noise (full size: "
          f"{fmt(q['full_size_heldout'][m])}, n={q['heldout']['samples']}); loss against full size "
          f"{loss['value']:.4g}, {loss['confidence']:.0%} interval [{loss['low']:.4g}, {loss['high']:.4g}]; "
          f"{len(q['confirmed'])} candidate(s) confirmed")
    solver = data["solver"]
    print(f"it runs {Solver(**solver).key} over {len(data['steps'])} steps: {describe(data['speed'])}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train, search, report and export on the embedded digits (or the experiment given)."""
    from ..config import load_config
    from ..pipeline import quickstart

    config = load_config(args.config) if args.config else None
    out = args.out or (f"results/quickstart-{config.name}" if config is not None else "results/quickstart")
    figures = quickstart(out, max_loss=args.max_loss, budget=args.budget, device=device_of(args),
                         progress=not args.quiet, config=config)
    if args.quiet:  # the result alone
        print(f"wrote {figures['schedule']}: {figures['flops_share']:.0%} of full size's FLOPs, held-out "
              f"{figures['metric'].upper()} {figures['heldout']:.4g} vs {figures['full_size_heldout']:.4g} at full size, "
              f"{figures['speedup']:.2f}x faster")
    return 0


def add_parsers(sub) -> None:
    """Add `search`, `report`, `export` and `quickstart` to the CLI's sub-parsers."""
    p = sub.add_parser("search", help="evolutionary search for per-step schedules (FLOPs vs quality)")
    p.add_argument("config", help="experiment (a shipped config's name or a YAML file) whose 'search' section "
                   "describes the search")
    p.add_argument("--supernet", required=True, help="supernet directory written by 'train'")
    p.add_argument("--out", help="run directory (default: results/<experiment name>-search)")
    p.add_argument("--generations", type=positive)
    p.add_argument("--population", type=positive)
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
    p.add_argument("--wait-for-workers", type=seconds, default=0.0, metavar="SECONDS",
                   help="if every Ray worker is lost, wait this long for restarted or new ones (default 0: stop; "
                   "--resume continues)")
    p.add_argument("--budget", help="max GFLOPs per image, or a share of full size such as 50%%")
    add_device(p, "cpu")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from what is on disk")
    add_quiet(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="print a search run's front and write its plots")
    p.add_argument("run", help="search run directory")
    p.add_argument("--budget", default="50%", help="also show the best schedule within this budget (default 50%%)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="leave out the baselines (full size per solver and number of steps, uniform caching)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="compare with the baselines on FLOPs only, without timing the front and them here")
    p.add_argument("--heldout", type=positive, metavar="N",
                   help="also re-score the front on N held-out images, print the Spearman rank correlation with "
                   "the search's scores and plot both fronts (kept in RUN/heldout.csv)")
    p.add_argument("--supernet", help="the run's supernet, if it moved since the search (its hash must match)")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the cheapest schedule that keeps full-size quality (--max-loss), or the "
                       "best within a FLOP budget, confirmed on held-out noise, as a deployable JSON")
    p.add_argument("run", help="search run directory")
    p.add_argument("--budget", help="GFLOPs per image, or a share of full size such as 50%%")
    p.add_argument("--max-loss", type=float, metavar="X",
                   help="largest loss against full size on held-out noise, in the run's metric (FID +X, or drift "
                   "X), at --confidence: exports the cheapest front schedule that meets it")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the loss interval (default 0.95)")
    p.add_argument("--reference", metavar="SOLVER:STEPS",
                   help="the full-size run --max-loss is measured against, on the uniform grid, e.g. unipc:20 or "
                   "ddim:50 (default: the search's sampler over its steps)")
    p.add_argument("--candidates", type=positive,
                   help="schedules to confirm (default: with --max-loss the whole front, cheapest first; "
                   "with --budget alone its 3 best)")
    p.add_argument("--out", help="schedule JSON (default: RUN/schedule_<budget>.json)")
    p.add_argument("--n", type=positive, help="held-out images for the check (default: max(4 x search samples, 1000))")
    p.add_argument("--supernet", help="the run's supernet, if it moved since the search (its hash must match)")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quickstart", help="train, search, report and export on the embedded digits "
                       "(or on the experiment given, e.g. digits-dit)")
    p.add_argument("config", nargs="?", help="experiment: a shipped config's name (ddsm-search configs) or a YAML "
                   "file (default: digits)")
    p.add_argument("--out", help="default: results/quickstart, or results/quickstart-<name> for a config")
    p.add_argument("--max-loss", type=float, default=0.05,
                   help="export the cheapest schedule within FID +X of full size on 2,000 held-out images at 95%% "
                   "confidence (default 0.05)")
    p.add_argument("--budget", help="also keep the export within this FLOP budget, e.g. 50%%")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_quickstart)
