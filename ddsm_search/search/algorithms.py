"""Ask/tell search algorithms over integer genomes with two objectives (GFLOPs, FID), both minimised.

Every algorithm proposes one generation at a time (`ask`) and learns the objectives of exactly those
genomes (`tell`). All randomness comes from the seed, so replaying the same tells reproduces the
same asks: that is how an interrupted search resumes without re-evaluating anything.

Infeasible genomes (over the FLOPs budget) are told with FID = +inf and are never evaluated.

Genes are integers 0 .. n-1, searched as reals on [-0.5, n - 0.5] and rounded to the nearest
integer (`gene_index`): every choice then owns an interval of the same length. Searching on [0, n-1]
and rounding gives the first and last choice half an interval each, so half the prior mass of the
others under mutation and random sampling.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np

from ..errors import DDSMError
from .genome import Genome, SearchSpace

ALGORITHMS = ("nsga2", "nevergrad", "random")
INFEASIBLE = 1e12  # stands in for +inf where a library needs finite numbers


def gene_bounds(n_choices) -> tuple:
    """Return the real interval a gene of `n_choices` choices is searched on: every choice gets length 1
    (an array of choice counts gives arrays of bounds, one per gene)."""
    n = np.asarray(n_choices, dtype=float)
    return n * 0 - 0.5, n - 0.5


def gene_index(value: float, n_choices: int) -> int:
    """Return the choice a real-valued gene stands for: the nearest integer, within 0 .. n-1."""
    return int(min(max(np.floor(float(value) + 0.5), 0), n_choices - 1))


class Algorithm(Protocol):
    """One generation at a time: ask for genomes, tell their (GFLOPs, FID)."""

    def ask(self) -> list[Genome]:
        """Return the genomes of the next generation."""

    def tell(self, genomes: Sequence[Genome], objectives: Sequence[tuple[float, float]]) -> None:
        """Learn the objectives of the genomes last asked for."""


def initial_population(space: SearchSpace, size: int, rng: np.random.Generator,
                       feasible: Callable[[Genome], bool], seeds: Sequence[Genome] = ()) -> list[Genome]:
    """Return every genome of the first generation that fits the budget (the baselines, the uniform
    schedules and `seeds`: space.first), then distinct random feasible genomes up to `size`. The first
    generation may be larger than `size`: the baselines are all evaluated, whatever the population."""
    pop = [g for g in space.first(seeds) if feasible(g)]
    seen = set(pop)
    for _ in range(1000 * size):
        if len(pop) >= size:
            break
        g = space.random(1, rng)[0]
        if g not in seen and feasible(g):
            pop.append(g)
            seen.add(g)
    return pop


class RandomSearch:
    """The baseline: the uniform schedules, then random feasible genomes."""

    def __init__(self, space: SearchSpace, population: int, seed: int, feasible: Callable[[Genome], bool],
                 seeds: Sequence[Genome] = ()):
        self.space, self.population, self.feasible, self.seeds = space, population, feasible, seeds
        self.rng = np.random.default_rng(seed)
        self.first = True

    def ask(self) -> list[Genome]:
        """Return a generation of random genomes (the first one starts with the uniform schedules)."""
        if self.first:
            self.first = False
            return initial_population(self.space, self.population, self.rng, self.feasible, self.seeds)
        out = []
        for _ in range(1000 * self.population):
            if len(out) >= self.population:
                break
            g = self.space.random(1, self.rng)[0]
            if self.feasible(g):
                out.append(g)
        return out

    def tell(self, genomes: Sequence[Genome], objectives: Sequence[tuple[float, float]]) -> None:
        """Random search learns nothing."""


def _gene_repair(gene_choices: Sequence[int]):
    """Return a pymoo Repair that rounds real genes to their choices (see `gene_index`)."""
    from pymoo.core.repair import Repair

    top = np.asarray(gene_choices, dtype=float) - 1

    class GeneRepair(Repair):
        def _do(self, problem, X, **kwargs):
            return np.clip(np.floor(np.asarray(X, dtype=float) + 0.5), 0, top)

    return GeneRepair()


class NSGA2Search:
    """pymoo's NSGA-II on integer genomes (SBX and polynomial mutation on equal-length intervals, then
    rounding), via ask/tell. `ask` returns [] once pymoo can make no new offspring (a small space)."""

    def __init__(self, space: SearchSpace, population: int, seed: int, feasible: Callable[[Genome], bool],
                 seeds: Sequence[Genome] = ()):
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM

        self.feasible = feasible
        start = initial_population(space, population, np.random.default_rng(seed), feasible, seeds)
        low, high = gene_bounds(space.gene_choices)
        problem = Problem(n_var=space.n_genes, n_obj=2, n_ieq_constr=1, xl=low, xu=high, vtype=int)
        self.algorithm = NSGA2(
            pop_size=population,  # the first generation evaluates all of `start`, the next `population` each
            sampling=np.array(start, dtype=float),
            crossover=SBX(prob=0.9, eta=15, vtype=float, repair=_gene_repair(space.gene_choices)),
            mutation=PM(eta=20, vtype=float, repair=_gene_repair(space.gene_choices)),
            eliminate_duplicates=True,
        )
        # pymoo: termination goes to setup(), not to NSGA2(...); the runner decides when to stop
        self.algorithm.setup(problem, termination=("n_gen", 10**9), seed=seed, verbose=False)
        self.pending = None

    def ask(self) -> list[Genome]:
        """Return the next generation's genomes."""
        self.pending = self.algorithm.ask()
        if self.pending is None or len(self.pending) == 0:  # every offspring would repeat a schedule
            self.pending = None
            return []
        return [tuple(int(v) for v in x) for x in self.pending.get("X")]

    def tell(self, genomes: Sequence[Genome], objectives: Sequence[tuple[float, float]]) -> None:
        """Pass (GFLOPs, FID) and the budget constraint back to NSGA-II."""
        if self.pending is None:
            return
        F = np.array([[f, fid if math.isfinite(fid) else INFEASIBLE] for f, fid in objectives], dtype=float)
        G = np.array([[0.0 if self.feasible(g) else 1.0] for g in genomes])
        self.pending.set("F", F, "G", G)
        self.algorithm.tell(infills=self.pending)


