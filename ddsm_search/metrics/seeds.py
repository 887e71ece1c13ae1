"""Named seed sets for common random numbers: every candidate scored on a set sees the same initial noise.

`search` is the noise the search compares candidates on; `heldout` is noise it never sees, for
re-checking the winners. `search/k` and `heldout/k` are replicates (independent noise of the same
kind) for measuring how much a score moves with the noise; `search/0` is `search`. A set names the
seed of the one CPU generator that `sampling.generate` draws all n images' noise from, so the same
set gives the same noise at any n prefix and any batch size.
"""

from __future__ import annotations

from ..errors import DDSMError

SEARCH, HELDOUT = "search", "heldout"
BASE_SEEDS = {SEARCH: 1_000_003, HELDOUT: 2_000_003}  # far apart: replicates of one set never reach the other
MAX_REPLICATES = 10_000


def seed_for(seed_set: str) -> int:
    """Return the generator seed of a seed set such as 'search', 'heldout' or 'search/2'."""
    name, _, replicate = str(seed_set).partition("/")
    if name not in BASE_SEEDS:
        raise DDSMError(f"unknown seed set {seed_set!r} (choose {' or '.join(BASE_SEEDS)}, optionally with a replicate "
                        f"number: {SEARCH}/1)")
    if not replicate:
        return BASE_SEEDS[name]
    if not replicate.isdigit() or int(replicate) >= MAX_REPLICATES:
        raise DDSMError(f"seed set {seed_set!r}: the replicate after '/' must be a whole number below {MAX_REPLICATES}")
    return BASE_SEEDS[name] + int(replicate)


def replicates(seed_set: str, count: int) -> list[str]:
    """Return `count` replicate names of a seed set: 'search', 'search/1', ..., 'search/<count-1>'."""
    seed_for(seed_set)
    base = str(seed_set).partition("/")[0]
    return [base] + [f"{base}/{k}" for k in range(1, count)]


def is_heldout(seed_set: str) -> bool:
    """Return True if the seed set is (a replicate of) the held-out set the search must never use."""
    return str(seed_set).partition("/")[0] == HELDOUT
