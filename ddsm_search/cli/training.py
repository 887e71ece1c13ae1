"""`train`: a supernet from a YAML experiment."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DDSMError
from .args import add_device, add_quiet, add_train_steps


def cmd_train(args: argparse.Namespace) -> int:
    """Train a supernet from a YAML experiment."""
    from ..config import load_config
    from ..training import train

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("results") / cfg.name
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a directory")
    train(cfg, out, steps=args.train_steps, device=args.device, resume=args.resume, progress=not args.quiet)
    return 0


def add_parsers(sub) -> None:
    """Add `train` to the CLI's sub-parsers."""
    p = sub.add_parser("train", help="train a supernet (model.kind: unet, dit or multistage)")
    p.add_argument("config", help="experiment: a shipped config by name (ddsm-search configs), e.g. digits, or a "
                   "YAML file")
    p.add_argument("--out", help="checkpoint directory (default: results/<experiment name>)")
    add_train_steps(p, None, "total training steps (overrides train.steps)")
    add_device(p)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    add_quiet(p)
    p.set_defaults(func=cmd_train)