class NevergradSearch:
    """A nevergrad optimizer (differential evolution) told both objectives: its multi-objective mode."""

    def __init__(self, space: SearchSpace, population: int, seed: int, feasible: Callable[[Genome], bool],
                 seeds: Sequence[Genome] = ()):
        import nevergrad as ng  # slow to import (seconds): only when chosen

        self.population, self.feasible, self.gene_choices = population, feasible, space.gene_choices
        low, high = gene_bounds(space.gene_choices)
        param = ng.p.Array(shape=(space.n_genes,), lower=low, upper=high)
        param.random_state = np.random.RandomState(seed)
        self.optimizer = ng.optimizers.DE(parametrization=param, budget=None, num_workers=population)
        for g in initial_population(space, population, np.random.default_rng(seed), feasible, seeds):
            self.optimizer.suggest(np.array(g, dtype=float))
        self.pending: list = []

    def ask(self) -> list[Genome]:
        """Return the next generation's genomes."""
        self.pending = [self.optimizer.ask() for _ in range(self.population)]
        return [tuple(gene_index(v, n) for v, n in zip(c.value, self.gene_choices)) for c in self.pending]

    def tell(self, genomes: Sequence[Genome], objectives: Sequence[tuple[float, float]]) -> None:
        """Tell nevergrad each candidate's [GFLOPs, FID]."""
        for cand, (f, fid) in zip(self.pending, objectives):
            self.optimizer.tell(cand, [f, fid if math.isfinite(fid) else INFEASIBLE])


def make_algorithm(name: str, space: SearchSpace, population: int, seed: int,
                   feasible: Callable[[Genome], bool], seeds: Sequence[Genome] = ()) -> Algorithm:
    """Return the named ask/tell algorithm; `seeds` join the uniform schedules in its first generation."""
    if population < 2:
        raise DDSMError(f"--population must be at least 2, got {population}")
    if population > space.size:
        raise DDSMError(f"search.population: {population} is more than the {space.size} schedules of the space "
                        f"({' x '.join(f'{len(space.searched.choices(a))} {a}s' for a in space.axes)} in "
                        f"{space.segments} segments)")
    classes = {"nsga2": NSGA2Search, "nevergrad": NevergradSearch, "random": RandomSearch}
    if name not in classes:
        raise DDSMError(f"unknown algorithm {name!r} (choose from {', '.join(ALGORITHMS)})")
    return classes[name](space, population, seed, feasible, seeds)
