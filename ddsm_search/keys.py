"""Canonical text forms of widths and schedules: the keys used in files, caches and tables.

A width's key is Python's shortest round-trip form of the float (`repr`): `1.0`, `0.75`,
`0.6666666667`. Reading a key back gives exactly the same float, which `:g` formatting (6 significant
digits) does not: it turned 0.6666666667 into 0.666667, a width no supernet has.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .errors import DDSMError


def width_key(width: float) -> str:
    """Return the canonical text form of a width (exact: float(width_key(w)) == w)."""
    return repr(float(width))


def schedule_key(widths: Sequence[float]) -> str:
    """Return the text form of a schedule used as its key: width keys separated by spaces."""
    return " ".join(width_key(w) for w in widths)


def parse_schedule(key) -> list[float]:
    """Return the widths of a schedule key (raising DDSMError if it is not one)."""
    try:
        widths = [float(w) for w in str(key).split()]
    except ValueError:
        raise DDSMError(f"{key!r} is not a schedule key (widths separated by spaces)") from None
    if not widths:
        raise DDSMError("an empty schedule key")
    return widths


def canonical_schedule_key(key) -> str:
    """Return `key` in canonical form: run files written with `:g` widths ('1 0.75') read as '1.0 0.75'."""
    return schedule_key(parse_schedule(key))


def match_width(width: float, widths: Iterable[float], rel: float = 1e-6) -> float | None:
    """Return the width of `widths` equal to `width` within `rel` (relative), or None."""
    for w in widths:
        if abs(float(width) - w) <= rel * max(1.0, abs(w)):
            return w
    return None


def flops_by_width(stored: Mapping[str, int], widths: Sequence[float]) -> dict[float, int]:
    """Return a FLOPs table read from meta.json keyed by the model's own widths.

    Keys of older files were written with `:g`; each is matched to the model width it rounds from.
    """
    table = {}
    for key, flops in stored.items():
        width = match_width(float(key), widths)
        if width is None:
            raise DDSMError(f"the FLOPs table names width {key}, which the supernet does not have")
        table[width] = int(flops)
    missing = [w for w in widths if w not in table]
    if missing:
        raise DDSMError(f"the FLOPs table lacks widths {', '.join(width_key(w) for w in missing)}")
    return table
