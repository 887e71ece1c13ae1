"""The `stages` command: its arguments and the call into `ddsm_search.stages`.

Kept apart from the building block so that building the CLI's parser imports neither numpy nor torch
(`ddsm-search --help` stays fast); the names of costs are checked by `stages.check_stage_args`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DDSMError


def _balance(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or none, got {text}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or none, got {text}")
    return value


def cmd_stages(args: argparse.Namespace) -> int:
    """Find k timestep stages for an experiment, write stages.json and similarity.png, print the boundaries."""
    from ..config import load_config
    from ..methods.multistage.stages import check_stage_args, describe, find_stages, write_stages

    cfg = load_config(args.config)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a directory")
    if args.supernet and args.cost != "gradient":
        raise DDSMError("--supernet is only used by --cost gradient")
    check_stage_args(cfg.diffusion.timesteps, args.k, args.cost, bool(args.supernet), args.grid, args.samples,
                     args.balance, args.segment_cost, args.metric)
    model = None
    if args.supernet:
        from ..checkpoint import load_supernet
        from ..sampling import resolve_device

        supernet = load_supernet(args.supernet, resolve_device(args.device))
        if supernet.config.diffusion != cfg.diffusion:
            raise DDSMError(f"the supernet in {args.supernet} was trained with another noise schedule than "
                            f"{args.config}'s diffusion section")
        model = supernet.model.set_subnet(supernet.model.full)
    result = find_stages(cfg, args.k, args.cost, model=model, grid=args.grid, samples=args.samples, seed=args.seed,
                         balance=args.balance, segment_cost=args.segment_cost, metric=args.metric)
    path, png = write_stages(result, out)
    print(describe(result))
    print(f"wrote {path} and {png}")
    return 0


def add_stages_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `stages` command to the CLI's subparsers; return its parser."""
    p = subparsers.add_parser("stages", help="timestep stages for a multi-decoder U-Net: contiguous intervals by "
                              "dynamic programming over the optimal denoiser's, log-SNR or gradient dissimilarity")
    p.add_argument("config", help="experiment YAML whose training data define the optimal denoiser")
    p.add_argument("--k", type=int, required=True, help="number of stages")
    p.add_argument("--cost", default="denoiser",
                   help="denoiser (default): change of E[x0|x_t] between timesteps; logsnr: |log SNR difference|; "
                   "gradient: 1 - cosine of the supernet's loss gradients (needs --supernet)")
    p.add_argument("--supernet", help="supernet directory written by 'train' (for --cost gradient)")
    p.add_argument("--out", required=True, help="directory for stages.json and similarity.png")
    p.add_argument("--grid", type=int, help="timesteps in the grid (default 100; 50 for gradient)")
    p.add_argument("--samples", type=int, help="(x0, noise) pairs (default 256), or the gradient's batch (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance", type=_balance, default=0.5,
                   help="every stage holds between (1 - B) and (1 + B) times the mean share of the grid (default "
                   "0.5, as the paper's code; none: no bound)")
    p.add_argument("--segment-cost", default="center",
                   help="center (default, the paper's): dissimilarity to the stage's middle timestep; pairwise: "
                   "over all pairs in the stage")
    p.add_argument("--metric", default="mse",
                   help="denoiser cost: mse (default) or pixels (the paper's share of pixels differing by 2/256)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_stages)
    return p
