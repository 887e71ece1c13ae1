"""The `import-diffusers` command: its arguments and the call into the importer.

Kept apart from the importer so that building the CLI's parser imports neither torch nor diffusers
(`ddsm-search --help` stays fast); cli.py adds it with `add_import_parser(subparsers)`.
"""

from __future__ import annotations

import argparse

def _widths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths such as 1,0.75,0.5, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one width")
    return values


def _count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    """Import a diffusers UNet2DModel as a supernet."""
    from ..methods.pretrained.diffusers_unet import import_diffusers

    widths = {} if args.widths is None else {"widths": args.widths}
    import_diffusers(args.model_dir, args.out, **widths, config=args.config, name=args.name,
                     image_size=args.image_size, importance=args.importance, progress=not args.quiet)
    return 0


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `import-diffusers` command to the CLI's sub-parsers; return its parser."""
    p = subparsers.add_parser("import-diffusers", help="import a diffusers UNet2DModel (DDPM/ADM family) as a "
                              "supernet at full size, its outputs equal to the model's")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a UNet2DModel saved with save_pretrained (config.json "
                   "and weights), or a pipeline folder with unet/ and scheduler/")
    p.add_argument("--out", required=True, help="supernet directory to write (must not exist, or be empty)")
    p.add_argument("--widths", type=_widths,
                   help="the widths the supernet serves, comma-separated (default 1,0.75,0.5,0.25)")
    p.add_argument("--config", help="experiment YAML whose data, sample and search sections the supernet takes "
                   "(default: data guessed from the image shape)")
    p.add_argument("--name", help="experiment name (default: the --out folder's name)")
    p.add_argument("--image-size", type=_count(1), help="image size, if config.json has no sample_size")
    p.add_argument("--importance", type=_count(0), default=0, metavar="N",
                   help="order channels by Taylor importance on N training images first, so that each width "
                   "keeps the most important GroupNorm groups and heads (default 0: keep diffusers' order)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_import_diffusers)
    return p
