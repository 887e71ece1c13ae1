"""A finished search as pandas: every schedule with a front marker, the front, hypervolume, and the
best schedule for a FLOP budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .config import budget_gflops
from .errors import DDSMError
from .search.results import EVALUATIONS, GENERATIONS, RUN, hypervolume as _hypervolume, pareto_mask, parse_schedule


def _run_dir(run: str | Path) -> Path:
    path = Path(run)
    if not (path / RUN).is_file() or not (path / EVALUATIONS).is_file():
        raise DDSMError(f"{path} is not a search run directory (no {RUN} and {EVALUATIONS}; run 'ddsm-search search')")
    return path


def run_info(run: str | Path) -> dict:
    """Return a run's run.json: its supernet, search settings, widths and segments."""
    return json.loads((_run_dir(run) / RUN).read_text())


def load_run(run: str | Path) -> pd.DataFrame:
    """Return one row per evaluated schedule, with `widths` (a list), `uniform` (its width if all steps
    share one, else NaN) and `on_front` (True for the non-dominated fully evaluated schedules on GFLOPs
    and the run's metric)."""
    path = _run_dir(run)
    search = run_info(path)["search"]
    metric = search["metric"]
    table = pd.read_csv(path / EVALUATIONS)
    table["widths"] = table["schedule"].map(parse_schedule)
    table["uniform"] = table["widths"].map(lambda w: w[0] if len(set(w)) == 1 else np.nan)
    # rows screened out on fewer samples are not comparable with fully evaluated ones
    ok = np.isfinite(table[metric].to_numpy(dtype=float)) & (table["samples"] == search["samples"]).to_numpy()
    mask = np.zeros(len(table), dtype=bool)
    mask[ok] = pareto_mask(table.loc[ok, ["gflops", metric]].to_numpy(dtype=float))
    table["on_front"] = mask
    return table


def front(table: pd.DataFrame) -> pd.DataFrame:
    """Return the front alone, sorted by GFLOPs."""
    return table[table["on_front"]].sort_values("gflops").reset_index(drop=True)


def generations(run: str | Path) -> pd.DataFrame:
    """Return the per-generation summary: evaluations, best metric, front size, hypervolume."""
    return pd.read_csv(_run_dir(run) / GENERATIONS)


def hypervolume(table: pd.DataFrame, reference: tuple[float, float] | None = None, metric: str = "fid") -> float:
    """Return the front's hypervolume in (share of full-width FLOPs, metric); default reference:
    (1.05, 1.1 x the worst metric in the table)."""
    if reference is None:
        reference = (1.05, 1.1 * float(table[metric].max()))
    return _hypervolume(front(table), reference, metric)


def pick(table: pd.DataFrame, budget: float | str, metric: str = "fid") -> pd.Series:
    """Return the evaluated schedule with the lowest metric whose GFLOPs fit the budget."""
    full = float((table["gflops"] / table["flops_share"]).iloc[0])
    limit = budget_gflops(budget, full)
    full_rows = table["samples"] == table["samples"].max()  # not the rows screened out on fewer samples
    fits = table[(table["gflops"] <= limit * (1 + 1e-9)) & np.isfinite(table[metric].astype(float)) & full_rows]
    if fits.empty:
        cheapest = table["gflops"].min()
        raise DDSMError(f"budget {budget} ({limit:.4f} GFLOPs per image) is below the cheapest evaluated schedule "
                        f"({cheapest:.4f} GFLOPs, {cheapest / full:.0%} of full width)")
    return fits.sort_values([metric, "gflops"]).iloc[0]
