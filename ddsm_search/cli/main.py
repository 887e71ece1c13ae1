"""The `ddsm-search` command line: parses arguments, calls the API, turns user errors into one line + exit 2.

One module per command family adds its commands: training (train), sampling (sample, evaluate), search (search,
report, export, quickstart), methods (finetune-exit, finetune, stages, import-diffusers), deploy
(export-onnx) and configs (the shipped experiment configs); `args` holds the argument types and options they share.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DDSMError
from . import configs, deploy, methods, sampling, search, training
from .args import Parser

FAMILIES = (training, sampling, search, methods, deploy, configs)  # in the order `--help` lists their commands


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every sub-command."""
    parser = Parser(prog="ddsm-search", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in FAMILIES:
        family.add_parsers(sub)
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
