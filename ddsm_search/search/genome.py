"""The search space: a genome of choice indices, one gene per searched axis per segment of steps.

Segment i covers a fixed run of consecutive sampling steps (noisiest first); on it every searched
axis has one gene, an index into that axis's choices (largest first). Axes that are not searched stay
at their full value. The genome is axis-major: all width genes, then all depth genes. With exit
thresholds (AdaDiff's dynamic exit on a DiT), one more gene per segment follows: 0 is "off" (the
static subnet), i > 0 the i-th threshold, highest (most blocks run) first; the depth gene is then the
cap the exit may not pass. Encoding and decoding are exact for every schedule (and exit policy) that
is constant on each segment.

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
from ..methods.early_exit.policy import ExitPolicy
from ..space.subnet import Subnet, SubnetSpace

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The searched axes and their choices, the sampling steps, and the segments of steps."""

    searched: SubnetSpace  # the axes searched, each with its choices (largest first)
    base: Subnet  # every axis of the supernet at the value it keeps when not searched (full)
    steps: int
    segments: int
    thresholds: tuple[float, ...] = ()  # exit thresholds searched per segment, highest first (none: static)
    exit_depths: tuple[int, ...] = ()  # the supernet's depth choices: where an image may exit
    step_axis: str | None = None  # an axis each step's timestep decides (a multi-stage U-Net's stage), not searched
    step_values: tuple[int, ...] = ()  # its value at each step

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(sorted({float(t) for t in self.thresholds}, reverse=True)))
        if self.thresholds and "depth" not in self.base.as_dict():
            raise DDSMError("search.exit_thresholds: early exit needs a supernet with a depth axis (a DiT)")
        if not self.searched.axes:
            raise DDSMError("search.axes: needs at least one axis")
        if not 1 <= self.segments <= self.steps:
            raise DDSMError(f"search.segments: must be between 1 and the {self.steps} sampling steps, got {self.segments}")
        if self.step_axis is not None and len(self.step_values) != self.steps:
            raise DDSMError(f"the {self.step_axis} of each of the {self.steps} steps is needed, got "
                            f"{len(self.step_values)}")

    @classmethod
    def of(cls, supernet_space: SubnetSpace, steps: int, segments: int, axes: Sequence[str] | None = None,
           choices: dict | None = None, exit_thresholds: Sequence[float] | None = None,
           step_values: Sequence[int] | None = None) -> "SearchSpace":
        """Return the space searching `axes` (default: all of the supernet's but its step axis) with
        `choices` (default: all), an exit threshold per segment if `exit_thresholds` are given, and, for a
        supernet with a step axis, its value at each step (`step_values`)."""
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
        depths = supernet_space.choices("depth") if "depth" in supernet_space.names else ()
        return cls(SubnetSpace.of(picked), supernet_space.full, steps, segments, tuple(exit_thresholds or ()),
                   tuple(depths), step_axis, tuple(step_values or ()))

    @classmethod
    def of_search(cls, supernet_space: SubnetSpace, q, step_values: Sequence[int] | None = None) -> "SearchSpace":
        """Return the space a SearchConfig describes."""
        return cls.of(supernet_space, q.steps, q.segments, q.axes, q.choices, q.exit_thresholds, step_values)

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
        exit = [len(self.thresholds) + 1] * self.segments if self.thresholds else []
        return [len(self.searched.choices(a)) for a in self.axes for _ in range(self.segments)] + exit

    @property
    def n_genes(self) -> int:
        """Return the genome length."""
        return (len(self.axes) + bool(self.thresholds)) * self.segments

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

    def exit(self, genome: Sequence[int]) -> ExitPolicy | None:
        """Return the exit policy a genome stands for (None if every segment is static). A segment whose
        depth cap is the supernet's shallowest depth is static whatever its gene: several genomes then
        stand for one schedule, which the search evaluates once (by its key)."""
        self._check(genome)
        if not self.thresholds:
            return None
        genes, subnets = genome[len(self.axes) * self.segments:], self.decode(genome)
        shallowest = min(self.exit_depths, default=0)
        per_step: list[float | None] = []
        for gene, (start, stop) in zip(genes, self.bounds):
            # a cap at the shallowest depth leaves nowhere to exit before it: the static subnet, one key
            static = int(gene) == 0 or subnets[start]["depth"] <= shallowest
            per_step += [None if static else self.thresholds[int(gene) - 1]] * (stop - start)
        policy = ExitPolicy(tuple(per_step))
        return policy if policy.dynamic else None

    def plan(self, genome: Sequence[int]) -> tuple[list[Subnet], ExitPolicy | None]:
        """Return (the subnets per step, the exit policy or None) a genome stands for."""
        return self.decode(genome), self.exit(genome)

    def decode(self, genome: Sequence[int]) -> list[Subnet]:
        """Return the schedule (one subnet per sampling step) a genome stands for."""
        self._check(genome)
        schedule: list[Subnet] = []
        for seg, (start, stop) in enumerate(self.bounds):
            values = {a: self.searched.choices(a)[int(genome[k * self.segments + seg])] for k, a in enumerate(self.axes)}
            schedule += [self.at_step(self.subnet(values), i) for i in range(start, stop)]
        return schedule

    def encode(self, schedule: Sequence[Subnet], exit: ExitPolicy | None = None) -> Genome:
        """Return the genome of a schedule (and exit policy) that is constant on every segment and keeps
        unsearched axes at base."""
        if len(schedule) != self.steps:
            raise DDSMError(f"the schedule has {len(schedule)} subnets but the search samples {self.steps} steps")
        genome = [0] * self.n_genes
        if exit is not None and exit.dynamic:
            if not self.thresholds:
                raise DDSMError("this search space has no exit thresholds (search.exit_thresholds)")
            for seg, (start, stop) in enumerate(self.bounds):
                distinct = set(exit.thresholds[start:stop])
                if len(distinct) != 1:
                    raise DDSMError(f"steps {start}..{stop - 1} use several exit thresholds; one segment has one")
                t = distinct.pop()
                if t is not None and t not in self.thresholds:
                    raise DDSMError(f"exit threshold {t!r} is not a search choice ({', '.join(map(repr, self.thresholds))})")
                genome[len(self.axes) * self.segments + seg] = 0 if t is None else self.thresholds.index(t) + 1
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
        step, the other searched axes at their largest (full size first, once); then, with exit
        thresholds, full size with each threshold at every step."""
        out: list[Genome] = []
        for k, axis in enumerate(self.axes):
            for i in range(len(self.searched.choices(axis))):
                genome = [0] * self.n_genes
                genome[k * self.segments:(k + 1) * self.segments] = [i] * self.segments
                if tuple(genome) not in out:
                    out.append(tuple(genome))
        for i in range(1, len(self.thresholds) + 1):  # the threshold sweep at full size
            genome = [0] * self.n_genes
            genome[len(self.axes) * self.segments:] = [i] * self.segments
            out.append(tuple(genome))
        return out

    def random(self, n: int, rng: np.random.Generator) -> list[Genome]:
        """Return `n` random genomes (every choice of a gene equally likely)."""
        rows = rng.integers(0, np.asarray(self.gene_choices), (n, self.n_genes))
        return [tuple(int(g) for g in row) for row in rows]
