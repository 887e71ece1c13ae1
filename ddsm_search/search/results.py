"""A search run's files: one row per evaluation, the front and its hypervolume per generation.

Every file is rewritten atomically after each change, so a run killed at any moment (kill -9) leaves
whole files, and `--resume` finds every finished evaluation on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import DDSMError
from ..io import write_atomic, write_json_atomic

EVALUATIONS, GENERATIONS, FRONT, RUN = "evaluations.csv", "generations.csv", "front.csv", "run.json"
COLUMNS = ["schedule", "genome", "gflops", "flops_share", "fid", "kid", "samples", "seed_set", "generation",
           "worker", "seconds", "steps_run", "steps_saved", "screen_score"]


def schedule_key(widths: Sequence[float]) -> str:
    """Return the text form of a schedule used as its key: widths separated by spaces."""
    return " ".join(f"{w:g}" for w in widths)


def parse_schedule(key: str) -> list[float]:
    """Return the widths of a schedule key."""
    return [float(w) for w in key.split()]


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


class RunFiles:
    """The files of one search run directory, and the evaluations already on disk."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.rows: dict[str, dict] = {}
        if (self.dir / EVALUATIONS).is_file():
            try:
                frame = pd.read_csv(self.dir / EVALUATIONS)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
                raise DDSMError(f"{self.dir / EVALUATIONS} is not a readable table: {exc}") from None
            missing = set(COLUMNS) - set(frame.columns)
            if missing:
                raise DDSMError(f"{self.dir / EVALUATIONS} lacks columns {sorted(missing)}")
            self.rows = {r["schedule"]: r for r in frame[COLUMNS].to_dict("records")}
        self.generations: list[dict] = []

    def has_run(self) -> bool:
        """Return True if this directory already holds a search run."""
        return (self.dir / RUN).is_file()

    def read_run(self) -> dict:
        """Return run.json."""
        try:
            return json.loads((self.dir / RUN).read_text())
        except json.JSONDecodeError as exc:
            raise DDSMError(f"{self.dir / RUN} is not valid JSON: {exc.msg}") from None

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


def front_of(table: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
    """Return the non-dominated evaluations (GFLOPs, metric) sorted by GFLOPs."""
    ok = table[np.isfinite(table[metric].astype(float))]
    front = ok[pareto_mask(ok[["gflops", metric]].to_numpy(dtype=float))]
    return front.sort_values(["gflops", metric]).reset_index(drop=True)


def hypervolume(front: pd.DataFrame, reference: tuple[float, float], metric: str = "fid") -> float:
    """Return the hypervolume of the front in (share of full-width FLOPs, metric) below `reference`."""
    from pymoo.indicators.hv import HV

    pts = front[["flops_share", metric]].to_numpy(dtype=float)
    pts = pts[(pts < np.asarray(reference)).all(axis=1)]
    return float(HV(ref_point=np.asarray(reference, dtype=float))(pts)) if len(pts) else 0.0
