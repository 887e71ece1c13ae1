"""Argument types and options every command shares, declared once.

Parsing a command line imports neither numpy nor torch: `ddsm-search --help` stays fast, and each
command imports what it runs only once it runs.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import DDSMError

DEVICES = ("auto", "cpu", "cuda")


PROG = "ddsm-search"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit status 2 (the CLI prints
    "ddsm-search: error: COMMAND: MESSAGE", the program's name once)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        command = self.prog.removeprefix(PROG).strip()
        raise DDSMError(f"{command}: {message}" if command else message)


class _Renamed(argparse.Action):
    """An old spelling of an option: stores into the new one's dest and says so on stderr, in one line."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{PROG}: note: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Keep the old spelling `old` of option `new` working (hidden from --help), with a deprecation note."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, action=_Renamed, new=new, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   **kwargs)


def positive(text: str) -> int:
    """Return a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def at_least(least: int):
    """Return an argparse type: a whole number >= `least`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def number(what: str = "a finite number", low: float | None = None, high: float | None = None):
    """Return an argparse type: a finite float (nan would silently turn every image to zeros), within
    [low, high] where given."""
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bound = "" if low is None and high is None else (
                f" >= {low:g}" if high is None else f" <= {high:g}" if low is None else f" in [{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"must be {what}{bound}, got {text}")
        return value
    return parse


finite = number()
eta = number(low=0)  # DDIM's eta
seconds = number("a number of seconds", low=0)


def widths(text: str) -> tuple[float, ...]:
    """Return comma-separated widths, e.g. 1,0.75,0.5."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths such as 1,0.75,0.5, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one width")
    return values


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """Add --device: where networks run."""
    p.add_argument("--device", default=default, choices=DEVICES,
                   help=f"where networks run: auto (CUDA if available), cpu or cuda (default {default})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """Add --quiet: no progress bars."""
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_seed(p: argparse.ArgumentParser) -> None:
    """Add --seed: the seed of the initial noise (what --seed means in every command that has it)."""
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")


def add_train_steps(p: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """Add --train-steps (training steps; the old spelling --steps still works, with a note)."""
    p.add_argument("--train-steps", type=positive, default=default, help=help)
    add_renamed(p, "--steps", "--train-steps", type=positive)


def add_sample_steps(p: argparse.ArgumentParser, help: str) -> None:
    """Add --sample-steps (sampling steps; the old spelling --steps still works, with a note)."""
    p.add_argument("--sample-steps", type=positive, help=help)
    add_renamed(p, "--steps", "--sample-steps", type=positive)


def device_of(args: argparse.Namespace) -> str:
    """Return the device --device asks for, checked ('auto' resolved)."""
    from ..sampling import resolve_device

    return resolve_device(args.device)
