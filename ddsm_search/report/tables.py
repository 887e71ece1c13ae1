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
from ..methods.early_exit.policy import ExitPolicy, parse_plan
from ..space.subnet import Subnet
from ..search.pareto import front_mask, fully_evaluated, hv_reference, hypervolume as _hypervolume
from ..search.results import EVALUATIONS, GENERATIONS, read_evaluations, run_dir, run_info


def uniform_label(subnets: list[Subnet], full: Subnet, exit: ExitPolicy | None = None, step_axes=()):
    """Return what a uniform schedule (one subnet at every step, one exit threshold if any) changes from
    full size: 'full', 'width=0.5', 'depth=4', 'width=0.5,depth=4' or 'exit=0.8'; NaN for a schedule
    whose subnet or threshold changes. Axes that each step's timestep decides (`step_axes`: a multi-stage
    supernet's stage) are not part of it."""
    if step_axes:
        subnets = [Subnet.of(**{a: v for a, v in s.items if a not in step_axes}) for s in subnets]
    if len(set(subnets)) != 1 or (exit is not None and len(set(exit.thresholds)) != 1):
        return np.nan
    changed = {a: v for a, v in subnets[0].items if v != full.get(a)}
    parts = ([Subnet.of(**changed).key] if changed else []) + ([f"exit={exit.thresholds[0]!r}"] if exit else [])
    return ",".join(parts) if parts else "full"


def load_run(run: str | Path) -> pd.DataFrame:
    """Return one row per evaluated schedule, with `subnets` (one Subnet per step), `exit` (its exit
    policy, None for a static schedule; `gflops` are then those executed, `gflops_sd` their spread over
    images), `uniform` (for a
    schedule that runs one subnet throughout, what it changes from full size: see `uniform_label`;
    else NaN), `fully_evaluated` (scored on the run's full sample count, not screened out) and
    `on_front` (True for the non-dominated fully evaluated schedules on GFLOPs and the run's metric)."""
    path = run_dir(run)
    info = run_info(path)
    search = info["search"]
    metric, samples = search["metric"], int(search["samples"])
    full = Subnet.parse(info["base"]) if isinstance(info.get("base"), str) else Subnet.of(width=1.0)
    table = read_evaluations(path / EVALUATIONS)
    plans = table["schedule"].map(parse_plan)
    table["subnets"] = plans.map(lambda p: p[0])
    table["exit"] = plans.map(lambda p: p[1])
    step_axes = tuple(info.get("step_values", {}))
    table["uniform"] = [uniform_label(s, full, e, step_axes) for s, e in zip(table["subnets"], table["exit"])]
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
