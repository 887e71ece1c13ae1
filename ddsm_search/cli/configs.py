"""`configs`: the experiment configs that ship with the package, listed, or one printed to start from."""

from __future__ import annotations

import argparse

from ..errors import DDSMError


def cmd_configs(args: argparse.Namespace) -> int:
    """List the shipped configs (name and what each is), or print one (`configs show NAME`)."""
    from ..config.shipped import describe, shipped_configs

    shipped = shipped_configs()
    if not shipped:
        raise DDSMError("no shipped experiment configs found beside the package (a broken install?)")
    if args.action == "show":
        if args.name not in shipped:
            raise DDSMError(f"no shipped config named {args.name!r} (shipped: {', '.join(shipped)})")
        print(shipped[args.name].read_text(encoding="utf-8"), end="")
        return 0
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {describe(path)}")
    print("\nrun one by name (ddsm-search train digits), or save one to edit: ddsm-search configs show digits > my.yaml")
    return 0


def add_parsers(sub) -> None:
    """Add `configs` to the CLI's sub-parsers."""
    p = sub.add_parser("configs", help="list the experiment configs that ship with ddsm-search, or print one "
                       "(configs show NAME) to start from; commands take a config by name or by path")
    actions = p.add_subparsers(dest="action", metavar="{show}", parser_class=type(p))
    show = actions.add_parser("show", help="print a shipped config's YAML")
    show.add_argument("name", help="a name from `ddsm-search configs`, e.g. digits")
    p.set_defaults(func=cmd_configs, action=None)
