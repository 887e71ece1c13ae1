"""A step's caching value and the rules a schedule's values follow.

Each step of a cached schedule has one of three values: none (a plain step), `keepB` (a full step that
keeps the features of branch B for the steps after it) or `reuseB` (a cached step: it runs only the B
outermost branches of the network and reuses what the most recent keep step kept for B). The branch
is the backbone's (`deep_forward`): on the U-Net the number of outermost skip branches a cached step
still runs (DeepCache's branch; 1: the input convolution and the last up stage), on the DiT the number
of leading blocks it runs fresh, the rest replaced by the change they made at the keep step.

Rules (`check_values`): the first step never reuses; a reuse step follows a keep step of the same
branch and the same network (subnet and anything else it runs), with only reuse steps of that branch
between them. `pattern(interval, branch, count)` gives a run of steps cached every `interval`: keep,
then interval - 1 reuses, and again (DeepCache's uniform 1:N strategy with N = interval).
"""

from __future__ import annotations

import re
from typing import Sequence

from ...errors import DDSMError

KEEP, REUSE = "keep", "reuse"
_VALUE = re.compile(r"^(keep|reuse)([1-9][0-9]*)$")


def value(role: str, branch: int) -> str:
    """Return the step value of a keep or reuse step at `branch`."""
    return f"{role}{int(branch)}"


def parse(text) -> tuple[str, int]:
    """Return (role, branch) of a step value such as 'keep2' or 'reuse2', or raise DDSMError."""
    match = _VALUE.match(text) if isinstance(text, str) else None
    if not match:
        raise DDSMError(f"{text!r} is not a caching value (keepB or reuseB, B a branch from 1, or null)")
    return match.group(1), int(match.group(2))


def pattern(interval: int, branch: int, count: int) -> list[str]:
    """Return the values of `count` steps cached every `interval` at `branch`: keep, then reuses."""
    return [value(KEEP if i % interval == 0 else REUSE, branch) for i in range(count)]


def uniform(owners: Sequence, interval: int, branch: int) -> list[str]:
    """Return the values of caching every `interval` steps at `branch` a schedule whose step i runs
    `owners[i]`: the pattern restarts (with a keep step) wherever the network changes."""
    out: list[str] = []
    for i, owner in enumerate(owners):
        if i == 0 or owner != owners[i - 1]:
            start = i
        out.append(value(KEEP if (i - start) % interval == 0 else REUSE, branch))
    return out


def check_values(values: Sequence, owners: Sequence | None = None) -> list[tuple[str, int] | None]:
    """Return each step's (role, branch) or None, checked against the rules above; `owners[i]` is what
    step i runs besides its caching (its subnet and other fields), which a reuse step must share with
    its keep step."""
    parsed = [None if v is None else parse(v) for v in values]
    kept = None  # (branch, owner) of the most recent keep step, while only reuses of it follow
    for i, entry in enumerate(parsed):
        owner = owners[i] if owners is not None else None
        if entry is None:
            kept = None
        elif entry[0] == KEEP:
            kept = (entry[1], owner)
        elif i == 0:
            raise DDSMError("step 0 reuses cached features, but the first step has none to reuse (it never caches)")
        elif kept is None:
            raise DDSMError(f"step {i} reuses cached features, but no keep step comes before it (a plain step "
                            "between them runs no cache)")
        elif kept[0] != entry[1]:
            raise DDSMError(f"step {i} reuses branch {entry[1]}, but the keep step before it kept branch {kept[0]}")
        elif kept[1] != owner:
            raise DDSMError(f"step {i} runs {owner}, not what its keep step ran ({kept[1]}): cached features "
                            "are reused by the same network only")
    return parsed
