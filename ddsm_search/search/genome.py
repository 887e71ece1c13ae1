"""The search space: a genome of choice indices, one gene per searched axis per segment of steps.

Segment i covers a fixed run of consecutive sampling steps (noisiest first); on it every searched
axis has one gene, an index into that axis's choices (largest first). Axes that are not searched stay
at their full value. The genome is axis-major: all width genes, then all depth genes. Method families
may add genes per segment for their step field (space.plugins `genes`), after the axes' genes, in the
table's order: early exit's threshold gene (0 is "off", i > 0 the i-th threshold, highest first; the
depth gene is then the cap the exit may not pass). Encoding and decoding are exact for every schedule
that is constant on each segment.

A supernet whose space has a step axis (a multi-stage U-Net's stage) gets no gene for it: each step's
value is fixed by the sampler's timestep (`step_values`, from `for_supernet`), so a segment that
crosses a stage boundary runs its width gene at each of its steps' stages, and decoded schedules
carry the stage per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DDSMError
from ..space.plugins import families
from ..space.steps import Step
from ..space.subnet import Subnet, SubnetSpace

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The searched axes and their choices, the sampling steps, and the segments of steps."""

    searched: SubnetSpace  # the axes searched, each with its choices (largest first)
    base: Subnet  # every axis of the supernet at the value it keeps when not searched (full)
    steps: int
    segments: int
    genes: tuple = ()  # method families' genes per segment (space.plugins: Genes), in the table's order
    step_axis: str | None = None  # an axis each step's timestep decides (a multi-stage U-Net's stage), not searched
    step_values: tuple[int, ...] = ()  # its value at each step

    def __post_init__(self):
        if not self.searched.axes:
            raise DDSMError("search.axes: needs at least one axis")
        if not 1 <= self.segments <= self.steps:
            raise DDSMError(f"search.segments: must be between 1 and the {self.steps} sampling steps, got {self.segments}")
        if self.step_axis is not None and len(self.step_values) != self.steps:
            raise DDSMError(f"the {self.step_axis} of each of the {self.steps} steps is needed, got "
                            f"{len(self.step_values)}")

    @classmethod
    def of(cls, supernet_space: SubnetSpace, steps: int, segments: int, axes: Sequence[str] | None = None,
           choices: dict | None = None, genes: Sequence = (), step_values: Sequence[int] | None = None) -> "SearchSpace":
        """Return the space searching `axes` (default: all of the supernet's but its step axis) with
        `choices` (default: all), method families' `genes` per segment, and, for a supernet with a step
        axis, its value at each step (`step_values`)."""
        step_axis = supernet_space.step_axis
        if step_axis is not None and (step_axis in (axes or ()) or step_axis in (choices or {})):
            raise DDSMError(f"search.axes: the {step_axis} follows each step's timestep; it is not searched")
        if step_axis is not None and step_values is None:
            raise DDSMError(f"a supernet with a {step_axis} axis needs each step's {step_axis} "
                            "(SearchSpace.for_supernet)")
        axes = list(axes) if axes is not None else [a for a in supernet_space.names if a != step_axis]
        picked = {}
        for axis in axes:
            mine = supernet_space.choices(axis)
            wanted = (choices or {}).get(axis)
            picked[axis] = mine if wanted is None else [supernet_space.check({axis: v})[axis] for v in wanted]
        return cls(SubnetSpace.of(picked), supernet_space.full, steps, segments, tuple(genes), step_axis,
                   tuple(step_values or ()))

    @classmethod
    def of_search(cls, supernet_space: SubnetSpace, q, step_values: Sequence[int] | None = None) -> "SearchSpace":
        """Return the space a SearchConfig describes (with the genes its method families add)."""
        genes = [g for f in families() if (g := f.genes(supernet_space, q)) is not None]
        return cls.of(supernet_space, q.steps, q.segments, q.axes, q.choices, genes, step_values)

    @classmethod
    def for_supernet(cls, supernet, q) -> "SearchSpace":
        """Return the space a SearchConfig describes on a loaded supernet (checkpoint.Supernet), with the
        step axis's value at each of its sampler's steps where the supernet has one."""
        space = supernet.model.space
        values = None
        if space.step_axis is not None:
            values = [s[space.step_axis] for s in supernet.step_subnets([supernet.model.full] * q.steps)]
        return cls.of_search(space, q, values)

    @property
    def axes(self) -> tuple[str, ...]:
        """Return the searched axes."""
        return self.searched.names

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Return the step range [start, stop) of each segment."""
        edges = np.linspace(0, self.steps, self.segments + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    @property
    def gene_choices(self) -> list[int]:
        """Return the number of choices of each gene, in genome order."""
        extra = [g.choices for g in self.genes for _ in range(self.segments)]
        return [len(self.searched.choices(a)) for a in self.axes for _ in range(self.segments)] + extra

    @property
    def n_genes(self) -> int:
        """Return the genome length."""
        return (len(self.axes) + len(self.genes)) * self.segments

    @property
    def size(self) -> int:
        """Return the number of distinct schedules (genomes) in the space."""
        return int(np.prod([float(n) for n in self.gene_choices])) if self.n_genes < 60 else 2**62

    def subnets(self) -> list[Subnet]:
        """Return every subnet a schedule of this space can run, largest first (with a step axis: at
        each of its values the steps take, highest first)."""
        plain = [self.subnet(s.as_dict()) for s in self.searched]
        if self.step_axis is None:
            return plain
        return [s.replace(**{self.step_axis: v}) for v in sorted(set(self.step_values), reverse=True) for s in plain]

    def at_step(self, subnet: Subnet, step: int) -> Subnet:
        """Return `subnet` as step `step` runs it (with the step axis's value there, if there is one)."""
        return subnet if self.step_axis is None else subnet.replace(**{self.step_axis: self.step_values[step]})

    def cheapest(self, cost) -> list[Subnet]:
        """Return the schedule whose steps each run the subnet of least `cost(subnet)` that step can run."""
        plain = [self.subnet(s.as_dict()) for s in self.searched]
        return [min((self.at_step(s, i) for s in plain), key=cost) for i in range(self.steps)]

    def subnet(self, values: dict) -> Subnet:
        """Return the supernet's subnet with the searched axes at `values` and the others at base."""
        return self.base.replace(**values)

    def _check(self, genome: Sequence[int]) -> None:
        counts = self.gene_choices
        if len(genome) != self.n_genes or not all(0 <= int(g) < n for g, n in zip(genome, counts)):
            raise DDSMError(f"genome {tuple(genome)} does not fit {self.n_genes} genes with {counts} choices")

    def plan(self, genome: Sequence[int]) -> list[Step]:
        """Return the steps a genome stands for: its subnets, and the values its families' genes decode
        (a value may depend on the segment's subnet: several genomes may then stand for one schedule,
        which the search evaluates once, by its key)."""
        subnets = self.decode(genome)
        values: dict[str, list] = {}
        for k, genes in enumerate(self.genes):
            offset = (len(self.axes) + k) * self.segments
            per_step = []
            for seg, (start, stop) in enumerate(self.bounds):
                per_step += [genes.decode(genome[offset + seg], subnets[start])] * (stop - start)
            if any(v is not None for v in per_step):
                values[genes.field] = per_step
        return [Step.of(s, **{f: v[i] for f, v in values.items()}) for i, s in enumerate(subnets)]

    def decode(self, genome: Sequence[int]) -> list[Subnet]:
        """Return the schedule (one subnet per sampling step) a genome stands for."""
        self._check(genome)
        schedule: list[Subnet] = []
        for seg, (start, stop) in enumerate(self.bounds):
            values = {a: self.searched.choices(a)[int(genome[k * self.segments + seg])] for k, a in enumerate(self.axes)}
            schedule += [self.at_step(self.subnet(values), i) for i in range(start, stop)]
        return schedule

    def encode(self, schedule: Sequence) -> Genome:
        """Return the genome of a schedule (steps, or subnets) that is constant on every segment and keeps
        unsearched axes at base."""
        if len(schedule) != self.steps:
            raise DDSMError(f"the schedule has {len(schedule)} subnets but the search samples {self.steps} steps")
        steps = [s if isinstance(s, Step) else Step(s) for s in schedule]
        genome = [0] * self.n_genes
        fields = {g.field: k for k, g in enumerate(self.genes)}
        unknown = sorted({f for s in steps for f in s.fields} - set(fields))
        if unknown:
            raise DDSMError(f"this search space has no genes for the steps' {unknown[0]} (search settings of its family)")
        for name, k in fields.items():
            for seg, (start, stop) in enumerate(self.bounds):
                distinct = {s.get(name) for s in steps[start:stop]}
                if len(distinct) != 1:
                    raise DDSMError(f"steps {start}..{stop - 1} use several values of {name}; one segment has one")
                genome[(len(self.axes) + k) * self.segments + seg] = self.genes[k].encode(distinct.pop())
        schedule = [s.subnet for s in steps]
        for seg, (start, stop) in enumerate(self.bounds):
            distinct = set(self._off_step(s, i) for i, s in enumerate(schedule[start:stop], start))
            if len(distinct) != 1:
                raise DDSMError(f"steps {start}..{stop - 1} use several subnets "
                                f"({', '.join(sorted(s.key for s in distinct))}); one segment has one subnet")
            subnet = distinct.pop()
            for axis, value in subnet.items:
                if axis in self.axes:
                    choices = self.searched.choices(axis)
                    if value not in choices:
                        raise DDSMError(f"{axis} {value!r} is not a search choice ({', '.join(map(repr, choices))})")
                    genome[self.axes.index(axis) * self.segments + seg] = choices.index(value)
                elif value != self.base[axis]:
                    raise DDSMError(f"{axis} is not searched here and stays at {self.base[axis]!r}, not {value!r}")
        return tuple(genome)

    def _off_step(self, subnet: Subnet, step: int) -> Subnet:
        """Return `subnet` without the step axis, checking that it has that step's value (or none)."""
        if self.step_axis is None:
            return subnet
        values = subnet.as_dict()
        value = values.pop(self.step_axis, self.step_values[step])
        if value != self.step_values[step]:
            raise DDSMError(f"step {step} runs {self.step_axis} {self.step_values[step]}, not {value} "
                            f"({subnet.key}): the {self.step_axis} follows the step's timestep")
        return Subnet.of(**values)

    def first(self, seeds: Sequence[Genome] = ()) -> list[Genome]:
        """Return the genomes every first generation starts with: the uniform schedules, then `seeds`
        (e.g. Step-Adaptive Training's prior schedule), each once."""
        return list(dict.fromkeys([*self.uniform(), *(tuple(int(g) for g in s) for s in seeds)]))

    def uniform(self) -> list[Genome]:
        """Return the genomes of the uniform schedules of every axis: each choice of one axis at every
        step, the other searched axes at their largest (full size first, once); then, for each family's
        genes, full size with each of its sweep's genes at every step (early exit: each threshold)."""
        out: list[Genome] = []
        for k, axis in enumerate(self.axes):
            for i in range(len(self.searched.choices(axis))):
                genome = [0] * self.n_genes
                genome[k * self.segments:(k + 1) * self.segments] = [i] * self.segments
                if tuple(genome) not in out:
                    out.append(tuple(genome))
        for k, genes in enumerate(self.genes):  # each family's sweep at full size
            offset = (len(self.axes) + k) * self.segments
            for gene in genes.sweep():
                genome = [0] * self.n_genes
                genome[offset:offset + self.segments] = [gene] * self.segments
                out.append(tuple(genome))
        return out

    def random(self, n: int, rng: np.random.Generator) -> list[Genome]:
        """Return `n` random genomes (every choice of a gene equally likely)."""
        rows = rng.integers(0, np.asarray(self.gene_choices), (n, self.n_genes))
        return [tuple(int(g) for g in row) for row in rows]
