"""A finished search as pandas: every schedule with a front marker, the front, hypervolume, and the
best schedule for a FLOP budget.

`load_run` returns a DataFrame whose `attrs` hold the run's metric and sample count, so `front`,
`hypervolume` and `pick` use the run's own metric unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import budget_gflops
from ..errors import DDSMError
from ..search.pareto import front_mask, fully_evaluated, hv_reference
from ..search.pareto import hypervolume as _hypervolume
from ..search.results import EVALUATIONS, GENERATIONS, legacy_head, read_evaluations, run_dir, run_info
from ..space.steps import Step, parse_plan_key, split_head
from ..space.subnet import Subnet


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


def load_run(run: str | Path) -> pd.DataFrame:
    """Return one row per evaluated schedule, with `steps` (what each step runs: space.steps.Step; a
    schedule with dynamic steps has its `gflops` executed, `gflops_sd` their spread over images),
    `subnets` (one Subnet per step), `solver` (its text), `sampling_steps` and `spacing` (its timesteps'
    spacing, or "t=..." for an explicit list), `uniform` (for a schedule that runs one step throughout,
    what it changes from full size: see `uniform_label`; else NaN), `fully_evaluated` (scored on the
    run's full sample count, not screened out) and `on_front` (True for the non-dominated fully
    evaluated schedules on GFLOPs and the run's metric)."""
    path = run_dir(run)
    info = run_info(path)
    search = info["search"]
    metric, samples = search["metric"], int(search["samples"])
    full = Subnet.parse(info["base"]) if isinstance(info.get("base"), str) else Subnet.of(width=1.0)
    table = read_evaluations(path / EVALUATIONS, legacy_head(info))
    table["steps"] = table["schedule"].map(parse_plan_key)
    heads = table["schedule"].map(lambda key: (split_head(key)[0] or "ddim uniform").rpartition(" "))
    table["solver"] = heads.map(lambda h: h[0])
    table["sampling_steps"] = table["steps"].map(len)
    table["spacing"] = heads.map(lambda h: h[2])
    table["subnets"] = table["steps"].map(lambda steps: [s.subnet for s in steps])
    step_axes = tuple(info.get("step_values", {}))
    table["uniform"] = [uniform_label(s, full, step_axes) for s in table["steps"]]
    table["fully_evaluated"] = fully_evaluated(table, metric, samples)
    table["on_front"] = front_mask(table, metric, samples)
    table.attrs.update(metric=metric, samples=samples, cost=info.get("cost", "dense"))
    return table


def _metric(table: pd.DataFrame, metric: str | None) -> str:
    return metric or table.attrs.get("metric") or "fid"


def front(table: pd.DataFrame) -> pd.DataFrame:
    """Return the front alone, sorted by GFLOPs."""
    return table[table["on_front"]].sort_values("gflops").reset_index(drop=True)


def generations(run: str | Path) -> pd.DataFrame:
    """Return the per-generation summary: evaluations, best metric, front size, hypervolume."""
    path = run_dir(run) / GENERATIONS
    if not path.is_file():
        raise DDSMError(f"{path.parent} has no finished generation yet (no {GENERATIONS}); resume the search with "
                        "'ddsm-search search ... --resume'")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DDSMError(f"{path} is not a readable table: {str(exc).splitlines()[0]}") from None


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
