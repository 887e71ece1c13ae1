"""A finished search as pandas: every schedule with a front marker, the front, hypervolume, and the
best schedule for a FLOP budget.

`load_run` returns a DataFrame of plain columns (text, numbers, booleans: `load_run(run).to_parquet(...)`
works) whose `attrs` hold the run's metric and sample count, so `front`, `hypervolume` and `pick` use
the run's own metric unless told otherwise. A row's schedule key is text: `row_steps(row)` and
`row_subnets(row)` parse it into what each step runs; `steps(table)` spreads the schedules into one row
per step, every axis and field a column. Generations are numbered from 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import budget_gflops
from ..errors import DDSMError
from ..search.pareto import front_mask, fully_evaluated, hv_reference
from ..search.pareto import hypervolume as _hypervolume
from ..search.results import (EVALUATIONS, generation_offset, legacy_head, read_evaluations, read_generations,
                              run_dir, run_info)
from ..space.steps import Step, parse_plan_key, split_head
from ..space.subnet import Subnet, schedule_key


def uniform_label(steps: list, full: Subnet, step_axes=()):
    """Return what a uniform schedule (one step at every step: one subnet, the same extras) changes from
    full size: 'full', 'width=0.5', 'depth=4', 'width=0.5,depth=4' or a field's value such as
    'exit=0.8'; NaN for a schedule whose steps change. Axes that each step's timestep decides
    (`step_axes`: a multi-stage supernet's stage) are not part of it."""
    steps = [s if isinstance(s, Step) else Step(s) for s in steps]  # subnets too
    if step_axes:
        steps = [s.replace(Subnet.of(**{a: v for a, v in s.subnet.items if a not in step_axes})) for s in steps]
    if len(set(steps)) != 1:
        return np.nan
    step = steps[0]
    changed = {a: v for a, v in step.subnet.items if v != full.get(a)}
    parts = ([Subnet.of(**changed).key] if changed else []) + [f"{f}={v!r}" for f, v in step.extras]
    return ",".join(parts) if parts else "full"


def row_steps(row) -> list[Step]:
    """Return what each step of a run table's row runs (space.steps.Step), parsed from its `schedule` key."""
    return list(parse_plan_key(row["schedule"]))


def row_subnets(row) -> list[Subnet]:
    """Return the subnet of each step of a run table's row, parsed from its `schedule` key."""
    return [s.subnet for s in row_steps(row)]


def _genes(genomes: pd.Series, path: Path) -> pd.DataFrame:
    """Return the space-separated genomes of evaluations.csv as one integer column per gene (gene_0, ...)."""
    parts = genomes.str.split()
    if parts.isna().any() or parts.map(len).nunique() > 1:
        raise DDSMError(f"{path}: the genome column must hold genomes of one length (whole numbers)")
    try:
        genes = np.array(parts.tolist(), dtype=np.int64).reshape(len(parts), -1)
    except ValueError:
        raise DDSMError(f"{path}: the genome column must hold whole numbers") from None
    return pd.DataFrame(genes, index=genomes.index, columns=[f"gene_{i}" for i in range(genes.shape[1])])


def load_run(run: str | Path) -> pd.DataFrame:
    """Return one row per evaluated schedule, in plain columns: `schedule` (its key: what each step runs;
    `row_steps(row)` parses it; a schedule with dynamic steps has its `gflops` executed, `gflops_sd` their
    spread over images), `gene_0`, `gene_1`, ... (its genome, whole numbers), `generation` (from 1),
    `solver` (its text), `sampling_steps`, `spacing` (its timesteps' spacing, or "t=..." for an explicit
    list), `subnets` (the key of its subnets alone, without the fields of method families), `uniform`
    (for a schedule that runs one step throughout, what it changes from full size: see `uniform_label`;
    else NaN), `fully_evaluated` (scored on the run's full sample count, not screened out) and `on_front`
    (True for the non-dominated fully evaluated schedules on GFLOPs and the run's metric)."""
    path = run_dir(run)
    info = run_info(path)
    search = info["search"]
    metric, samples = search["metric"], int(search["samples"])
    full = Subnet.parse(info["base"]) if isinstance(info.get("base"), str) else Subnet.of(width=1.0)
    table = read_evaluations(path / EVALUATIONS, legacy_head(info))
    table["generation"] += generation_offset(info)  # runs written before version 2 counted from 0
    genes = _genes(table["genome"], path / EVALUATIONS)
    at = table.columns.get_loc("genome")
    table = pd.concat([table.iloc[:, :at], genes, table.iloc[:, at + 1:]], axis=1)
    plans = table["schedule"].map(parse_plan_key)
    heads = table["schedule"].map(lambda key: (split_head(key)[0] or "ddim uniform").rpartition(" "))
    table["solver"] = heads.map(lambda h: h[0])
    table["sampling_steps"] = plans.map(len).astype("int64")
    table["spacing"] = heads.map(lambda h: h[2])
    table["subnets"] = plans.map(lambda plan: schedule_key([s.subnet for s in plan]))
    step_axes = tuple(info.get("step_values", {}))
    table["uniform"] = [uniform_label(plan, full, step_axes) for plan in plans]
    table["fully_evaluated"] = fully_evaluated(table, metric, samples)
    table["on_front"] = front_mask(table, metric, samples)
    table.attrs.update(metric=metric, samples=samples, cost=info.get("cost", "dense"))
    return table


def steps(table: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (schedule, sampling step) of a run table: `schedule`, `step` (0: the noisiest),
    each axis of the step's subnet (`width`, `depth`, ...) and each field of a method family that any
    step has (`exit`, `group`, ...; missing where a step has none)."""
    rows = [{"schedule": key, "step": index, **dict(step.subnet.items), **dict(step.extras)}
            for key in table["schedule"] for index, step in enumerate(parse_plan_key(key))]
    frame = pd.DataFrame(rows, columns=None if rows else ["schedule", "step"])
    frame.attrs.update(table.attrs)
    return frame


def _metric(table: pd.DataFrame, metric: str | None) -> str:
    return metric or table.attrs.get("metric") or "fid"


def front(table: pd.DataFrame) -> pd.DataFrame:
    """Return the front alone, sorted by GFLOPs."""
    return table[table["on_front"]].sort_values("gflops").reset_index(drop=True)


def generations(run: str | Path) -> pd.DataFrame:
    """Return the per-generation summary (generations numbered from 1): evaluations, best metric, front
    size, hypervolume."""
    path = run_dir(run)
    return read_generations(path, run_info(path))


def hypervolume(table: pd.DataFrame, reference: tuple[float, float] | None = None, metric: str | None = None) -> float:
    """Return the front's hypervolume in (share of full-size FLOPs, metric); default metric: the run's;
    default reference: the runner's (`search.results.hv_reference`), so the figure matches generations.csv."""
    metric = _metric(table, metric)
    samples = int(table.attrs.get("samples", table["samples"].max()))
    if reference is None:
        reference = hv_reference(table, metric, samples)
    return _hypervolume(table[front_mask(table, metric, samples)], reference, metric)


def pick(table: pd.DataFrame, budget: float | str, metric: str | None = None) -> pd.Series:
    """Return the fully evaluated schedule with the lowest metric (default: the run's) whose GFLOPs fit the budget."""
    metric = _metric(table, metric)
    full = float((table["gflops"] / table["flops_share"]).iloc[0])
    limit = budget_gflops(budget, full)
    fits = table[(table["gflops"] <= limit * (1 + 1e-9)) & table["fully_evaluated"]]
    if fits.empty:
        cheapest = table.loc[table["fully_evaluated"], "gflops"].min()
        raise DDSMError(f"budget {budget} ({limit:.4f} GFLOPs per image) is below the cheapest evaluated schedule "
                        f"({cheapest:.4f} GFLOPs, {cheapest / full:.0%} of full size)")
    return fits.sort_values([metric, "gflops"]).iloc[0]
