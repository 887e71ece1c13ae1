"""The commands of method families: `finetune-exit` (early exit's heads), `finetune` (step groups'
per-group weights), `stages` (multi-stage boundaries) and `import-diffusers` (a pretrained model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DDSMError
from .args import add_device, add_quiet, add_renamed, add_train_steps, at_least, device_of, finite, positive, widths


def cmd_finetune_exit(args: argparse.Namespace) -> int:
    """Train AdaDiff certainty heads on a DiT supernet (its weights frozen) and keep them beside it."""
    from ..methods.early_exit.finetune import finetune_exit

    path = finetune_exit(args.supernet, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.train_seed,
                         device=device_of(args), progress=not args.quiet)
    print(f"exit heads written beside the supernet: {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune each group of a schedule on its own timesteps; write the weights and the new schedule."""
    from ..methods.step_groups.finetune import check_finetune_args, finetune_schedule

    check_finetune_args(Path(args.out), args.train_steps, args.batch_size, args.lr, args.distill, args.snr_groups)
    result = finetune_schedule(args.schedule, args.supernet, args.out, steps=args.train_steps, lr=args.lr,
                               batch_size=args.batch_size, distill=args.distill, snr_groups=args.snr_groups,
                               seed=args.train_seed, device=device_of(args), progress=not args.quiet)
    spans = ", ".join(f"steps {g.start}-{g.stop - 1} {g.subnet.key} (t {g.timesteps[0]}-{g.timesteps[1]}, "
                      f"loss {result.losses[k]:.4f})" for k, g in enumerate(result.groups))
    print(f"fine-tuned {len(result.groups)} group(s): {spans}; wrote {result.weights} and {result.schedule}")
    return 0


def _add_train_seed(p: argparse.ArgumentParser, what: str) -> None:
    """Add --train-seed (--seed, its old spelling here, means the initial noise's seed everywhere else)."""
    p.add_argument("--train-seed", type=int, default=0, help=f"seed of {what} (default 0)")
    add_renamed(p, "--seed", "--train-seed", type=int)


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

        supernet = load_supernet(args.supernet, device_of(args))
        if supernet.config.diffusion != cfg.diffusion:
            raise DDSMError(f"the supernet in {args.supernet} was trained with another noise schedule than "
                            f"{args.config}'s diffusion section")
        model = supernet.model.set_subnet(supernet.model.full)
    result = find_stages(cfg, args.k, args.cost, model=model, grid=args.grid, samples=args.samples,
                         seed=args.pairs_seed, balance=args.balance, segment_cost=args.segment_cost,
                         metric=args.metric, progress=not args.quiet)
    path, png = write_stages(result, out)
    print(describe(result))
    print(f"wrote {path} and {png}")
    return 0


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    """Import a diffusers UNet2DModel as a supernet."""
    from ..methods.pretrained.diffusers_unet import import_diffusers

    chosen = {} if args.widths is None else {"widths": args.widths}
    import_diffusers(args.model_dir, args.out, **chosen, config=args.config, name=args.name,
                     image_size=args.image_size, importance=args.importance, device=device_of(args),
                     progress=not args.quiet)
    return 0


