"""Confirming schedules on held-out noise: each candidate and full size on the same held-out images,
and the candidate's loss against full size with a confidence interval.

The loss is in the run's metric: for FID, FID(schedule) - FID(full size) on the same held-out noise,
its interval a paired bootstrap over images (image i of both sets comes from the same noise, so both
are resampled together); for drift, the mean drift from full size (full size has none), its interval
a bootstrap of the per-image drifts. Held-out evaluations are kept apart from the search's
(`heldout.csv` in the run directory) and never steer it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..errors import DDSMError
from ..io import write_atomic
from ..sampling import PrefixCache, Runtime
from ..solvers.base import Solver
from .full_samples import full_size_samples
from .quality import evaluate
from .scoring import FullReference, make_scorer

HELDOUT_FILE = "heldout.csv"
HELDOUT_SEEDS = "heldout"
LOSS_METRICS = ("fid", "drift")
BOOTSTRAP_RESAMPLES = 200


class Confirmer:
    """Scores schedules of one search run on held-out noise beside full size, with loss intervals."""

    def __init__(self, supernet, search: dict, *, n: int, confidence: float = 0.95, device: str = "cpu",
                 cache_dir=None, boundaries=(), reference: tuple | None = None, progress: bool = False):
        """`boundaries`: the run's segment starts (or a function of the number of steps), where the latents
        of shared schedule prefixes are kept (a front's schedules share long prefixes: they are sampled
        once). `reference`: (solver, steps) of the full-size run losses are measured against (default:
        the search's sampler and steps). `progress`: a bar while full size's and each schedule's held-out
        images are sampled."""
        if not 0 < confidence < 1:
            raise DDSMError(f"--confidence must be between 0 and 1, got {confidence}")
        if n < 2:
            raise DDSMError(f"held-out images must be at least 2, got {n}")
        self.supernet, self.n, self.confidence = supernet, n, confidence
        self.metric = search["metric"]
        self.default = Solver.of_sampler(search["sampler"], float(search["eta"]))
        solver, steps = reference or (self.default, int(search["steps"]))
        self.batch_size, self.cache_dir, self.progress = int(search["batch_size"]), cache_dir, progress
        self.scorer = make_scorer(supernet, metric=self.metric, drift_space=search.get("drift_space", "auto"),
                                  device=device, cache_dir=cache_dir)
        # the search's backend choice is not part of its settings: "auto" picks the faster here
        self.runtime = Runtime(supernet, device=device, backend=search.get("backend", "auto"),
                               batch_size=min(n, self.batch_size))
        self.cache = PrefixCache(boundaries)
        self.reference = self.runtime.plan([supernet.model.full] * steps, solver=Solver.parse(solver))
        self.full = FullReference(full_size_samples(self.reference, n=n, seed_set=HELDOUT_SEEDS,
                                                    batch_size=self.batch_size, cache=self.cache, cache_dir=cache_dir,
                                                    progress=progress))
        self.full_result = self.result(self.reference)

    def plan(self, what, settings: dict | None = None):
        """Return the plan of `what`: a plan key (its head names the solver and timesteps; a key without one
        runs DDIM on the uniform grid), or Steps or subnets under the search's sampler on the uniform grid."""
        if isinstance(what, str):
            return self.runtime.plan_key(what, settings=settings)
        return self.runtime.plan(what, solver=self.default, settings=settings)

    def result(self, plan) -> dict:
        """Return the full held-out evaluation of a plan (features and executed FLOPs included)."""
        return evaluate(plan, self.scorer, n=self.n, seed_set=HELDOUT_SEEDS, batch_size=self.batch_size,
                        cache=self.cache, full=self.full, keep=True, cache_dir=self.cache_dir, progress=self.progress)

    def loss(self, result: dict) -> dict:
        """Return the loss of an evaluated schedule against full size: value, low, high, method."""
        from ..metrics.stats import bootstrap_interval, fid_gap_interval

        if self.metric == "fid":
            ref = self.scorer.reference
            gap = fid_gap_interval(result["features"], self.full_result["features"], ref.mu, ref.sigma,
                                   confidence=self.confidence, resamples=BOOTSTRAP_RESAMPLES, seed=0)
            value, low, high = gap["estimate"], gap["low"], gap["high"]
            method = (f"paired {gap['method']} bootstrap over images of FID - full-size FID "
                      f"({BOOTSTRAP_RESAMPLES} resamples; bias-corrected estimate {gap['debiased']:.4g})")
        elif self.metric == "drift":
            interval = bootstrap_interval(result["drift_values"], confidence=self.confidence, resamples=1000, seed=0)
            value, low, high = interval["estimate"], interval["low"], interval["high"]
            method = "bootstrap over images of the mean drift from full size (1000 resamples)"
        else:
            raise DDSMError(f"a loss interval needs a run whose metric is {' or '.join(LOSS_METRICS)}, "
                            f"not {self.metric}")
        return {"metric": self.metric, "value": float(value), "low": float(low), "high": float(high),
                "confidence": self.confidence, "method": method, "samples": self.n, "seed_set": HELDOUT_SEEDS}

    def score(self, what, *, with_loss: bool = False) -> dict:
        """Return a held-out record of a schedule (a plan key, or steps: see `plan`): fid, kid, drift,
        GFLOPs (executed, for a dynamic one, with `executed`: their spread and each recorded figure per
        step), and its loss against the reference."""
        plan = self.plan(what)
        result = self.result(plan)
        return {"schedule": plan.key, "samples": self.n, "seed_set": HELDOUT_SEEDS,
                "fid": result["fid"], "kid": result["kid"], "drift": result["drift"],
                "gflops": result["gflops_per_image"], "executed": result["executed"],
                "loss": self.loss(result) if with_loss else None}

    def confirm(self, what) -> dict:
        """Return a held-out record of a schedule with its loss against the reference."""
        return self.score(what, with_loss=True)

    def full_record(self) -> dict:
        """Return the held-out scores of full size itself."""
        r = self.full_result
        return {"fid": r["fid"], "kid": r["kid"], "drift": r["drift"], "samples": self.n, "seed_set": HELDOUT_SEEDS,
                "gflops_per_image": r["gflops_per_image"]}


def confirm_many(confirmer: Confirmer, rows: list, *, progress: bool = False, stop=None) -> list[dict]:
    """Confirm schedules (rows of a run table: their `schedule` keys) in order; stop after the first for
    which `stop(record)` holds."""
    records = []
    for row in tqdm(rows, desc="held-out check", unit="schedule", disable=not progress, leave=False):
        records.append(confirmer.confirm(row["schedule"]))
        if stop is not None and stop(records[-1]):
            break
    return records


def record_heldout(run: str | Path, records: list[dict], purpose: str) -> Path:
    """Add held-out records to the run's heldout.csv (apart from the search's table); return its path."""
    path = Path(run) / HELDOUT_FILE
    none = {"metric": "", "value": math.nan, "low": math.nan, "high": math.nan, "confidence": math.nan}
    rows = []
    for r in records:
        loss = r["loss"] or none
        rows.append({"schedule": r["schedule"], "samples": r["samples"], "seed_set": r["seed_set"], "fid": r["fid"],
                     "kid": r["kid"], "drift": r["drift"], "gflops": r["gflops"], "loss_metric": loss["metric"],
                     "loss": loss["value"], "loss_low": loss["low"], "loss_high": loss["high"],
                     "confidence": loss["confidence"], "purpose": purpose})
    table = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path, dtype={"schedule": str, "seed_set": str})
        table = pd.concat([old, table], ignore_index=True)
    table = table.drop_duplicates(["schedule", "samples", "seed_set", "loss_metric", "confidence"], keep="last")
    write_atomic(path, lambda tmp: table.to_csv(tmp, index=False))
    return path


def read_heldout(run: str | Path) -> pd.DataFrame:
    """Return the run's held-out records (an empty table if there are none yet)."""
    path = Path(run) / HELDOUT_FILE
    if not path.is_file():
        return pd.DataFrame(columns=["schedule", "samples", "seed_set", "fid", "kid", "drift", "gflops"])
    try:
        return pd.read_csv(path, dtype={"schedule": str, "seed_set": str, "loss_metric": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DDSMError(f"{path} is not a readable table: {str(exc).splitlines()[0]}") from None
