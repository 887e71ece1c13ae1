"""The front and its indicators, kept apart from the run's files as pymoo keeps indicators apart: which
rows are fully evaluated, which of them are non-dominated on (GFLOPs, metric), and the hypervolume
with its reference point."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import DDSMError


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Return a boolean mask of the non-dominated rows of `points` (all objectives minimised)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(points), dtype=bool)
    if len(points):
        mask[NonDominatedSorting().do(points, only_non_dominated_front=True)] = True
    return mask


def fully_evaluated(table: pd.DataFrame, metric: str, samples: int) -> np.ndarray:
    """Return a mask of the rows scored on the run's full sample count with a finite metric.

    Rows screened out on fewer images are records, not comparable scores: the one definition of which
    rows may be on the front, used by the runner, the report, `pick` and the command line.
    """
    scored = np.isfinite(pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=float))
    return scored & (table["samples"].to_numpy() == samples)


def front_mask(table: pd.DataFrame, metric: str, samples: int) -> np.ndarray:
    """Return a mask of the front: the fully evaluated rows that no other one dominates on (GFLOPs, metric)."""
    ok = fully_evaluated(table, metric, samples)
    mask = np.zeros(len(table), dtype=bool)
    mask[ok] = pareto_mask(table.loc[ok, ["gflops", metric]].to_numpy(dtype=float))
    return mask


def front_of(table: pd.DataFrame, metric: str, samples: int) -> pd.DataFrame:
    """Return the front (see `front_mask`) sorted by GFLOPs."""
    front = table[front_mask(table, metric, samples)]
    return front.sort_values(["gflops", metric]).reset_index(drop=True)


def hv_reference(table: pd.DataFrame, metric: str, samples: int) -> tuple[float, float]:
    """Return the hypervolume reference point: (1.05 of full-size FLOPs, a little worse than the worst
    fully evaluated score of the first generation, which every algorithm shares).

    "A little worse" is 10% of the score's size or of its spread, whichever is larger, so the point
    stays beyond every score for metrics that can be negative (KID) too; for FID it is 1.1 x the worst.
    """
    ok = fully_evaluated(table, metric, samples)
    first = ok & (table["generation"].to_numpy() == table.loc[ok, "generation"].min()) if ok.any() else ok
    values = table.loc[first, metric].to_numpy(dtype=float)
    if not len(values):
        raise DDSMError("no fully evaluated schedule yet: the hypervolume has no reference point")
    worst, best = float(values.max()), float(values.min())
    return 1.05, worst + 0.1 * max(worst - best, abs(worst), 1e-12)


def hypervolume(front: pd.DataFrame, reference: tuple[float, float], metric: str) -> float:
    """Return the hypervolume of the front in (share of full-size FLOPs, metric) below `reference`."""
    from pymoo.indicators.hv import HV

    pts = front[["flops_share", metric]].to_numpy(dtype=float)
    pts = pts[(pts < np.asarray(reference)).all(axis=1)]
    return float(HV(ref_point=np.asarray(reference, dtype=float))(pts)) if len(pts) else 0.0
