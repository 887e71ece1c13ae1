"""Search space, algorithms and run files: genome round trip, budgets, the exact front."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from ddsm_search.errors import DDSMError
from ddsm_search.search.algorithms import gene_bounds, initial_population, make_algorithm
from ddsm_search.search.genome import SearchSpace
from ddsm_search.search.pareto import front_of, hypervolume, pareto_mask
from ddsm_search.solvers.base import Solver
from ddsm_search.space.subnet import Subnet, SubnetSpace

SPACE = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.75, 0.5, 0.25]}), steps=10, segments=4)
# two axes with different numbers of choices: width genes have 3 choices, depth genes 2
TWO_AXES = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.5, 0.25], "depth": [4, 2]}), steps=7, segments=3)


def W(width):
    return Subnet.of(width=width)


def test_genome_round_trip():
    rng = np.random.default_rng(0)
    for genome in SPACE.random(50, rng) + SPACE.uniform():
        schedule = SPACE.decode(genome)
        assert len(schedule) == 10
        assert SPACE.encode(schedule) == genome
    assert SPACE.bounds == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert SPACE.decode((3, 2, 1, 0)) == [W(0.25)] * 2 + [W(0.5)] * 3 + [W(0.75)] * 3 + [W(1.0)] * 2
    assert SPACE.n_genes == 4 and SPACE.gene_choices == [4] * 4 and SPACE.size == 4 ** 4
    assert SPACE.uniform() == [(i,) * 4 for i in range(4)]


def test_genome_errors():
    with pytest.raises(DDSMError, match="several subnets"):
        SPACE.encode([W(1.0), W(0.5)] + [W(1.0)] * 8)
    with pytest.raises(DDSMError, match="not a search choice"):
        SPACE.encode([W(0.3)] * 10)
    with pytest.raises(DDSMError, match="does not fit"):
        SPACE.decode((0, 0, 0))
    with pytest.raises(DDSMError, match="does not fit"):
        SPACE.decode((0, 0, 0, 4))
    with pytest.raises(DDSMError, match="search.segments"):
        SearchSpace.of(SubnetSpace.of({"width": [1.0]}), steps=5, segments=6)


def test_genome_round_trip_over_two_axes():
    space = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.5, 0.25], "depth": [4, 3, 2]}), steps=10, segments=4)
    assert space.axes == ("width", "depth") and space.n_genes == 8 and space.size == 3 ** 8
    rng = np.random.default_rng(0)
    genomes = space.random(200, rng)
    assert len(set(genomes)) > 150
    for genome in genomes + space.uniform():
        schedule = space.decode(genome)
        assert len(schedule) == 10 and all(s in space.searched.members for s in schedule)
        assert space.encode(schedule) == genome
    # axis-major: the 4 width genes, then the 4 depth genes; segments (0, 2), (2, 5), (5, 8), (8, 10)
    full = Subnet.of(width=1.0, depth=4)
    assert space.decode((2, 1, 0, 0, 0, 0, 0, 2)) == (
        [full.replace(width=0.25)] * 2 + [full.replace(width=0.5)] * 3 + [full] * 3 + [full.replace(depth=2)] * 2)
    assert space.decode((0, 1, 0, 1, 2, 0, 1, 2)) == (
        [full.replace(depth=2)] * 2 + [full.replace(width=0.5)] * 3 + [full.replace(depth=3)] * 3
        + [Subnet.of(width=0.5, depth=2)] * 2)
    with pytest.raises(DDSMError, match="depth 5 is not a search choice"):
        space.encode([Subnet.of(width=1.0, depth=5)] * 10)


def test_uniform_holds_the_uniform_schedules_of_every_axis():
    space = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.5, 0.25], "depth": [4, 3, 2]}), steps=6, segments=3)
    full = Subnet.of(width=1.0, depth=4)
    schedules = [space.decode(g) for g in space.uniform()]
    want = [[full] * 6] + [[full.replace(width=w)] * 6 for w in (0.5, 0.25)] + \
        [[full.replace(depth=d)] * 6 for d in (3, 2)]
    assert schedules == want, "full size once, then each axis's choices with the other axes full"
    assert len(set(space.uniform())) == len(space.uniform())


def test_every_choice_of_every_gene_is_equally_likely():
    rng = np.random.default_rng(7)
    n = 30000
    genomes = np.array(TWO_AXES.random(n, rng))
    assert genomes.shape == (n, TWO_AXES.n_genes) and TWO_AXES.gene_choices == [3, 3, 3, 2, 2, 2]
    # chi-square against uniform, per gene; the 99.9% points: 13.8 for 2 degrees of freedom, 10.8 for 1
    limit = {3: 13.8, 2: 10.8}
    for gene, choices in enumerate(TWO_AXES.gene_choices):
        counts = np.bincount(genomes[:, gene], minlength=choices)
        assert len(counts) == choices, f"gene {gene} took a value outside its {choices} choices"
        expected = n / choices
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < limit[choices], (gene, counts.tolist(), chi2)


def test_nsga2_asks_only_valid_genomes_when_axes_have_different_numbers_of_choices():
    low, high = gene_bounds(np.asarray(TWO_AXES.gene_choices))
    assert low.tolist() == [-0.5] * 6 and high.tolist() == [2.5] * 3 + [1.5] * 3
    assert gene_bounds(4) == (-0.5, 3.5)

    def cost(genome):
        return sum(s["width"] ** 2 * s["depth"] for s in TWO_AXES.decode(genome))

    def quality(genome):
        return sum((4 - s["depth"]) + (1 - s["width"]) * (1 + i) for i, s in enumerate(TWO_AXES.decode(genome)))

    def run():
        algo = make_algorithm("nsga2", TWO_AXES, 8, 5, lambda g: True)
        asked = []
        for _ in range(6):
            genomes = algo.ask()
            asked += genomes
            algo.tell(genomes, [(cost(g), quality(g)) for g in genomes])
        return asked

    asked = run()
    assert asked == run(), "seeded"
    counts = TWO_AXES.gene_choices
    assert all(len(g) == 6 and all(0 <= v < n for v, n in zip(g, counts)) for g in asked), \
        "every gene within its own axis's choices"
    for g in asked:
        TWO_AXES.decode(g)  # raises on an invalid genome
    widths = {v for g in asked for v in g[:3]}
    assert widths == {0, 1, 2}, "the width genes reach their third choice (not clipped to depth's two)"


def _cost(genome):
    return sum(s["width"] ** 2 for s in SPACE.decode(genome))


def _quality(genome):  # a toy objective: full width matters more on late (low-noise) steps
    return sum((1 - s["width"]) * (1 + i) for i, s in enumerate(SPACE.decode(genome)))


def test_initial_population_holds_uniform_schedules_within_budget():
    pop = initial_population(SPACE, 8, np.random.default_rng(0), lambda g: _cost(g) <= 6)
    assert len(pop) == 8 and len(set(pop)) == 8
    assert (0, 0, 0, 0) not in pop  # all-1.0 costs 10 > 6
    assert {(1,) * 4, (2,) * 4, (3,) * 4} <= set(pop)
    assert all(_cost(g) <= 6 for g in pop)


@pytest.mark.parametrize("name", ["nsga2", "nevergrad", "random"])
def test_algorithms_are_seeded_and_respect_the_budget(name):
    def run():
        algo = make_algorithm(name, SPACE, 6, 3, lambda g: _cost(g) <= 6)
        asked = []
        for _ in range(3):
            genomes = algo.ask()
            asked.append(genomes)
            algo.tell(genomes, [(_cost(g), _quality(g) if _cost(g) <= 6 else float("inf")) for g in genomes])
        return asked

    first, second = run(), run()
    assert first == second, "the same seed and tells must give the same asks (resume replays them)"
    assert all(len(g) == 4 and all(0 <= v < 4 for v in g) for gen in first for g in gen)
    if name != "nevergrad":  # nevergrad may propose infeasible points; the runner never evaluates them
        assert all(_cost(g) <= 6 for g in first[0])


def test_unknown_algorithm():
    with pytest.raises(DDSMError, match="unknown algorithm"):
        make_algorithm("cmaes", SPACE, 4, 0, lambda g: True)


def test_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(1)
    points = rng.random((60, 2))
    points[10] = points[11]  # a duplicate point: both copies are non-dominated
    mask = pareto_mask(points)
    brute = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert mask.tolist() == brute
    table = pd.DataFrame({"schedule": [str(i) for i in range(60)], "gflops": points[:, 0], "fid": points[:, 1],
                          "flops_share": points[:, 0], "samples": 500})
    front = front_of(table, "fid", 500)
    assert set(front["schedule"]) == {str(i) for i in np.flatnonzero(brute)}
    assert front["gflops"].is_monotonic_increasing


def test_rows_screened_on_fewer_samples_are_never_on_the_front():
    table = pd.DataFrame({"schedule": ["a", "b", "c"], "gflops": [1.0, 2.0, 0.5], "fid": [2.0, 1.0, 0.1],
                          "flops_share": [0.5, 1.0, 0.25], "samples": [500, 500, 100]})
    assert front_of(table, "fid", 500)["schedule"].tolist() == ["a", "b"]  # "c" would dominate both
    table.loc[1, "fid"] = float("nan")
    assert front_of(table, "fid", 500)["schedule"].tolist() == ["a"]


def test_hypervolume_reference_stays_beyond_every_score_for_negative_kid():
    from ddsm_search.search.pareto import hv_reference

    table = pd.DataFrame({"kid": [-0.010, -0.004, -0.001, -0.5], "samples": [500, 500, 500, 100],
                          "generation": [0, 0, 0, 0]})
    ref = hv_reference(table, "kid", 500)
    assert ref[0] == 1.05 and ref[1] > -0.001  # 1.1 x the worst (-0.0011) would lie inside the front
    fid = pd.DataFrame({"fid": [1.0, 3.0, 2.0], "samples": 500, "generation": [0, 0, 1]})
    assert hv_reference(fid, "fid", 500) == pytest.approx((1.05, 3.3))  # FID: 1.1 x the worst of generation 0
    front = pd.DataFrame({"flops_share": [0.5, 1.0], "kid": [-0.004, -0.010]})
    assert hypervolume(front, ref, "kid") > 0


def test_hypervolume_of_a_known_front():
    front = pd.DataFrame({"flops_share": [0.25, 0.5, 1.0], "fid": [3.0, 2.0, 1.0]})
    # staircase below reference (1.0, 4.0) ... reference (1.05, 4.0)
    want = (0.5 - 0.25) * (4 - 3) + (1.0 - 0.5) * (4 - 2) + (1.05 - 1.0) * (4 - 1)
    assert hypervolume(front, (1.05, 4.0), "fid") == pytest.approx(want)
    assert hypervolume(front.iloc[:0], (1.05, 4.0), "fid") == 0.0


def test_brute_force_small_space_front_matches():
    space = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.5]}), steps=4, segments=4)
    genomes = list(itertools.product(range(2), repeat=4))
    widths = {g: [s["width"] for s in space.decode(g)] for g in genomes}
    table = pd.DataFrame({"schedule": [str(g) for g in genomes],
                          "gflops": [sum(w * w for w in widths[g]) for g in genomes],
                          "fid": [sum((1 - w) * (i + 1) for i, w in enumerate(widths[g])) for g in genomes]})
    table["flops_share"] = table["gflops"] / 4
    table["samples"] = 100
    front = front_of(table, "fid", 100)
    # with full width worth more on later steps, the front fills the late steps first
    assert "(1, 1, 1, 0)" in set(front["schedule"]) and "(0, 1, 1, 1)" not in set(front["schedule"])


@pytest.mark.parametrize("name", ["nsga2", "nevergrad", "random"])
def test_seeds_join_the_uniform_schedules_in_the_first_generation(name):
    seed = (1, 2, 0, 3)
    algo = make_algorithm(name, SPACE, 8, 0, lambda g: True, seeds=[seed])
    first = algo.ask()
    assert seed in first and all(g in first for g in SPACE.uniform())


# ---------------------------------------------------------------- the sampler in the genome

JOINT = SearchSpace.of(SubnetSpace.of({"width": [1.0, 0.5]}), steps=10, segments=3,
                       solvers=(Solver(), Solver("unipc"), Solver("dpmsolver++")), step_choices=(4, 6, 10),
                       spacings=("uniform", "trailing"), num_timesteps=100)


def test_joint_genome_chooses_solver_steps_and_spacing_first():
    assert [w for w, _ in JOINT.sampler_genes] == ["solver", "steps", "spacing"]
    assert JOINT.n_genes == 3 + 3 and JOINT.gene_choices == [3, 3, 2, 2, 2, 2]
    c = JOINT.candidate((1, 0, 1, 1, 0, 0))  # unipc, 4 steps, trailing; widths 0.5 | 1.0 | 1.0
    assert c.solver == Solver("unipc") and c.spacing == "trailing" and len(c.steps) == 4
    assert c.timesteps == (99, 74, 49, 24)
    # 4 steps in 3 segments: round(linspace(0, 4, 4)) = 0, 1, 3, 4
    assert [s.subnet["width"] for s in c.steps] == [0.5, 1.0, 1.0, 1.0]
    assert c.key == "[unipc trailing] width=0.5 width=1.0*3"
    assert JOINT.candidate((0, 2, 0, 0, 0, 0)).key == "width=1.0*10"  # DDIM, uniform: keys as before
    rng = np.random.default_rng(1)
    for genome in JOINT.random(100, rng):
        c = JOINT.candidate(genome)
        assert JOINT.encode(c.steps, c.solver, c.spacing) == genome
        assert len(c.steps) == len(c.timesteps) in (4, 6, 10)


def test_segments_cover_every_step_count():
    from ddsm_search.search.genome import segment_bounds

    for n in range(1, 25):
        for k in range(1, 6):
            bounds = segment_bounds(n, k)
            assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) == k
            assert all(a <= b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1  # near-equal runs


def test_first_generation_holds_full_size_under_every_solver_at_every_step_count():
    first = [JOINT.candidate(g) for g in JOINT.first()]
    baselines = {(c.solver.key, len(c.steps), c.spacing) for c in first[:18]}
    assert baselines == {(s, n, g) for s in ("ddim", "unipc", "dpmsolver++") for n in (4, 6, 10)
                         for g in ("uniform", "trailing")}
    assert all(s.subnet == Subnet.of(width=1.0) for c in first[:18] for s in c.steps)
    assert [len(c.steps) for c in first[:18]] == sorted(len(c.steps) for c in first[:18]), "fewest steps first"
    assert len(set(JOINT.first())) == len(JOINT.first())
    assert SPACE.baselines() == []  # one solver, one step count: no baselines beyond full size


def test_joint_genome_errors():
    with pytest.raises(DDSMError, match="steps 5, not a search choice"):
        JOINT.encode([W(1.0)] * 5)
    with pytest.raises(DDSMError, match="solver euler, not a search choice"):
        JOINT.encode([W(1.0)] * 4, Solver("euler"))
    with pytest.raises(DDSMError, match="steps must be between 1 and 100"):
        SearchSpace.of(SubnetSpace.of({"width": [1.0]}), steps=10, segments=1, step_choices=(10, 200),
                       num_timesteps=100)


def test_the_first_generation_holds_every_baseline_whatever_the_population():
    pop = initial_population(JOINT, 4, np.random.default_rng(0), lambda g: True)
    assert set(JOINT.baselines()) <= set(pop) and len(JOINT.baselines()) == 18 and len(pop) == len(set(pop)) >= 18
    algo = make_algorithm("nsga2", JOINT, 4, 0, lambda g: True)
    first = algo.ask()
    assert set(JOINT.baselines()) <= set(first)
    algo.tell(first, [(float(sum(g)), float(g[0])) for g in first])
    assert len(algo.ask()) <= 4  # later generations: the population
