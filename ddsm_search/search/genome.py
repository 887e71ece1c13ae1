"""The search space: a genome of choice indices for the sampler and, per segment of steps, the subnets.

Schedule genes come first, one for each of the solver, the number of steps and the timestep spacing
that has more than one choice (`search.solvers`, `search.step_choices`, `search.spacings`). Then the
segments: K segments (`search.segments`) split whatever number of steps a genome has into K runs of
consecutive steps of near-equal length, noisiest first (round(linspace(0, n, K + 1)); with fewer
steps than segments some segments hold none, and their genes then change nothing). On each segment
every searched axis has one gene, an index into that axis's choices (largest first); axes not searched
stay at their full value. Axis genes are axis-major (all width genes, then all depth genes). Method
families add genes per segment for their step field (space.plugins `genes`), after the axes', in the
table's order (early exit's threshold: 0 is "off", i > 0 the i-th threshold, highest first, the depth
gene then the cap the exit may not pass). Encoding and decoding are exact for every schedule that is
constant on each segment.

A supernet whose space has a step axis (a multi-stage U-Net's stage) gets no gene for it: each step's
value follows its timestep (`grid_values`, from `for_supernet`), so a segment that crosses a stage
boundary runs its width gene at each of its steps' stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DDSMError
from ..solvers.base import Solver, head_of, timesteps_for
from ..space.plugins import families
from ..space.steps import Step, plan_key
from ..space.subnet import Subnet, SubnetSpace

Genome = tuple[int, ...]


def segment_bounds(steps: int, segments: int) -> list[tuple[int, int]]:
    """Return the step range [start, stop) of each of `segments` segments of `steps` steps."""
    edges = np.linspace(0, steps, segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class Candidate:
    """What a genome stands for: its steps, the solver, and the timesteps (and their spacing)."""

    steps: tuple[Step, ...]
    solver: Solver
    timesteps: tuple[int, ...]
    spacing: str

    @property
    def head(self) -> str | None:
        """Return the head of its plan key (None: DDIM on the uniform grid)."""
        return head_of(self.solver, self.timesteps, self.spacing)

    @property
    def key(self) -> str:
        """Return its plan key, as the run table writes it."""
        return plan_key(self.steps, self.head)


@dataclass(frozen=True)
class SearchSpace:
    """The searched axes and their choices, the sampler's choices, and the segments of steps."""

    searched: SubnetSpace  # the axes searched, each with its choices (largest first)
    base: Subnet  # every axis of the supernet at the value it keeps when not searched (full)
    steps: int  # the reference number of steps (search.steps): full size's FLOPs over them are 100%
    segments: int
    genes: tuple = ()  # method families' genes per segment (space.plugins), in the table's order
    step_axis: str | None = None  # an axis each step's timestep decides (a multi-stage U-Net's stage), not searched
    grid_values: tuple = ()  # ((steps, spacing), the step axis's value at each step) for every grid
    solvers: tuple[Solver, ...] = (Solver(),)
    step_choices: tuple[int, ...] = ()  # default: (steps,)
    spacings: tuple[str, ...] = ("uniform",)
    num_timesteps: int = 1000

    def __post_init__(self):
        if not self.searched.axes:
            raise DDSMError("search.axes: needs at least one axis")
        object.__setattr__(self, "step_choices", tuple(sorted(set(self.step_choices or (self.steps,)))))
        if not self.solvers or not self.spacings:
            raise DDSMError("search.solvers and search.spacings need at least one choice each")
        if not 1 <= self.segments <= max(self.step_choices):
            raise DDSMError(f"search.segments: must be between 1 and the {max(self.step_choices)} sampling steps, "
                            f"got {self.segments}")
        for n in self.step_choices:
            for spacing in self.spacings:
                timesteps_for(self.num_timesteps, n, spacing)  # a grid that repeats a timestep fails here
        if self.step_axis is not None and not self.grid_values:
            raise DDSMError(f"the {self.step_axis} of each step of each grid is needed (SearchSpace.for_supernet)")

    @classmethod
    def of(cls, supernet_space: SubnetSpace, steps: int, segments: int, axes: Sequence[str] | None = None,
           choices: dict | None = None, genes: Sequence = (), grid_values: Sequence = (), **sampler) -> "SearchSpace":
        """Return the space searching `axes` (default: all of the supernet's but its step axis) with
        `choices` (default: all), method families' `genes` per segment, for a supernet with a step axis
        its value at each step of each grid (`grid_values`), and the sampler's choices (`solvers`,
        `step_choices`, `spacings`, `num_timesteps`)."""
        step_axis = supernet_space.step_axis
        if step_axis is not None and (step_axis in (axes or ()) or step_axis in (choices or {})):
            raise DDSMError(f"search.axes: the {step_axis} follows each step's timestep; it is not searched")
        axes = list(axes) if axes is not None else [a for a in supernet_space.names if a != step_axis]
        picked = {}
        for axis in axes:
            mine = supernet_space.choices(axis)
            wanted = (choices or {}).get(axis)
            picked[axis] = mine if wanted is None else [supernet_space.check({axis: v})[axis] for v in wanted]
        return cls(SubnetSpace.of(picked), supernet_space.full, steps, segments, tuple(genes), step_axis,
                   tuple(grid_values), **sampler)

    @classmethod
    def for_supernet(cls, supernet, q) -> "SearchSpace":
        """Return the space a SearchConfig describes on a loaded supernet (checkpoint.Supernet): the genes
        its method families add, its sampler's choices, and the step axis's value at each step of each
        grid where the supernet has one."""
        space, T = supernet.model.space, supernet.config.diffusion.timesteps
        try:
            solvers = tuple(Solver.parse(s) for s in q.solvers) or (Solver.of_sampler(q.sampler, q.eta),)
        except DDSMError as exc:
            raise DDSMError(f"search.solvers: {exc}") from None
        if len(set(solvers)) != len(solvers):
            same = next(s for s in solvers if solvers.count(s) > 1)
            raise DDSMError(f"search.solvers: {[s for s, p in zip(q.solvers, solvers) if p == same]} are the same "
                            f"solver ({same.key})")
        step_choices = tuple(q.step_choices) or (q.steps,)
        spacings = tuple(q.spacings) or ("uniform",)
        grid_values = []
        if space.step_axis is not None:
            for n in sorted(set(step_choices) | {q.steps}):
                for spacing in spacings:
                    grid = timesteps_for(T, n, spacing)
                    subnets = supernet.step_subnets([supernet.model.full] * n, grid)
                    grid_values.append(((n, spacing), tuple(s[space.step_axis] for s in subnets)))
        genes = [g for f in families() if (g := f.genes(supernet.model, q)) is not None]
        return cls.of(space, q.steps, q.segments, q.axes, q.choices, genes, grid_values, solvers=solvers,
                      step_choices=step_choices, spacings=spacings, num_timesteps=T)

    @property
    def axes(self) -> tuple[str, ...]:
        """Return the searched axes."""
        return self.searched.names

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Return the segments' step ranges at the reference number of steps."""
        return segment_bounds(self.steps, self.segments)

    @property
    def sampler_genes(self) -> list[tuple[str, tuple]]:
        """Return the schedule genes, (what, its choices), for each sampler choice with more than one option."""
        return [(what, c) for what, c in (("solver", self.solvers), ("steps", self.step_choices),
                                           ("spacing", self.spacings)) if len(c) > 1]

    @property
    def gene_choices(self) -> list[int]:
        """Return the number of choices of each gene, in genome order."""
        head = [len(c) for _, c in self.sampler_genes]
        extra = [g.choices for g in self.genes for _ in range(self.segments)]
        return head + [len(self.searched.choices(a)) for a in self.axes for _ in range(self.segments)] + extra

    @property
    def n_genes(self) -> int:
        """Return the genome length."""
        return len(self.sampler_genes) + (len(self.axes) + len(self.genes)) * self.segments

    @property
    def size(self) -> int:
        """Return the number of distinct genomes of the space."""
        return int(np.prod([float(n) for n in self.gene_choices])) if self.n_genes < 60 else 2**62

    def subnets(self) -> list[Subnet]:
        """Return every subnet a schedule of this space can run, largest first (with a step axis: at
        each of its values the steps take, highest first)."""
        plain = [self.subnet(s.as_dict()) for s in self.searched]
        if self.step_axis is None:
            return plain
        values = sorted({v for _, vs in self.grid_values for v in vs}, reverse=True)
        return [s.replace(**{self.step_axis: v}) for v in values for s in plain]

    def _at_steps(self, subnets: list[Subnet], n: int, spacing: str) -> list[Subnet]:
        """Return the subnets with the step axis's value of each step of the grid, if there is one."""
        if self.step_axis is None:
            return subnets
        values = dict(self.grid_values)[(n, spacing)]
        return [s.replace(**{self.step_axis: v}) for s, v in zip(subnets, values)]

    def cheapest(self, cost) -> list[Subnet]:
        """Return the cheapest schedule of the space: the fewest steps, each running the subnet of least
        `cost(subnet)` it can run."""
        plain = [self.subnet(s.as_dict()) for s in self.searched]
        n, spacing = min(self.step_choices), self.spacings[0]
        columns = [self._at_steps([s] * n, n, spacing) for s in plain]
        return [min((column[i] for column in columns), key=cost) for i in range(n)]

    def subnet(self, values: dict) -> Subnet:
        """Return the supernet's subnet with the searched axes at `values` and the others at base."""
        return self.base.replace(**values)

    def _check(self, genome: Sequence[int]) -> None:
        counts = self.gene_choices
        if len(genome) != self.n_genes or not all(0 <= int(g) < n for g, n in zip(genome, counts)):
            raise DDSMError(f"genome {tuple(genome)} does not fit {self.n_genes} genes with {counts} choices")

    def sampler_of(self, genome: Sequence[int]) -> tuple[Solver, int, str]:
        """Return the (solver, number of steps, spacing) a genome's schedule genes choose."""
        chosen = {"solver": self.solvers[0], "steps": max(self.step_choices), "spacing": self.spacings[0]}
        for k, (what, choices) in enumerate(self.sampler_genes):
            chosen[what] = choices[int(genome[k])]
        return chosen["solver"], chosen["steps"], chosen["spacing"]

    def decode(self, genome: Sequence[int]) -> list[Subnet]:
        """Return the subnets (one per sampling step) a genome stands for."""
        self._check(genome)
        _, n, spacing = self.sampler_of(genome)
        offset, subnets = len(self.sampler_genes), []
        for seg, (start, stop) in enumerate(segment_bounds(n, self.segments)):
            values = {a: self.searched.choices(a)[int(genome[offset + k * self.segments + seg])]
                      for k, a in enumerate(self.axes)}
            subnets += [self.subnet(values)] * (stop - start)
        return self._at_steps(subnets, n, spacing)

    def plan(self, genome: Sequence[int]) -> list[Step]:
        """Return the steps a genome stands for: its subnets, and the values its families' genes decode
        (a value may depend on the segment's subnet: several genomes may then stand for one schedule,
        which the search evaluates once, by its key)."""
        subnets = self.decode(genome)
        values: dict[str, list] = {}
        for k, genes in enumerate(self.genes):
            offset = len(self.sampler_genes) + (len(self.axes) + k) * self.segments
            per_step = []
            for seg, (start, stop) in enumerate(segment_bounds(len(subnets), self.segments)):
                per_step += genes.decode(genome[offset + seg], subnets[start], start, stop - start) \
                    if stop > start else []
            if any(v is not None for v in per_step):
                values[genes.field] = per_step
        return [Step.of(s, **{f: v[i] for f, v in values.items()}) for i, s in enumerate(subnets)]

    def candidate(self, genome: Sequence[int]) -> Candidate:
        """Return what a genome stands for: its steps, solver and timesteps."""
        solver, n, spacing = self.sampler_of(genome)
        return Candidate(tuple(self.plan(genome)), solver, tuple(timesteps_for(self.num_timesteps, n, spacing)),
                         spacing)

    def encode(self, schedule: Sequence, solver: Solver | None = None, spacing: str | None = None) -> Genome:
        """Return the genome of a schedule (steps, or subnets) that is constant on every segment and keeps
        unsearched axes at base, under `solver` and `spacing` (default: the first choices)."""
        steps = [s if isinstance(s, Step) else Step(s) for s in schedule]
        chosen = {"solver": solver or self.solvers[0], "steps": len(steps), "spacing": spacing or self.spacings[0]}
        for what, choices in (("solver", self.solvers), ("steps", self.step_choices), ("spacing", self.spacings)):
            if chosen[what] not in choices:
                raise DDSMError(f"the schedule has {what} {chosen[what]}, not a search choice "
                                f"({', '.join(map(str, choices))})")
        genome = [0] * self.n_genes
        for k, (what, choices) in enumerate(self.sampler_genes):
            genome[k] = choices.index(chosen[what])
        bounds = [(a, b) for a, b in segment_bounds(len(steps), self.segments)]
        offset = len(self.sampler_genes)
        fields = {g.field: k for k, g in enumerate(self.genes)}
        unknown = sorted({f for s in steps for f in s.fields} - set(fields))
        if unknown:
            raise DDSMError(f"this search space has no genes for the steps' {unknown[0]} (search settings of its family)")
        for name, k in fields.items():
            for seg, (start, stop) in enumerate(bounds):
                try:
                    gene = self.genes[k].encode([s.get(name) for s in steps[start:stop]])
                except DDSMError as exc:
                    raise DDSMError(f"steps {start}..{stop - 1}: {exc}") from None
                genome[offset + (len(self.axes) + k) * self.segments + seg] = gene
        plain = self._off_steps([s.subnet for s in steps], chosen["spacing"])
        for seg, (start, stop) in enumerate(bounds):
            distinct = set(plain[start:stop])
            if len(distinct) > 1:
                raise DDSMError(f"steps {start}..{stop - 1} use several subnets "
                                f"({', '.join(sorted(s.key for s in distinct))}); one segment has one subnet")
            for axis, value in (distinct.pop().items if distinct else ()):
                if axis in self.axes:
                    choices = self.searched.choices(axis)
                    if value not in choices:
                        raise DDSMError(f"{axis} {value!r} is not a search choice ({', '.join(map(repr, choices))})")
                    genome[offset + self.axes.index(axis) * self.segments + seg] = choices.index(value)
                elif value != self.base[axis]:
                    raise DDSMError(f"{axis} is not searched here and stays at {self.base[axis]!r}, not {value!r}")
        return tuple(genome)

    def _off_steps(self, subnets: list[Subnet], spacing: str) -> list[Subnet]:
        """Return the subnets without the step axis, checking that each has its step's value (or none)."""
        if self.step_axis is None:
            return subnets
        values = dict(self.grid_values)[(len(subnets), spacing)]
        out = []
        for i, (subnet, want) in enumerate(zip(subnets, values)):
            items = subnet.as_dict()
            value = items.pop(self.step_axis, want)
            if value != want:
                raise DDSMError(f"step {i} runs {self.step_axis} {want}, not {value} ({subnet.key}): the "
                                f"{self.step_axis} follows the step's timestep")
            out.append(Subnet.of(**items))
        return out

    def first(self, seeds: Sequence[Genome] = ()) -> list[Genome]:
        """Return the genomes every first generation starts with: full size under every solver at every
        step count on every spacing, the uniform schedules, then `seeds` (e.g. Step-Adaptive Training's
        prior), each once."""
        return list(dict.fromkeys([*self.baselines(), *self.uniform(), *(tuple(int(g) for g in s) for s in seeds)]))

    def baselines(self) -> list[Genome]:
        """Return the genomes of full size under every solver at every number of steps on every spacing,
        fewest steps first: the fronts a user has without any search."""
        out = []
        for n in self.step_choices:
            for solver in self.solvers:
                for spacing in self.spacings:
                    out.append(self.encode(self._at_steps([self.base] * n, n, spacing), solver, spacing))
        return out if len(out) > 1 else []

    def uniform(self) -> list[Genome]:
        """Return the genomes of the uniform schedules of every axis: each choice of one axis at every
        step, the other searched axes at their largest (full size first, once); then, for each family's
        genes, full size with each of its sweep's genes at every step (early exit: each threshold). All
        run the first solver and spacing at the most steps."""
        offset, out = len(self.sampler_genes), []
        start = [0] * offset
        for k, (what, choices) in enumerate(self.sampler_genes):
            start[k] = choices.index(max(choices)) if what == "steps" else 0
        for k, axis in enumerate(self.axes):
            for i in range(len(self.searched.choices(axis))):
                genome = start + [0] * (self.n_genes - offset)
                genome[offset + k * self.segments:offset + (k + 1) * self.segments] = [i] * self.segments
                if tuple(genome) not in out:
                    out.append(tuple(genome))
        for k, genes in enumerate(self.genes):  # each family's sweep at full size
            at = offset + (len(self.axes) + k) * self.segments
            for gene in genes.sweep():
                genome = start + [0] * (self.n_genes - offset)
                genome[at:at + self.segments] = [gene] * self.segments
                out.append(tuple(genome))
        return out

    def random(self, n: int, rng: np.random.Generator) -> list[Genome]:
        """Return `n` random genomes (every choice of a gene equally likely)."""
        rows = rng.integers(0, np.asarray(self.gene_choices), (n, self.n_genes))
        return [tuple(int(g) for g in row) for row in rows]
