"""The search loop: ask a generation, evaluate what is new (in parallel), tell, record the front.

One generation loop serves both executors: the actor pool (`search.executor: pool`, default) drives
it from here, and Ray Tune (`tune`, search/tune_searcher.py) drives the same `_Generation` steps from a Tune
Searcher, so both write the same rows, fronts and hypervolumes.

Resuming replays the seeded algorithm from generation 0: every schedule already in the run's table
is answered from disk, so an interrupted search (kill -9 included) continues with no finished
evaluation lost or repeated, and reaches the same front it would have reached uninterrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..checkpoint import load_supernet
from ..config import ExperimentConfig, SearchConfig, budget_gflops, validate_search
from ..errors import DDSMError
from .algorithms import make_algorithm
from .executors.pool import LocalPool, RayPool
from .ray_cluster import in_ray_job
from ..methods.early_exit.policy import plan_key
from .pareto import front_of, hv_reference, hypervolume
from .results import RunFiles
from .genome import SearchSpace
from ..space.subnet import schedule_key

# settings that do not change what a run finds: a run may be resumed with other values of them
_NOT_RECORDED = ("generations", "workers", "backend", "executor")


def _run_info(q: SearchConfig, supernet, space: SearchSpace) -> dict:
    info = {"format": "ddsm-search/search-run", "version": 1,
            "supernet": {"path": str(supernet.path.resolve()), "sha256": supernet.sha256},
            "search": {k: v for k, v in asdict(q).items() if k not in _NOT_RECORDED},
            "axes": space.searched.to_json(), "base": space.base.key, "segments": [list(b) for b in space.bounds],
            "cost": supernet.cost}  # the FLOPs the run counts: dense, or sparse (nonzero weights; search.cost)
    if space.step_axis is not None:  # a multi-stage supernet: the stage each step runs (not searched)
        info["step_values"] = {space.step_axis: list(space.step_values)}
    return json.loads(json.dumps(info))  # as it reads back from run.json (tuples become lists)


def _same_run(saved: dict, info: dict) -> bool:
    """Return True if a run on disk was made with these settings and this supernet (wherever it lies now).

    Settings added since the run was written count as their defaults (the run was made with those).
    """
    defaults = {k: v for k, v in json.loads(json.dumps(asdict(SearchConfig()))).items()}

    def strip(d: dict) -> dict:
        search = {**{k: defaults[k] for k in defaults if k in info["search"]}, **d.get("search", {})}
        return {"cost": "dense", **d, "search": search, "supernet": {"sha256": d.get("supernet", {}).get("sha256")}}
    return strip(saved) == strip(info)


def run_search(cfg: ExperimentConfig, supernet_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
               address: str | None = None, progress: bool = True, device: str = "cpu", cache_dir: str | None = None,
               wait_for_workers: float = 0.0, loggers: Sequence[str] = (), **overrides) -> RunFiles:
    """Run (or resume) the schedule search described by `cfg.search`; return the run's files.

    `search.executor` says where evaluations run: `pool` (this module's actor pool) or `tune` (a Ray Tune
    experiment in RUN/tune, with Tune's loggers and `loggers` ("mlflow", "wandb") as callbacks).
    Everything is checked (settings against the supernet, the space, the budget, the cluster) before
    anything is written; a search that fails before its first evaluation leaves no run directory.
    """
    q = replace(cfg.search, **{k: v for k, v in overrides.items() if v is not None})
    validate_search(replace(cfg, search=q))
    if address is None and q.workers > 0 and in_ray_job():  # `ray job submit`: the job's cluster, not a Ray of its own
        address = "auto"
    if q.executor == "tune":
        from .executors.tune import check_tune

        check_tune(q, address, loggers)
    elif loggers:
        raise DDSMError("--tune-logger needs --executor tune")
    supernet = load_supernet(supernet_dir).with_cost(q.cost)
    # the supernet's own diffusion settings, not the YAML's, decide which sampler steps exist
    validate_search(replace(supernet.config, search=q))
    space = SearchSpace.for_supernet(supernet, q)
    full = supernet.full_schedule_flops(q.steps)
    limit = None if q.budget is None else budget_gflops(q.budget, full / 1e9) * 1e9  # FLOPs per image
    cheapest_plan = space.cheapest(supernet.flops.__getitem__)
    cheapest = supernet.schedule_flops(cheapest_plan)
    if limit is not None and cheapest > limit:
        raise DDSMError(f"budget {q.budget} ({limit / 1e9:.4f} GFLOPs per image) is below the cheapest schedule "
                        f"({cheapest / 1e9:.4f} GFLOPs, {schedule_key(cheapest_plan)})")

    def flops_of(genome) -> float:
        """Return a schedule's FLOPs per image; for a dynamic one (exit policy), a lower bound known before
        sampling (every image leaving at the shallowest depth, no heads): what it executes is measured."""
        subnets, exit = space.plan(genome)
        if exit is not None:
            shallowest = min(supernet.model.space.choices("depth"))
            subnets = [s if t is None else s.replace(depth=shallowest) for s, t in zip(subnets, exit.thresholds)]
        return supernet.schedule_flops(subnets)

    def feasible(genome) -> bool:
        return limit is None or flops_of(genome) <= limit

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a directory")
    created = not out.exists()
    files = RunFiles(out)
    info = _run_info(q, supernet, space)
    if files.has_run() and not resume:
        raise DDSMError(f"{files.dir} already holds a search run; pass --resume to continue it or choose another --out")
    if resume:
        if not files.has_run():
            raise DDSMError(f"--resume: no search run in {files.dir}")
        if not _same_run(files.read_run(), info):
            raise DDSMError(f"--resume: {files.dir} was searched with other settings or another supernet")

    from ..methods.step_groups.groups import seed_genomes

    algorithm = make_algorithm(q.algorithm, space, q.population, q.seed, feasible,
                               seed_genomes(space, supernet.config.diffusion, q.seed_prior))
    evaluator_args = {"supernet_dir": str(supernet.path), "search": asdict(q), "device": device, "cache_dir": cache_dir}
    from .worker import Evaluator, prepare_reference

    # once, before the workers start, so they all read the same cache and run each subnet on the same backend
    evaluator_args["backends"] = prepare_reference(**evaluator_args)
    loop = _Loop(q, space, files, flops_of, feasible, full, progress, limit, bars=q.executor == "pool")
    # the pool (or Ray, for Tune) before run.json: a cluster that cannot be reached leaves no half-started run
    if q.executor == "tune":
        from .executors.tune import TuneExecutor

        executor = TuneExecutor(loop, algorithm, evaluator_args, address, resume=resume, loggers=loggers)
    else:
        pool = (LocalPool(lambda: Evaluator(**evaluator_args)) if q.workers == 0
                else RayPool(q.workers, evaluator_args, address, wait_for_workers=wait_for_workers))
        executor = _PoolExecutor(loop, algorithm, pool)
    try:
        files.write_run(info)  # on resume: the supernet's current path, if it moved (same hash)
        executor.run()
    except BaseException:
        if created and not files.rows:  # nothing was evaluated: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        executor.close()
    return files


class _PoolExecutor:
    """Runs the generations on a pool (LocalPool or RayPool), one batch of evaluations at a time."""

    def __init__(self, loop: "_Loop", algorithm, pool):
        self.loop, self.algorithm, self.pool = loop, algorithm, pool

    def run(self) -> None:
        """Run every generation (or until the space is exhausted)."""
        for gen in range(self.loop.q.generations):
            generation = self.loop.start(gen, self.algorithm)
            if generation is None:
                self.loop.exhausted(gen)
                return
            while (batch := generation.next_batch()) is not None:
                jobs, samples = batch
                for key, result, worker in self.pool.run(jobs, samples):
                    generation.add(key, result, worker)
            self.loop.finish(generation)

    def close(self) -> None:
        """Stop the pool."""
        self.pool.close()


class _Generation:
    """One generation's evaluations, batch by batch (screening first, if asked, then full evaluations):
    which schedules to evaluate next, and each result recorded as it lands."""

    def __init__(self, loop: "_Loop", gen: int, algorithm, genomes: list, todo: dict, started: float):
        self.loop, self.gen, self.algorithm, self.genomes, self.todo = loop, gen, algorithm, genomes, todo
        self.started = started
        self.screens: dict[str, dict] = {}
        self.phase = "new"  # new -> screen (if screening) -> full -> done
        q = loop.q
        self.bar = tqdm(total=len(todo), desc=f"generation {gen + 1}/{q.generations}", unit="eval",
                        disable=not (loop.progress and loop.bars), leave=False)

    def next_batch(self) -> tuple[list, int] | None:
        """Return the next batch, ([(schedule key, plan), ...], images per evaluation), or None when every
        new schedule of the generation is recorded (call once the previous batch's results are all in)."""
        q = self.loop.q
        jobs = [(key, plan) for key, (plan, _) in self.todo.items()]
        if self.phase == "new" and q.screen_samples:
            self.phase = "screen"
            if jobs:
                return jobs, q.screen_samples
        if self.phase in ("new", "screen"):
            if self.phase == "screen":
                promising = {key for key in self.screens
                             if self.loop.promising(self.todo[key][1], self.screens[key], self.gen)}
                for key, (_, genome) in self.todo.items():
                    if key not in promising:  # its screen is its record: dominated by more than the noise margin
                        screen = self.screens[key]
                        self.loop.files.add(self.loop.row(key, genome, screen, self.gen, -1, screen[q.metric]))
                        self.bar.update(1)
                jobs = [(key, plan) for key, plan in jobs if key in promising]
            self.phase = "full"
            if jobs:
                return jobs, q.samples
        self.phase = "done"
        return None

    def add(self, key: str, result: dict, worker: int) -> None:
        """Record the result of one evaluation of the current batch (a screen, or a full evaluation's row)."""
        q = self.loop.q
        if self.phase == "screen":
            self.screens[key] = result
            return
        screen_score = self.screens[key][q.metric] if key in self.screens else math.nan
        self.loop.files.add(self.loop.row(key, self.todo[key][1], result, self.gen, worker, screen_score))
        self.bar.update(1)


class _Loop:
    """One search's generation loop: ask, hand out what is new, tell the algorithm, record the front."""

    def __init__(self, q: SearchConfig, space: SearchSpace, files: RunFiles, flops_of, feasible, full: float,
                 progress: bool, limit: float | None = None, bars: bool = True):
        self.q, self.space, self.files, self.limit = q, space, files, limit
        self.flops_of, self.feasible, self.full, self.progress, self.bars = flops_of, feasible, full, progress, bars
        self.reference = None

    def row(self, key: str, genome, result: dict, gen: int, worker: int, screen_score: float) -> dict:
        """Return the run table's row of one evaluation."""
        # executed, for a dynamic schedule (the evaluator measures it); the FLOPs table's otherwise
        flops = result["gflops"] * 1e9 if "gflops" in result else self.flops_of(genome)
        return {"schedule": key, "genome": " ".join(map(str, genome)), "gflops": flops / 1e9,
                "gflops_sd": result.get("gflops_sd", 0.0), "flops_share": flops / self.full, "fid": result["fid"], "kid": result["kid"], "drift": result["drift"],
                "samples": result["samples"], "seed_set": result["seed_set"], "generation": gen, "worker": worker,
                "seconds": result["seconds"], "steps_run": result["steps_run"], "steps_saved": result["steps_saved"],
                "screen_score": screen_score}

    def promising(self, genome, screen: dict, gen: int) -> bool:
        """Return False if a schedule of an earlier generation, fully evaluated and at most as costly,
        screened better than this one by more than the margin.

        Earlier generations only: rows of this generation that a resumed run finds on disk were not
        there when an uninterrupted run screened it, and must not change the decision.
        """
        gflops = self.flops_of(genome) / 1e9
        for row in self.files.rows.values():
            if (row["generation"] < gen and row["samples"] == self.q.samples and row["gflops"] <= gflops
                    and math.isfinite(row["screen_score"])
                    and row["screen_score"] + self.q.screen_margin < screen[self.q.metric]):
                return False
        return True

    def start(self, gen: int, algorithm) -> _Generation | None:
        """Ask generation `gen`; return it with its feasible schedules that the table does not answer,
        or None if the algorithm has nothing new to ask (the space is exhausted)."""
        started = time.perf_counter()
        genomes = algorithm.ask()
        if not genomes:
            return None
        todo = {}
        for g in genomes:
            subnets, exit = self.space.plan(g)
            key = plan_key(subnets, exit)
            if self.feasible(g) and key not in self.files.rows:
                todo[key] = (subnets if exit is None else (subnets, exit), g)
        return _Generation(self, gen, algorithm, genomes, todo, started)

    def exhausted(self, gen: int) -> None:
        """Say that the search ended early: the algorithm had nothing new after generation `gen`."""
        if self.progress:
            print(f"the search space is exhausted after generation {gen}: the algorithm has no new "
                  "schedule to propose", flush=True)

    def finish(self, generation: _Generation) -> None:
        """Tell the algorithm the generation's objectives; write the front, its hypervolume and the summary."""
        q, gen, genomes, todo = self.q, generation.gen, generation.genomes, generation.todo
        generation.bar.close()
        objectives = []
        for g in genomes:
            row = self.files.rows.get(plan_key(*self.space.plan(g)))
            # a dynamic schedule's FLOPs are known once sampled: over the budget, it is infeasible
            fits = row is not None and self.feasible(g) and (self.limit is None or row["gflops"] * 1e9 <= self.limit)
            gflops = float(row["gflops"]) if row is not None else self.flops_of(g) / 1e9
            objectives.append((gflops, float(row[q.metric]) if fits else math.inf))
        generation.algorithm.tell(genomes, objectives)
        table = self.files.table()
        full_rows = table[table["samples"] == q.samples]  # screened-out rows have fewer samples: not comparable
        front = front_of(table, q.metric, q.samples)
        if self.reference is None:  # fixed after the first generation, which every algorithm shares
            self.reference = hv_reference(table, q.metric, q.samples)
        hv = hypervolume(front, self.reference, q.metric)
        infeasible = sum(not self.feasible(g) for g in genomes)
        summary = {"generation": gen, "asked": len(genomes), "infeasible": infeasible,
                   "answered_from_table": len(genomes) - infeasible - len(todo), "new": len(todo),
                   "screened_out": int((table["generation"] == gen).sum() - (full_rows["generation"] == gen).sum()),
                   "evaluations": len(table), f"best_{q.metric}": float(full_rows[q.metric].min()),
                   "front_size": len(front), "hypervolume": hv, "hv_ref_flops_share": self.reference[0],
                   f"hv_ref_{q.metric}": self.reference[1],
                   "seconds": round(time.perf_counter() - generation.started, 2)}
        self.files.record_generation(summary, front)
        if self.progress:
            print(f"generation {gen + 1}/{q.generations}: {len(todo)} new evaluations ({len(table)} in all), "
                  f"best {q.metric.upper()} {summary[f'best_{q.metric}']:.4g}, front {len(front)}, "
                  f"hypervolume {hv:.4g}, {summary['seconds']:.1f} s", flush=True)
