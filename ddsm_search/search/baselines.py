"""Baselines: what a user has without any search, scored and timed like a search's schedules.

A run's baselines are full size under each of its solvers at each of its numbers of steps on each of
its spacings, and the uniform schedules that method families offer at full size (feature caching:
every interval of search.cache_intervals, default 2, 3 and 5, at each of search.cache_branches) under
each solver at the most steps. `measure` scores them as the search scores its candidates (its
Evaluator: the search seed set, its sample count and metric), reusing the run's own rows where it
evaluated the same plan, and times them on this machine (`seconds_per_image`: the median of 3 runs of
one batch of TIME_BATCH images, each subnet on its faster backend, all plans taking turns). What is
measured is kept beside the supernet (baselines.csv; in the cache directory where that folder cannot
be written), keyed by what decides it, so a report or an export made again measures nothing twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..backends.choice import cpu_name, machine_key
from ..config import SearchConfig
from ..errors import DDSMError
from ..io import cache_dir as default_cache_dir
from ..io import write_atomic
from ..sampling import Runtime, time_plans
from ..solvers.base import Solver, timesteps_for
from ..space.plugins import families
from ..space.steps import Step
from .genome import Candidate, SearchSpace

FILE = "baselines.csv"
TIME_BATCH = 250  # images per timed run
QUALITY = ["fid", "kid", "drift", "gflops"]
COLUMNS = ["schedule", "samples", "seed_set", "metric", "drift_space", *QUALITY, "machine", "cpu", "batch",
           "seconds_per_image"]


def candidates(supernet, q: SearchConfig) -> list[tuple[str, str, Candidate]]:
    """Return (label, kind, Candidate) of the baselines of search settings `q` on a loaded supernet: kind
    "full size", or the family's label ("cache 2:1"). Full size runs every solver at every number of
    steps on every spacing (the label names the spacing where there are several: "unipc trailing 8");
    a family's uniform schedules run each solver at the most steps on the first spacing."""
    space = SearchSpace.for_supernet(supernet, q)
    full, T = supernet.model.full, space.num_timesteps

    def steps_of(n: int, spacing: str) -> tuple[list, list[int]]:
        timesteps = timesteps_for(T, n, spacing)
        return supernet.step_subnets([full] * n, timesteps), timesteps

    def name(solver, n: int, spacing: str) -> str:
        return f"{solver.key} {spacing} {n}" if len(space.spacings) > 1 else f"{solver.key} {n}"

    out = []
    for solver in space.solvers:
        for spacing in space.spacings:
            for n in space.step_choices:
                subnets, timesteps = steps_of(n, spacing)
                out.append((name(solver, n, spacing), "full size",
                            Candidate(tuple(Step(s) for s in subnets), solver, tuple(timesteps), spacing)))
    n, spacing = max(space.step_choices), space.spacings[0]
    subnets, timesteps = steps_of(n, spacing)
    for family in families():
        for label, values in family.baselines(supernet.model, q, n):
            steps = tuple(Step.of(s, **{family.field: v}) for s, v in zip(subnets, values))
            out += [(f"{name(solver, n, spacing)} {label}", label, Candidate(steps, solver, tuple(timesteps), spacing))
                    for solver in space.solvers]
    return out


def _files(supernet, cache_dir) -> list[Path]:
    spare = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [Path(supernet.path) / FILE, spare / "baselines" / f"{supernet.sha256[:16]}.csv"]


def _read(supernet, cache_dir) -> pd.DataFrame:
    for path in _files(supernet, cache_dir):
        try:
            frame = pd.read_csv(path, dtype={"schedule": str, "seed_set": str, "metric": str, "drift_space": str,
                                             "machine": str, "cpu": str})
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        if list(frame.columns) == COLUMNS:
            return frame
    return pd.DataFrame(columns=COLUMNS)


def _write(supernet, cache_dir, frame: pd.DataFrame) -> None:
    text = frame[COLUMNS].to_csv(index=False)
    for path in _files(supernet, cache_dir):
        try:
            write_atomic(path, lambda tmp: tmp.write_text(text))
            return
        except (OSError, DDSMError):
            continue


