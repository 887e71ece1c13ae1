"""The public generation API both executors drive: ask a generation, hand out what is new (screening
first, if asked, then full evaluations), record each result as it lands, tell the algorithm, write the
front and its hypervolume. The actor pool (executors/pool.py) and Ray Tune (executors/tune.py) run the
same `Loop`, so both write the same rows, fronts and hypervolumes. Generations are numbered from 1, in
the progress lines and in the run's files alike."""

from __future__ import annotations

import math
import time

from tqdm.auto import tqdm

from ..config import SearchConfig
from .genome import SearchSpace
from .pareto import front_of, hv_reference, hypervolume
from .results import RunFiles


class Generation:
    """One generation's evaluations, batch by batch (screening first, if asked, then full evaluations):
    which schedules to evaluate next, and each result recorded as it lands."""

    def __init__(self, loop: "Loop", gen: int, algorithm, genomes: list, todo: dict, started: float):
        self.loop, self.gen, self.algorithm, self.genomes, self.todo = loop, gen, algorithm, genomes, todo
        self.started = started
        self.screens: dict[str, dict] = {}
        self.phase = "new"  # new -> screen (if screening) -> full -> done
        q = loop.q
        self.bar = tqdm(total=len(todo), desc=f"generation {gen}/{q.generations}", unit="eval",
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


class Loop:
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

    def start(self, gen: int, algorithm) -> Generation | None:
        """Ask generation `gen` (the first is 1); return it with its feasible schedules that the table does
        not answer, or None if the algorithm has nothing new to ask (the space is exhausted)."""
        started = time.perf_counter()
        genomes = algorithm.ask()
        if not genomes:
            return None
        todo = {}
        for g in genomes:
            candidate = self.space.candidate(g)
            if self.feasible(g) and candidate.key not in self.files.rows:
                todo[candidate.key] = (candidate, g)
        return Generation(self, gen, algorithm, genomes, todo, started)

    def exhausted(self, gen: int) -> None:
        """Say that the search ended early: the algorithm had nothing new for generation `gen`."""
        if self.progress:
            print(f"the search space is exhausted after generation {gen - 1}: the algorithm has no new "
                  "schedule to propose", flush=True)

    def finish(self, generation: Generation) -> None:
        """Tell the algorithm the generation's objectives; write the front, its hypervolume and the summary."""
        q, gen, genomes, todo = self.q, generation.gen, generation.genomes, generation.todo
        generation.bar.close()
        objectives = []
        for g in genomes:
            row = self.files.rows.get(self.space.candidate(g).key)
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
            print(f"generation {gen}/{q.generations}: {len(todo)} new evaluations ({len(table)} in all), "
                  f"best {q.metric.upper()} {summary[f'best_{q.metric}']:.4g}, front {len(front)}, "
                  f"hypervolume {hv:.4g}, {summary['seconds']:.1f} s", flush=True)
