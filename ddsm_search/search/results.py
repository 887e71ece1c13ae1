"""A search run's files: one row per evaluation, the front and its hypervolume per generation.

Every file is rewritten atomically after each change, so a run killed at any moment (kill -9) leaves
whole files, and `--resume` finds every finished evaluation on disk.

run.json's `version` says how the files count generations and write keys: version 2 numbers
generations from 1, as the progress lines do, and a key names its solver and timesteps in a head
(none for DDIM on the uniform grid); version 1 (runs written before) numbered them from 0 in
evaluations.csv, generations.csv and front.csv, and its keys ran the search's sampler on the uniform
grid. Readers add 1 to a version-1 run's numbers (`generation_offset`) and that sampler's head to its
keys (`legacy_head`), and a resumed version-1 run is rewritten as version 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoint import load_supernet
from ..errors import DDSMError
from ..io import read_json, write_atomic, write_json_atomic
from ..solvers.base import Solver, head_of
from ..space.steps import canonical_plan_key

EVALUATIONS, GENERATIONS, FRONT, RUN = "evaluations.csv", "generations.csv", "front.csv", "run.json"
RUN_VERSION = 2  # 2: generations numbered from 1, keys naming their solver and timesteps (version 1: neither)
COLUMNS = ["schedule", "genome", "gflops", "gflops_sd", "flops_share", "fid", "kid", "drift", "samples", "seed_set", "generation",
           "worker", "seconds", "steps_run", "steps_saved", "screen_score"]


# columns read as text: a one-step schedule key ("1.0") or a one-gene genome ("0") must not become a number
TEXT_COLUMNS = {"schedule": str, "genome": str, "seed_set": str}


def legacy_head(info: dict | None) -> str | None:
    """Return the head the keys of a run written before solvers could be chosen (run.json version 1) leave
    out: its search's sampler on the uniform grid, unless that is DDIM (which needs no head)."""
    if not info or info.get("version", 1) >= 2:
        return None
    search = info.get("search", {})
    solver = Solver.of_sampler(search.get("sampler", "ddim"), float(search.get("eta", 0.0)))
    return head_of(solver, (), "uniform")


def read_evaluations(path: Path, head: str | None = None) -> pd.DataFrame:
    """Return evaluations.csv as a DataFrame with text keys in canonical form (a key without a head gets
    `head`: see legacy_head), or raise DDSMError."""
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
    frame["schedule"] = frame["schedule"].map(lambda key: canonical_plan_key(key, head))
    return frame


def generation_offset(info: dict) -> int:
    """Return what to add to the generation numbers in a run's files to number them from 1: 1 for a
    run.json of version 1 (from before generations counted from 1), else 0."""
    return 1 if int(info.get("version", 1)) < 2 else 0


def read_generations(run: Path, info: dict) -> pd.DataFrame:
    """Return a run's generations.csv, generations numbered from 1, or raise DDSMError."""
    path = run / GENERATIONS
    if not path.is_file():
        raise DDSMError(f"{run} has no finished generation yet (no {GENERATIONS}); resume the search with "
                        "'ddsm-search search ... --resume'")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DDSMError(f"{path} is not a readable table: {str(exc).splitlines()[0]}") from None
    if "generation" not in frame.columns:
        raise DDSMError(f"{path} lacks columns ['generation']")
    frame["generation"] += generation_offset(info)
    return frame


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


class RunFiles:
    """The files of one search run directory, and the evaluations already on disk."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.rows: dict[str, dict] = {}
        self.renumbered = False  # rows of a version-1 run, renumbered from 1: written again with run.json
        if (self.dir / EVALUATIONS).is_file():
            info = self.read_run() if self.has_run() else None
            frame = read_evaluations(self.dir / EVALUATIONS, legacy_head(info))
            if info is not None:
                offset = generation_offset(info)
                frame["generation"] += offset
                self.renumbered = offset != 0
            self.rows = {r["schedule"]: r for r in frame[COLUMNS].to_dict("records")}
        self.generations: list[dict] = []

    def has_run(self) -> bool:
        """Return True if this directory already holds a search run."""
        return (self.dir / RUN).is_file()

    def read_run(self) -> dict:
        """Return run.json."""
        return read_run_json(self.dir / RUN)

    def write_run(self, info: dict) -> None:
        """Write run.json, the description a resumed run must match (and the rows of a version-1 run,
        renumbered, first)."""
        if self.renumbered:
            _write_csv(self.dir / EVALUATIONS, self.table())
            self.renumbered = False
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


def read_run_json(path: Path) -> dict:
    """Return a run's run.json, or raise DDSMError saying why it cannot be read."""
    info = read_json(path)
    if info.get("format") != "ddsm-search/search-run":
        raise DDSMError(f"{path} is not a ddsm-search search run file")
    search = info.get("search")
    if (not isinstance(search, dict) or search.get("metric") not in ("fid", "kid", "drift")
            or not isinstance(search.get("samples"), int) or not isinstance(info.get("supernet"), dict)):
        raise DDSMError(f"{path} lacks its search settings (search.metric, search.samples, supernet)")
    return info


def supernet_of_run(run: str | Path, device: str = "cpu", supernet: str | Path | None = None):
    """Return the supernet a search run used, refusing one whose weights changed since the search.

    `supernet` names its directory if it moved since the search: it is accepted when its hash matches.
    """
    info = run_info(run)
    where = supernet if supernet is not None else info["supernet"]["path"]
    if supernet is None and not Path(where).is_dir():
        raise DDSMError(f"the supernet of {run} is no longer at {where}; pass --supernet DIR if it moved")
    loaded = load_supernet(where, device)
    if loaded.sha256 != info["supernet"]["sha256"]:
        raise DDSMError(f"the supernet at {loaded.path} is not the one {run} was searched with (hash differs)")
    return loaded.with_cost(info.get("cost", "dense"))  # FLOPs counted as the search counted them


def run_dir(run: str | Path) -> Path:
    path = Path(run)
    if not (path / RUN).is_file() or not (path / EVALUATIONS).is_file():
        raise DDSMError(f"{path} is not a search run directory (no {RUN} and {EVALUATIONS}; run 'ddsm-search search')")
    return path


def run_info(run: str | Path) -> dict:
    """Return a run's run.json: its supernet, search settings, searched axes and segments."""
    return read_run_json(run_dir(run) / RUN)


def segment_starts(info: dict):
    """Return where a run's prefix caches keep latents, for any number of steps: its segments' starts
    (run.json's `segments` are those of the reference number of steps; their count is the run's)."""
    count = len(info["segments"])
    return lambda n: {int(start) for start in np.linspace(0, n, count + 1).round()[1:-1]}