def measure(supernet_dir: str | Path, search: dict, *, device: str = "cpu", cache_dir=None,
            known: pd.DataFrame | None = None, timing: bool = True, progress: bool = False) -> pd.DataFrame:
    """Return one row per baseline of a run's search settings: `baseline` (its label), `kind` ("full
    size", or what a method family changes, such as "cache 2:1"), `schedule` (its plan key), `solver`, `sampling_steps`, `gflops`, `flops_share` (of the run's reference: full size
    under its sampler over search.steps), the run's metrics on its seed set and sample count, and
    `seconds_per_image` on this machine (NaN with `timing` off). `known`: the run's table, whose fully
    evaluated rows are reused for the same plan."""
    from ..checkpoint import load_supernet
    from .worker import SEARCH_SEEDS, Evaluator

    q = SearchConfig(**search)
    supernet = load_supernet(supernet_dir, device).with_cost(q.cost)
    chosen = candidates(supernet, q)
    stored = _read(supernet, cache_dir)
    setup = {"samples": q.samples, "seed_set": SEARCH_SEEDS, "metric": q.metric, "drift_space": q.drift_space}
    quality = {}
    for _, row in stored.iterrows():
        if all(row[k] == v for k, v in setup.items()) and not pd.isna(row["gflops"]):
            quality[row["schedule"]] = {k: float(row[k]) for k in QUALITY}
    if known is not None:
        rows = known[known["fully_evaluated"]] if "fully_evaluated" in known else known
        for _, row in rows.iterrows():
            quality.setdefault(row["schedule"], {k: float(row[k]) for k in QUALITY if k != "gflops"}
                               | {"gflops": float(row["gflops"])})
    missing = [c for _, _, c in chosen if c.key not in quality]
    if missing:
        evaluator = Evaluator(str(supernet.path), search, device=device, cache_dir=cache_dir)
        from tqdm.auto import tqdm

        for candidate in tqdm(missing, desc="baselines", unit="run", disable=not progress, leave=False):
            result = evaluator.evaluate(candidate)
            quality[candidate.key] = {k: float(result[k]) for k in QUALITY}
    machine, batch = machine_key(), TIME_BATCH
    seconds = {}
    for _, row in stored.iterrows():
        if row["machine"] == machine and row["batch"] == batch and not pd.isna(row["seconds_per_image"]):
            seconds[row["schedule"]] = float(row["seconds_per_image"])
    untimed = {c.key: c for _, _, c in chosen if c.key not in seconds}
    if timing and untimed:
        seconds.update(time_schedules(supernet, untimed, device=device, progress=progress))
    out = []
    full = supernet.full_schedule_flops(q.steps) / 1e9
    for label, kind, c in chosen:
        out.append({"baseline": label, "kind": kind, "schedule": c.key, "solver": c.solver.key, "sampling_steps": len(c.steps),
                    **quality[c.key], "flops_share": quality[c.key]["gflops"] / full,
                    "seconds_per_image": seconds.get(c.key, np.nan)})
    table = pd.DataFrame(out)
    fresh = pd.DataFrame([{**setup, "schedule": r["schedule"], **{k: r[k] for k in QUALITY}, "machine": machine,
                           "cpu": cpu_name(), "batch": batch, "seconds_per_image": r["seconds_per_image"]}
                          for r in out])
    kept = stored[~stored["schedule"].isin(fresh["schedule"])] if len(stored) else stored
    _write(supernet, cache_dir, pd.concat([kept, fresh[COLUMNS]], ignore_index=True) if len(kept) else fresh)
    return table


def time_schedules(supernet, plans: dict, *, device: str = "cpu", batch: int = TIME_BATCH, repeats: int = 3,
                   progress: bool = False) -> dict[str, float]:
    """Return {name: seconds per image} of schedules ({name: a Candidate, or a plan key}) sampling the same
    batch on this machine, taking turns (sampling.time_plans), each subnet on its faster backend."""
    if not plans:
        return {}
    runtime = Runtime(supernet, device=device, backend="auto", batch_size=batch)
    made = {}
    for name, what in plans.items():
        if isinstance(what, Candidate):
            made[name] = runtime.plan(list(what.steps), solver=what.solver, timesteps=what.timesteps)
        else:
            made[name] = runtime.plan_key(what)
    seconds, _, _ = time_plans(made, n=batch, seed=0, batch_size=batch, repeats=repeats, progress=progress,
                               desc="timing schedules")
    return {name: s / batch for name, s in seconds.items()}


def parse_reference(text: str, steps: int | None = None) -> tuple[Solver, int]:
    """Return (solver, steps) of a --reference such as 'unipc:8' or 'ddim(eta=0.5):20' (steps default:
    `steps`)."""
    solver, sep, count = str(text).rpartition(":") if ":" in str(text) else (str(text), "", "")
    try:
        n = int(count) if sep else steps
    except ValueError:
        n = None
    if n is None or n < 1:
        raise DDSMError(f"--reference {text!r}: expected SOLVER:STEPS, such as ddim:20 or unipc(order=3):8")
    try:
        return Solver.parse(solver), n
    except DDSMError as exc:
        raise DDSMError(f"--reference {text!r}: {exc}") from None
