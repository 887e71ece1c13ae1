"""The search loop: ask a generation, evaluate what is new (in parallel), tell, record the front.

One generation loop (search/loop.py) serves both executors: the actor pool (`search.executor: pool`,
default) and Ray Tune (`tune`, executors/tune.py), which drives the same `Generation` batches from a Tune
Searcher, so both write the same rows, fronts and hypervolumes.

Resuming replays the seeded algorithm from generation 1: every schedule already in the run's table
is answered from disk, so an interrupted search (kill -9 included) continues with no finished
evaluation lost or repeated, and reaches the same front it would have reached uninterrupted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from ..checkpoint import load_supernet
from ..config import ExperimentConfig, SearchConfig, budget_gflops, validate_search
from ..errors import DDSMError
from ..io import cache_dir as default_cache_dir
from ..space.plugins import families, family_of_field
from ..solvers.base import timesteps_for
from ..space.subnet import schedule_key
from .algorithms import make_algorithm
from .executors.pool import LocalPool, PoolExecutor, RayPool
from .genome import SearchSpace
from .loop import Loop
from .ray_cluster import in_ray_job
from .results import RUN_VERSION, RunFiles

# settings that do not change what a run finds: a run may be resumed with other values of them
_NOT_RECORDED = ("generations", "workers", "backend", "executor")


def _run_info(q: SearchConfig, supernet, space: SearchSpace) -> dict:
    info = {"format": "ddsm-search/search-run", "version": RUN_VERSION,
            "supernet": {"path": str(supernet.path.resolve()), "sha256": supernet.sha256},
            "search": {k: v for k, v in asdict(q).items() if k not in _NOT_RECORDED},
            "axes": space.searched.to_json(), "base": space.base.key, "segments": [list(b) for b in space.bounds],
            "cost": supernet.cost}  # the FLOPs the run counts: dense, or sparse (nonzero weights; search.cost)
    if space.step_axis is not None:  # a multi-stage supernet: the stage each step of the reference grid runs
        info["step_values"] = {space.step_axis: list(dict(space.grid_values)[(q.steps, space.spacings[0])])}
    return json.loads(json.dumps(info))  # as it reads back from run.json (tuples become lists)


def _same_run(saved: dict, info: dict) -> bool:
    """Return True if a run on disk was made with these settings and this supernet (wherever it lies now).

    Settings added since the run was written count as their defaults (the run was made with those).
    """
    defaults = {k: v for k, v in json.loads(json.dumps(asdict(SearchConfig()))).items()}

    def strip(d: dict) -> dict:
        search = {**{k: defaults[k] for k in defaults if k in info["search"]}, **d.get("search", {})}
        return {"cost": "dense", **d, "search": search, "supernet": {"sha256": d.get("supernet", {}).get("sha256")},
                "version": None}  # a run's keys are read in the current form whatever version wrote them
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
    cheapest = supernet.schedule_flops(cheapest_plan, timesteps_for(space.num_timesteps, len(cheapest_plan),
                                                                    space.spacings[0]))
    if limit is not None and cheapest > limit:
        raise DDSMError(f"budget {q.budget} ({limit / 1e9:.4f} GFLOPs per image) is below the cheapest schedule "
                        f"({cheapest / 1e9:.4f} GFLOPs, {schedule_key(cheapest_plan)})")

    def flops_of(genome) -> float:
        """Return a schedule's FLOPs per image; for a dynamic one, a lower bound known before sampling
        (each dynamic step at the cheapest subnet its family says it may execute): what it executes is
        measured."""
        candidate, steps = space.candidate(genome), []
        for step in candidate.steps:
            subnet = step.subnet
            for name, value in step.extras:
                subnet = family_of_field(name).lower_bound(subnet, value, supernet.model.space)
            steps.append(step.replace(subnet))
        return supernet.steps_flops(steps, candidate.timesteps)

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

    seeds = [g for f in families() for g in f.seed_genomes(space, supernet.config.diffusion, q)]
    algorithm = make_algorithm(q.algorithm, space, q.population, q.seed, feasible, seeds)
    # absolute paths: Ray's workers, and Tune's trials (each in a directory of its own), run elsewhere
    evaluator_args = {"supernet_dir": str(supernet.path.resolve()), "search": asdict(q), "device": device,
                      "cache_dir": str(Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir().resolve())}
    from .worker import Evaluator, prepare_reference

    # once, before the workers start, so they all read the same cache and run each subnet on the same backend
    evaluator_args["backends"] = prepare_reference(**evaluator_args)
    loop = Loop(q, space, files, flops_of, feasible, full, progress, limit, bars=q.executor == "pool")
    # the pool (or Ray, for Tune) before run.json: a cluster that cannot be reached leaves no half-started run
    if q.executor == "tune":
        from .executors.tune import TuneExecutor

        executor = TuneExecutor(loop, algorithm, evaluator_args, address, resume=resume, loggers=loggers)
    else:
        pool = (LocalPool(lambda: Evaluator(**evaluator_args)) if q.workers == 0
                else RayPool(q.workers, evaluator_args, address, wait_for_workers=wait_for_workers))
        executor = PoolExecutor(loop, algorithm, pool)
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


