"""The search loop: ask a generation, evaluate what is new (in parallel), tell, record the front.

Resuming replays the seeded algorithm from generation 0: every schedule already in the run's table
is answered from disk, so an interrupted search (kill -9 included) continues with no finished
evaluation lost or repeated, and reaches the same front it would have reached uninterrupted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import load_supernet
from ..config import ExperimentConfig, SearchConfig, budget_gflops, validate_search
from ..errors import DDSMError
from .algorithms import make_algorithm
from .pool import LocalPool, RayPool
from ..exit_policy import plan_key
from .results import RunFiles, front_of, hv_reference, hypervolume
from .space import SearchSpace
from ..subnet import schedule_key


def _run_info(q: SearchConfig, supernet, space: SearchSpace) -> dict:
    info = {"format": "ddsm-search/search-run", "version": 1,
            "supernet": {"path": str(supernet.path.resolve()), "sha256": supernet.sha256},
            "search": {k: v for k, v in asdict(q).items() if k not in ("generations", "workers", "backend")},
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
               wait_for_workers: float = 0.0, **overrides) -> RunFiles:
    """Run (or resume) the schedule search described by `cfg.search`; return the run's files.

    Everything is checked (settings against the supernet, the space, the budget, the cluster) before
    anything is written; a search that fails before its first evaluation leaves no run directory.
    """
    q = replace(cfg.search, **{k: v for k, v in overrides.items() if v is not None})
    validate_search(replace(cfg, search=q))
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

    from ..step_groups import seed_genomes

    algorithm = make_algorithm(q.algorithm, space, q.population, q.seed, feasible,
                               seed_genomes(space, supernet.config.diffusion, q.seed_prior))
    evaluator_args = {"supernet_dir": str(supernet.path), "search": asdict(q), "device": device, "cache_dir": cache_dir}
    from .evaluator import Evaluator, prepare_reference

    # once, before the workers start, so they all read the same cache and run each subnet on the same backend
    evaluator_args["backends"] = prepare_reference(**evaluator_args)
    # the pool before run.json: a cluster that cannot be reached leaves no half-started run behind
    pool = (LocalPool(lambda: Evaluator(**evaluator_args)) if q.workers == 0
            else RayPool(q.workers, evaluator_args, address, wait_for_workers=wait_for_workers))
    loop = _Loop(q, space, files, pool, flops_of, feasible, full, progress, limit)
    try:
        files.write_run(info)  # on resume: the supernet's current path, if it moved (same hash)
        for gen in range(q.generations):
            if not loop.generation(gen, algorithm):
                if progress:
                    print(f"the search space is exhausted after generation {gen}: the algorithm has no new "
                          "schedule to propose", flush=True)
                break
    except BaseException:
        if created and not files.rows:  # nothing was evaluated: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        pool.close()
    return files


class _Loop:
    """One search's generation loop: evaluate what is new, tell the algorithm, record the front."""

    def __init__(self, q: SearchConfig, space: SearchSpace, files: RunFiles, pool, flops_of, feasible, full: float,
                 progress: bool, limit: float | None = None):
        self.q, self.space, self.files, self.pool, self.limit = q, space, files, pool, limit
        self.flops_of, self.feasible, self.full, self.progress = flops_of, feasible, full, progress
        self.reference = None

    def _row(self, key: str, genome, result: dict, gen: int, worker: int, screen_score: float) -> dict:
        # executed, for a dynamic schedule (the evaluator measures it); the FLOPs table's otherwise
        flops = result["gflops"] * 1e9 if "gflops" in result else self.flops_of(genome)
        return {"schedule": key, "genome": " ".join(map(str, genome)), "gflops": flops / 1e9,
                "gflops_sd": result.get("gflops_sd", 0.0), "flops_share": flops / self.full, "fid": result["fid"], "kid": result["kid"], "drift": result["drift"],
                "samples": result["samples"], "seed_set": result["seed_set"], "generation": gen, "worker": worker,
                "seconds": result["seconds"], "steps_run": result["steps_run"], "steps_saved": result["steps_saved"],
                "screen_score": screen_score}

    def _promising(self, genome, screen: dict, gen: int) -> bool:
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

    def _evaluate(self, todo: dict, gen: int) -> None:
        """Evaluate the new schedules (screening first if asked) and record each row as it lands."""
        q = self.q
        bar = tqdm(total=len(todo), desc=f"generation {gen + 1}/{q.generations}", unit="eval",
                   disable=not self.progress, leave=False)
        jobs = [(key, plan) for key, (plan, _) in todo.items()]
        screens: dict[str, dict] = {}
        if q.screen_samples:
            screens = {key: result for key, result, _ in self.pool.run(jobs, q.screen_samples)}
            promising = {key for key in screens if self._promising(todo[key][1], screens[key], gen)}
            for key, (_, genome) in todo.items():
                if key not in promising:  # its screen is its record: dominated by more than the noise margin
                    self.files.add(self._row(key, genome, screens[key], gen, -1, screens[key][q.metric]))
                    bar.update(1)
            jobs = [(key, plan) for key, plan in jobs if key in promising]
        for key, result, worker in self.pool.run(jobs, q.samples):
            screen_score = screens[key][q.metric] if key in screens else math.nan
            self.files.add(self._row(key, todo[key][1], result, gen, worker, screen_score))
            bar.update(1)
        bar.close()

    def generation(self, gen: int, algorithm) -> bool:
        """Run one generation: ask, evaluate what is new, tell, write the front and its hypervolume.

        Return False, doing nothing, if the algorithm has nothing new to ask (the space is exhausted).
        """
        q, started = self.q, time.perf_counter()
        genomes = algorithm.ask()
        if not genomes:
            return False
        todo = {}
        for g in genomes:
            subnets, exit = self.space.plan(g)
            key = plan_key(subnets, exit)
            if self.feasible(g) and key not in self.files.rows:
                todo[key] = (subnets if exit is None else (subnets, exit), g)
        self._evaluate(todo, gen)
        objectives = []
        for g in genomes:
            row = self.files.rows.get(plan_key(*self.space.plan(g)))
            # a dynamic schedule's FLOPs are known once sampled: over the budget, it is infeasible
            fits = row is not None and self.feasible(g) and (self.limit is None or row["gflops"] * 1e9 <= self.limit)
            gflops = float(row["gflops"]) if row is not None else self.flops_of(g) / 1e9
            objectives.append((gflops, float(row[q.metric]) if fits else math.inf))
        algorithm.tell(genomes, objectives)
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
                   f"hv_ref_{q.metric}": self.reference[1], "seconds": round(time.perf_counter() - started, 2)}
        self.files.record_generation(summary, front)
        if self.progress:
            print(f"generation {gen + 1}/{q.generations}: {len(todo)} new evaluations ({len(table)} in all), "
                  f"best {q.metric.upper()} {summary[f'best_{q.metric}']:.4g}, front {len(front)}, "
                  f"hypervolume {hv:.4g}, {summary['seconds']:.1f} s", flush=True)
        return True
