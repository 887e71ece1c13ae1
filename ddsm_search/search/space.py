"""The search space: a genome of width indices, one per segment of consecutive sampling steps.

A genome is a tuple of integers indexing `widths`; segment i covers a fixed run of sampling steps
(noisiest first), so a schedule of 50 steps can be searched with, say, 10 genes. Encoding and
decoding are exact for every schedule that is constant on each segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DDSMError

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Width choices, sampling steps and segments (consecutive steps that share one width)."""

    widths: tuple[float, ...]  # choices, largest first
    steps: int
    segments: int

    def __post_init__(self):
        if not self.widths:
            raise DDSMError("search.widths: needs at least one width")
        if not 1 <= self.segments <= self.steps:
            raise DDSMError(f"search.segments: must be between 1 and the {self.steps} sampling steps, got {self.segments}")
        object.__setattr__(self, "widths", tuple(sorted(self.widths, reverse=True)))

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Return the step range [start, stop) of each segment."""
        edges = np.linspace(0, self.steps, self.segments + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    @property
    def n_genes(self) -> int:
        """Return the genome length."""
        return self.segments

    @property
    def size(self) -> int:
        """Return the number of distinct schedules (genomes) in the space."""
        return self.n_choices ** self.n_genes

    @property
    def n_choices(self) -> int:
        """Return the number of width choices per gene."""
        return len(self.widths)

    def decode(self, genome: Sequence[int]) -> list[float]:
        """Return the schedule (one width per sampling step) a genome stands for."""
        if len(genome) != self.segments or not all(0 <= int(g) < self.n_choices for g in genome):
            raise DDSMError(f"genome {tuple(genome)} does not fit {self.segments} genes of {self.n_choices} choices")
        schedule: list[float] = []
        for gene, (start, stop) in zip(genome, self.bounds):
            schedule += [self.widths[int(gene)]] * (stop - start)
        return schedule

    def encode(self, schedule: Sequence[float]) -> Genome:
        """Return the genome of a schedule that is constant on every segment."""
        if len(schedule) != self.steps:
            raise DDSMError(f"the schedule has {len(schedule)} widths but the search samples {self.steps} steps")
        genome = []
        for start, stop in self.bounds:
            seg = set(schedule[start:stop])
            if len(seg) != 1:
                raise DDSMError(f"steps {start}..{stop - 1} use several widths {sorted(seg)}; one segment has one width")
            width = seg.pop()
            if width not in self.widths:
                raise DDSMError(f"width {width:g} is not a search choice ({', '.join(f'{w:g}' for w in self.widths)})")
            genome.append(self.widths.index(width))
        return tuple(genome)

    def uniform(self) -> list[Genome]:
        """Return the genomes of the uniform schedules (all-1.0, all-0.75, ...)."""
        return [(i,) * self.segments for i in range(self.n_choices)]

    def random(self, n: int, rng: np.random.Generator) -> list[Genome]:
        """Return `n` random genomes."""
        return [tuple(int(g) for g in row) for row in rng.integers(0, self.n_choices, (n, self.segments))]