def add_parsers(sub) -> None:
    """Add the method families' commands to the CLI's sub-parsers."""
    p = sub.add_parser("finetune-exit", help="train AdaDiff certainty heads on a DiT supernet (frozen), for "
                       "sample --exit-threshold")
    p.add_argument("supernet", help="a DiT supernet directory written by 'train'")
    add_train_steps(p, 500, "training steps (default 500)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--lr", type=finite, default=1e-3)
    _add_train_seed(p, "the heads' initial weights and batches")
    add_device(p)
    add_quiet(p)
    p.set_defaults(func=cmd_finetune_exit)

    p = sub.add_parser("finetune", help="fine-tune each group of a schedule's steps (its subnet) on its own "
                       "timesteps only (Step-Adaptive Training, reconstructed); writes the weights beside "
                       "the new schedule, which sample --schedule runs")
    p.add_argument("schedule", help="schedule JSON (from export, or one subnet per step by hand)")
    p.add_argument("--supernet", required=True, help="the schedule's supernet directory")
    p.add_argument("--out", required=True, help="the new schedule JSON; the weights go beside it as "
                   "<stem>.weights.safetensors")
    add_train_steps(p, 500, "training steps per group (default 500)")
    p.add_argument("--lr", type=finite, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--distill", type=finite, default=0.0, metavar="W",
                   help="loss = (1 - W) x MSE to the noise + W x MSE to the full-size supernet's prediction on the "
                   "same inputs (default 0: the diffusion loss alone)")
    p.add_argument("--snr-groups", type=positive, metavar="K",
                   help="also cut the schedule's runs of one subnet where its timesteps cross from one of K SNR "
                   "groups (equal spans of log-SNR) into another (default: the runs alone)")
    _add_train_seed(p, "each group's batches")
    add_device(p)
    add_quiet(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("stages", help="timestep stages for a multi-decoder U-Net: contiguous intervals by "
                       "dynamic programming over the optimal denoiser's, log-SNR or gradient dissimilarity")
    p.add_argument("config", help="experiment (a shipped config's name or a YAML file) whose training data "
                   "define the optimal denoiser")
    p.add_argument("--k", type=int, required=True, help="number of stages")
    p.add_argument("--cost", default="denoiser",
                   help="denoiser (default): change of E[x0|x_t] between timesteps; logsnr: |log SNR difference|; "
                   "gradient: 1 - cosine of the supernet's loss gradients (needs --supernet)")
    p.add_argument("--supernet", help="supernet directory written by 'train' (for --cost gradient)")
    p.add_argument("--out", required=True, help="directory for stages.json and similarity.png")
    p.add_argument("--grid", type=int, help="timesteps in the grid (default 100; 50 for gradient)")
    p.add_argument("--samples", type=int, help="(x0, noise) pairs (default 256), or the gradient's batch (default 64)")
    p.add_argument("--pairs-seed", type=int, default=0, help="seed of the (x0, noise) pairs (default 0)")
    add_renamed(p, "--seed", "--pairs-seed", type=int)
    p.add_argument("--balance", type=_balance, default=0.5,
                   help="every stage holds between (1 - B) and (1 + B) times the mean share of the grid (default "
                   "0.5, as the paper's code; none: no bound)")
    p.add_argument("--segment-cost", default="center",
                   help="center (default, the paper's): dissimilarity to the stage's middle timestep; pairwise: "
                   "over all pairs in the stage")
    p.add_argument("--metric", default="mse",
                   help="denoiser cost: mse (default) or pixels (the paper's share of pixels differing by 2/256)")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("import-diffusers", help="import a diffusers UNet2DModel (DDPM/ADM family) as a "
                       "supernet at full size, its outputs equal to the model's")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a UNet2DModel saved with save_pretrained (config.json "
                   "and weights), or a pipeline folder with unet/ and scheduler/")
    p.add_argument("--out", required=True, help="supernet directory to write (must not exist, or be empty)")
    p.add_argument("--widths", type=widths,
                   help="the widths the supernet serves, comma-separated (default 1,0.75,0.5,0.25)")
    p.add_argument("--config", help="experiment (a shipped config's name or a YAML file) whose data, sample and "
                   "search sections the supernet takes "
                   "(default: data guessed from the image shape)")
    p.add_argument("--name", help="experiment name (default: the --out folder's name)")
    p.add_argument("--image-size", type=at_least(1), help="image size, if config.json has no sample_size")
    p.add_argument("--importance", type=at_least(0), default=0, metavar="N",
                   help="order channels by Taylor importance on N training images first, so that each width "
                   "keeps the most important GroupNorm groups and heads (default 0: keep diffusers' order)")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_import_diffusers)
