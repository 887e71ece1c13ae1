"""The `ddsm-search` command line: parses arguments, calls the API, turns user errors into one line + exit 2.

One module per command family adds its commands: training (train), sampling (sample, evaluate), search (search,
report, export, quickstart), methods (finetune-exit, finetune, stages, import-diffusers), deploy
(export-onnx) and configs (the shipped experiment configs); `args` holds the argument types and options they share.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import DDSMError
from . import configs, deploy, methods, sampling, search, training
from .args import PROG, Parser

FAMILIES = (training, sampling, search, methods, deploy, configs)  # in the order `--help` lists their commands


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every sub-command."""
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in FAMILIES:
        family.add_parsers(sub)
    return parser


def os_error_line(exc: OSError) -> str:
    """Return an OS error as one line naming the path (permission denied, a full disk, a path under /proc)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {what}" if paths else what


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for user errors, OS errors included)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DDSMError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # reading or writing failed: the files written so far are whole (atomic writes)
        print(f"{PROG}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddsm-search: interrupted", file=sys.stderr)
        return 130
