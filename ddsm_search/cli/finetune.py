"""The `finetune` command (Step-Adaptive Training's per-group fine-tuning, reconstructed) and the
helpers with which `sample` and `evaluate` treat a schedule's group weights.

Kept apart from the stage so that building the CLI's parser imports neither numpy nor torch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import DDSMError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune each group of a schedule on its own timesteps; write the weights and the new schedule."""
    from ..methods.step_groups.finetune import check_finetune_args, finetune_schedule
    from ..sampling import resolve_device

    check_finetune_args(Path(args.out), args.steps, args.batch_size, args.lr, args.distill, args.snr_groups)
    result = finetune_schedule(args.schedule, args.supernet, args.out, steps=args.steps, lr=args.lr,
                               batch_size=args.batch_size, distill=args.distill, snr_groups=args.snr_groups,
                               seed=args.seed, device=resolve_device(args.device), progress=not args.quiet)
    spans = ", ".join(f"steps {g.start}-{g.stop - 1} {g.subnet.key} (t {g.timesteps[0]}-{g.timesteps[1]}, "
                      f"loss {result.losses[k]:.4f})" for k, g in enumerate(result.groups))
    print(f"fine-tuned {len(result.groups)} group(s): {spans}; wrote {result.weights} and {result.schedule}")
    return 0


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `finetune` command to the CLI's subparsers; return its parser."""
    p = subparsers.add_parser("finetune", help="fine-tune each group of a schedule's steps (its subnet) on its own "
                              "timesteps only (Step-Adaptive Training, reconstructed); writes the weights beside "
                              "the new schedule, which sample --schedule runs")
    p.add_argument("schedule", help="schedule JSON (from export, or one subnet per step by hand)")
    p.add_argument("--supernet", required=True, help="the schedule's supernet directory")
    p.add_argument("--out", required=True, help="the new schedule JSON; the weights go beside it as "
                   "<stem>.weights.safetensors")
    p.add_argument("--steps", type=_positive, default=500, help="training steps per group (default 500)")
    p.add_argument("--lr", type=_finite, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--distill", type=_finite, default=0.0, metavar="W",
                   help="loss = (1 - W) x MSE to the noise + W x MSE to the full-size supernet's prediction on the "
                   "same inputs (default 0: the diffusion loss alone)")
    p.add_argument("--snr-groups", type=_positive, metavar="K",
                   help="also cut the schedule's runs of one subnet where its timesteps cross from one of K SNR "
                   "groups (equal spans of log-SNR) into another (default: the runs alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)
    return p


def sampling_weights(args: argparse.Namespace, supernet, exit):
    """Return the group weights of `sample --schedule` (None without a schedule or weights); refuse them
    beside --exit-threshold."""
    if not getattr(args, "schedule", None):
        return None
    from ..schedule import load_schedule

    weights = load_schedule(args.schedule, supernet).weights
    if weights is not None and exit is not None:
        raise DDSMError(f"schedule {args.schedule} has fine-tuned group weights, which an exit policy "
                        "(--exit-threshold) cannot run with")
    return weights

