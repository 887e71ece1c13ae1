"""A search run's files: one row per evaluation, the front and its hypervolume per generation.

Every file is rewritten atomically after each change, so a run killed at any moment (kill -9) leaves
whole files, and `--resume` finds every finished evaluation on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DDSMError
from ..io import write_atomic, write_json_atomic
from ..exit_policy import canonical_plan_key

EVALUATIONS, GENERATIONS, FRONT, RUN = "evaluations.csv", "generations.csv", "front.csv", "run.json"
COLUMNS = ["schedule", "genome", "gflops", "gflops_sd", "flops_share", "fid", "kid", "drift", "samples", "seed_set", "generation",
           "worker", "seconds", "steps_run", "steps_saved", "screen_score"]


# columns read as text: a one-step schedule key ("1.0") or a one-gene genome ("0") must not become a number
TEXT_COLUMNS = {"schedule": str, "genome": str, "seed_set": str}


def read_evaluations(path: Path) -> pd.DataFrame:
    """Return evaluations.csv as a DataFrame with text keys in canonical form, or raise DDSMError."""
    try:
        frame = pd.read_csv(path, dtype=TEXT_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DDSMError(f"{path} is not a readable table: {str(exc).splitlines()[0]}") from None
    if "drift" not in frame.columns:  # runs written before drift existed
        frame.insert(frame.columns.get_loc("kid") + 1 if "kid" in frame.columns else len(frame.columns), "drift",
                     float("nan"))
    if "gflops_sd" not in frame.columns:  # runs written before dynamic exit: every schedule static
        frame.insert(frame.columns.get_loc("gflops") + 1 if "gflops" in frame.columns else len(frame.columns),
                     "gflops_sd", 0.0)
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise DDSMError(f"{path} lacks columns {sorted(missing)}")
    frame["schedule"] = frame["schedule"].map(canonical_plan_key)
    return frame


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


class RunFiles:
    """The files of one search run directory, and the evaluations already on disk."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.rows: dict[str, dict] = {}
        if (self.dir / EVALUATIONS).is_file():
            frame = read_evaluations(self.dir / EVALUATIONS)
            self.rows = {r["schedule"]: r for r in frame[COLUMNS].to_dict("records")}
        self.generations: list[dict] = []

    def has_run(self) -> bool:
        """Return True if this directory already holds a search run."""
        return (self.dir / RUN).is_file()

    def read_run(self) -> dict:
        """Return run.json."""
        return read_run_json(self.dir / RUN)

    def write_run(self, info: dict) -> None:
        """Write run.json, the description a resumed run must match."""
        write_json_atomic(self.dir / RUN, info)

    def add(self, row: dict) -> None:
        """Record one finished evaluation and rewrite the table."""
        self.rows[row["schedule"]] = row
        _write_csv(self.dir / EVALUATIONS, self.table())

    def table(self) -> pd.DataFrame:
        """Return every evaluation as a DataFrame, in the order they finished."""
        return pd.DataFrame(list(self.rows.values()), columns=COLUMNS)

    def record_generation(self, info: dict, front: pd.DataFrame) -> None:
        """Append one generation's summary and write the current front."""
        self.generations = [g for g in self.generations if g["generation"] != info["generation"]] + [info]
        _write_csv(self.dir / GENERATIONS, pd.DataFrame(self.generations))
        _write_csv(self.dir / FRONT, front)


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


def read_run_json(path: Path) -> dict:
    """Return a run's run.json, or raise DDSMError saying why it cannot be read."""
    try:
        info = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise DDSMError(f"{path} is not a text file") from None
    except json.JSONDecodeError as exc:
        raise DDSMError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(info, dict) or info.get("format") != "ddsm-search/search-run":
        raise DDSMError(f"{path} is not a ddsm-search search run file")
    search = info.get("search")
    if (not isinstance(search, dict) or search.get("metric") not in ("fid", "kid", "drift")
            or not isinstance(search.get("samples"), int) or not isinstance(info.get("supernet"), dict)):
        raise DDSMError(f"{path} lacks its search settings (search.metric, search.samples, supernet)")
    return info
