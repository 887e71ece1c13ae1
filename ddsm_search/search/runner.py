"""The search loop: ask a generation, evaluate what is new (in parallel), tell, record the front.

Resuming replays the seeded algorithm from generation 0: every schedule already in the run's table
is answered from disk, so an interrupted search (kill -9 included) continues with no finished
evaluation lost or repeated, and reaches the same front it would have reached uninterrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import load_supernet
from ..config import ExperimentConfig, SearchConfig, parse_budget
from ..errors import DDSMError
from .algorithms import make_algorithm
from .pool import LocalPool, RayPool
from .results import RunFiles, front_of, hypervolume, schedule_key
from .space import SearchSpace


def budget_flops(budget, full_flops: float) -> float | None:
    """Return the budget in FLOPs per image (None for no budget), given full width's FLOPs per image."""
    if budget is None:
        return None
    value, is_percent = parse_budget(budget)
    return full_flops * value / 100 if is_percent else value * 1e9


def _run_info(q: SearchConfig, supernet, space: SearchSpace) -> dict:
    return {"format": "ddsm-search/search-run", "version": 1,
            "supernet": {"path": str(supernet.path.resolve()), "sha256": supernet.sha256},
            "search": {k: v for k, v in asdict(q).items() if k not in ("generations", "workers")},
            "widths": list(space.widths), "segments": [list(b) for b in space.bounds]}


def run_search(cfg: ExperimentConfig, supernet_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
               address: str | None = None, progress: bool = True, device: str = "cpu", cache_dir: str | None = None,
               **overrides) -> RunFiles:
    """Run (or resume) the schedule search described by `cfg.search`; return the run's files."""
    q = replace(cfg.search, **{k: v for k, v in overrides.items() if v is not None})
    from ..config import validate_search

    validate_search(replace(cfg, search=q))
    supernet = load_supernet(supernet_dir)
    widths = tuple(supernet.model.check_width(w) for w in (q.widths or supernet.model.widths))
    space = SearchSpace(widths, q.steps, q.segments)
    full = supernet.flops[1.0] * q.steps
    limit = budget_flops(q.budget, full)
    cheapest = supernet.schedule_flops([min(widths)] * q.steps)
    if limit is not None and cheapest > limit:
        raise DDSMError(f"budget {q.budget} ({limit / 1e9:.4f} GFLOPs per image) is below the cheapest schedule "
                        f"({cheapest / 1e9:.4f} GFLOPs, all steps at width {min(widths):g})")

    def flops_of(genome) -> float:
        return supernet.schedule_flops(space.decode(genome))

    def feasible(genome) -> bool:
        return limit is None or flops_of(genome) <= limit

    files = RunFiles(out_dir)
    info = _run_info(q, supernet, space)
    if files.has_run() and not resume:
        raise DDSMError(f"{files.dir} already holds a search run; pass --resume to continue it or choose another --out")
    if resume:
        if not files.has_run():
            raise DDSMError(f"--resume: no search run in {files.dir}")
        if files.read_run() != info:
            raise DDSMError(f"--resume: {files.dir} was searched with other settings or another supernet")
    files.write_run(info)

    algorithm = make_algorithm(q.algorithm, space, q.population, q.seed, feasible)
    evaluator_args = {"supernet_dir": str(supernet.path), "search": asdict(q), "device": device, "cache_dir": cache_dir}
    from .evaluator import Evaluator, prepare_reference

    prepare_reference(**evaluator_args)  # once, before the workers start, so they all read the same cache
    pool = LocalPool(lambda: Evaluator(**evaluator_args)) if q.workers == 0 else RayPool(q.workers, evaluator_args, address)
    reference = None
    try:
        for gen in range(q.generations):
            started = time.perf_counter()
            genomes = algorithm.ask()
            todo = {}
            for g in genomes:
                key = schedule_key(space.decode(g))
                if feasible(g) and key not in files.rows:
                    todo[key] = (key, space.decode(g), g)
            bar = tqdm(total=len(todo), desc=f"generation {gen + 1}/{q.generations}", unit="eval",
                       disable=not progress, leave=False)
            for key, result, worker in pool.run([(k, w) for k, w, _ in todo.values()]):
                genome = todo[key][2]
                files.add({"schedule": key, "genome": " ".join(map(str, genome)), "gflops": flops_of(genome) / 1e9,
                           "flops_share": flops_of(genome) / full, "fid": result["fid"], "kid": result["kid"],
                           "samples": result["samples"], "seed_set": result["seed_set"], "generation": gen,
                           "worker": worker, "seconds": result["seconds"], "steps_run": result["steps_run"],
                           "steps_saved": result["steps_saved"]})
                bar.update(1)
            bar.close()
            objectives = []
            for g in genomes:
                row = files.rows.get(schedule_key(space.decode(g)))
                objectives.append((flops_of(g) / 1e9, float(row[q.metric]) if row is not None and feasible(g) else math.inf))
            algorithm.tell(genomes, objectives)
            table = files.table()
            front = front_of(table, q.metric)
            if reference is None:  # fixed after the first generation, which every algorithm shares
                reference = (1.05, 1.1 * float(table[q.metric].max()))
            hv = hypervolume(front, reference, q.metric)
            infeasible = sum(not feasible(g) for g in genomes)
            summary = {"generation": gen, "asked": len(genomes), "infeasible": infeasible,
                       "answered_from_table": len(genomes) - infeasible - len(todo), "new": len(todo),
                       "evaluations": len(table),
                       f"best_{q.metric}": float(table[q.metric].min()), "front_size": len(front),
                       "hypervolume": hv, "hv_ref_flops_share": reference[0], f"hv_ref_{q.metric}": reference[1],
                       "seconds": round(time.perf_counter() - started, 2)}
            files.record_generation(summary, front)
            if progress:
                print(f"generation {gen + 1}/{q.generations}: {len(todo)} new evaluations ({len(table)} in all), "
                      f"best {q.metric.upper()} {summary[f'best_{q.metric}']:.3f}, front {len(front)}, "
                      f"hypervolume {hv:.4f}, {summary['seconds']:.1f} s", flush=True)
        files.cache_stats = pool.stats()
    finally:
        pool.close()
    return files
