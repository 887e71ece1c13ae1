"""Is the search's front real? Its schedules re-scored on held-out noise, and how well the two rankings agree."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..evaluation.heldout import Confirmer, read_heldout, record_heldout
from .tables import front, load_run, run_info


def heldout_front(run: str | Path, n: int, *, device: str = "cpu", supernet: str | Path | None = None,
                  progress: bool = False, cache_dir=None) -> tuple[pd.DataFrame, float]:
    """Return (the front with its search and held-out scores, the Spearman rank correlation of the two).

    Held-out scores already in the run's heldout.csv at this image count are reused; new ones are
    added there, apart from the search's table (the search never reads them).
    """
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    from ..search.results import segment_starts, supernet_of_run

    info = run_info(run)
    metric = info["search"]["metric"]
    rows = front(load_run(run))
    known = read_heldout(run)
    known = known[known["samples"] == n].drop_duplicates("schedule", keep="last").set_index("schedule")
    todo = [row for _, row in rows.iterrows() if row["schedule"] not in known.index]
    if todo:
        confirmer = Confirmer(supernet_of_run(run, device, supernet), info["search"], n=n, device=device,
                              cache_dir=cache_dir, boundaries=segment_starts(info), progress=progress)
        records = [confirmer.score(row["schedule"])
                   for row in tqdm(todo, desc="held-out front", unit="schedule", disable=not progress, leave=False)]
        record_heldout(run, records, "report")
        known = pd.concat([known, pd.DataFrame(records).set_index("schedule")[["fid", "kid", "drift"]]])
    table = rows[["schedule", "gflops", "flops_share", metric]].rename(columns={metric: f"search_{metric}"})
    table[f"heldout_{metric}"] = table["schedule"].map(known[metric]).astype(float)
    table.attrs.update(metric=metric, samples=n)
    rho = math.nan
    if len(table) >= 3:
        rho = float(spearmanr(table[f"search_{metric}"], table[f"heldout_{metric}"]).statistic)
    return table, rho
