"""Export a search's schedule for a FLOP budget or a quality bar, confirmed on noise the search never saw."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import budget_gflops
from ..errors import DDSMError
from ..report.tables import load_run, pick
from ..schedule import Schedule, save_schedule
from ..search.baselines import parse_reference
from ..search.results import run_info, segment_starts, supernet_of_run
from .speed import speed_figures


def _number(value) -> float | None:
    """Return a float for JSON, None for NaN (a metric this run could not measure)."""
    value = float(value)
    return None if math.isnan(value) else value


def _scores(record: dict) -> dict:
    return {k: _number(record[k]) for k in ("fid", "kid", "drift")}


def _candidates(table, metric: str, budget, max_loss, count: int | None):
    """Return the schedules to confirm, in order: for --max-loss the front, cheapest first; for a budget
    alone its `count` best by the search's score (within the budget either way)."""
    fits = table[table["fully_evaluated"]]
    if budget is not None:
        pick(table, budget, metric)  # a budget below the cheapest schedule fails here, before any work
        full = float((table["gflops"] / table["flops_share"]).iloc[0])
        fits = fits[fits["gflops"] <= budget_gflops(budget, full) * (1 + 1e-9)]
    if max_loss is not None:
        rows = fits[fits["on_front"]].sort_values(["gflops", metric])
    else:
        rows = fits.sort_values([metric, "gflops"]).iloc[:count or 3]
    return [row for _, row in (rows.iloc[:count] if count and max_loss is not None else rows).iterrows()]


def export_schedule(run: str | Path, budget: float | str | None = None, out: str | Path | None = None, *,
                    max_loss: float | None = None, confidence: float = 0.95, heldout_samples: int | None = None,
                    candidates: int | None = None, device: str = "cpu", progress: bool = False,
                    supernet: str | Path | None = None, cache_dir=None, reference: str | None = None) -> tuple[Path, dict]:
    """Confirm candidates on held-out noise beside full size and write the chosen schedule's JSON
    (default RUN/schedule_<budget or maxloss>.json); return (path, its contents).

    With `max_loss`: the cheapest schedule of the front whose loss against full size (in the run's
    metric) is within `max_loss` at `confidence`, the front tried cheapest first. With a `budget` alone:
    of its `candidates` (default 3) best schedules within the budget by the search's score, the best on
    held-out noise, so that the winner of a few noisy images is not exported blindly. Both together:
    the cheapest within the budget that meets the loss. `reference`: 'SOLVER:STEPS', the full-size run
    the loss is measured against (default: the search's sampler over its steps).

    The file also records the export's measured speed (deploy.speed): against the default full size
    and against the cheapest baseline (search.baselines) that is as good on the same held-out noise.
    """
    from ..evaluation.heldout import LOSS_METRICS, Confirmer, confirm_many, record_heldout

    if budget is None and max_loss is None:
        raise DDSMError("export needs --budget, --max-loss or both")
    if max_loss is not None and (not math.isfinite(max_loss) or max_loss < 0):
        raise DDSMError(f"--max-loss must be a finite number >= 0, got {max_loss}")
    if candidates is not None and candidates < 1:
        raise DDSMError(f"--candidates must be at least 1, got {candidates}")
    info = run_info(run)
    q = info["search"]
    metric = q["metric"]
    if max_loss is not None and metric not in LOSS_METRICS:
        raise DDSMError(f"--max-loss needs a run whose metric is {' or '.join(LOSS_METRICS)}; this run's is {metric}")
    table = load_run(run)
    rows = _candidates(table, metric, budget, max_loss, candidates)  # raises before any work if nothing fits
    net = supernet_of_run(run, device, supernet)
    n = heldout_samples or max(4 * int(q["samples"]), 1000)
    ref = parse_reference(reference, int(q["steps"])) if reference is not None else None
    confirmer = Confirmer(net, q, n=n, confidence=confidence, device=device, cache_dir=cache_dir,
                          boundaries=segment_starts(info), progress=progress, reference=ref)
    full_gflops = float((table["gflops"] / table["flops_share"]).iloc[0])
    limit = None if budget is None else budget_gflops(budget, full_gflops) * (1 + 1e-9)

    def fits(record: dict) -> bool:  # a dynamic schedule's FLOPs on held-out noise are measured anew
        return limit is None or record["gflops"] <= limit

    if max_loss is not None:
        records = confirm_many(confirmer, rows, progress=progress,
                               stop=lambda r: r["loss"]["high"] <= max_loss and fits(r))
        passed = [r for r in records if r["loss"]["high"] <= max_loss and fits(r)]
        if not passed:
            closest = min(records, key=lambda r: r["loss"]["high"])
            raise DDSMError(f"no schedule of the front is within {metric.upper()} {max_loss:g} of full size at "
                            f"{confidence:.0%} confidence on {n} held-out images (the closest, at "
                            f"{closest['gflops']:.4f} GFLOPs, has a loss of at most {closest['loss']['high']:.4g})")
        chosen = passed[0]
    else:
        records = confirm_many(confirmer, rows, progress=progress)
        within = [r for r in records if fits(r)]
        if not within:
            raise DDSMError(f"every candidate within budget {budget} executed more FLOPs on {n} held-out images "
                            f"than the budget allows (dynamic exit); try a larger budget")
        chosen = min(within, key=lambda r: (r[metric], r["gflops"]))
    record_heldout(run, records, "export")
    row = next(r for r in rows if r["schedule"] == chosen["schedule"])
    figures = {
        "budget": None if budget is None else str(budget),
        "max_loss": max_loss,
        # held out: for a static schedule the FLOPs table's; for a dynamic one those executed there
        "gflops_per_image": float(chosen["gflops"]),
        "flops_share": float(chosen["gflops"]) / full_gflops,
        "cost": net.cost,  # dense FLOPs, or sparse: only the nonzero weights under the masks (search.cost)
        "quality": {
            "metric": metric,
            "search": {**_scores(row), "samples": int(row["samples"]), "seed_set": row["seed_set"]},
            "heldout": {**_scores(chosen), "samples": n, "seed_set": chosen["seed_set"]},
            "full_size_heldout": {**_scores(confirmer.full_record()), "samples": n,
                                   "gflops_per_image": confirmer.full_record()["gflops_per_image"]},
            "loss": chosen["loss"],
            "confirmed": [{"schedule": r["schedule"], "gflops_per_image": r["gflops"], metric: _number(r[metric]),
                           "loss": r["loss"]["value"], "loss_low": r["loss"]["low"], "loss_high": r["loss"]["high"]}
                          for r in records],
        },
        "reference": {"solver": confirmer.reference.solver.key, "steps": len(confirmer.reference),
                      "timesteps": list(confirmer.reference.timesteps)},
        "search_run": str(Path(run)),
    }
    if chosen["executed"] is not None:
        figures["executed"] = {**chosen["executed"], "samples": n, "seed_set": chosen["seed_set"]}
    figures["speed"] = speed_figures(confirmer, chosen, q, max_loss, device=device, progress=progress)
    plan = confirmer.plan(row["schedule"])
    if net.sparse:  # both figures of a sparse supernet's schedule, side by side
        figures["sparse_flops_per_image"] = net.with_cost("sparse").steps_flops(list(plan.steps), plan.timesteps)
    schedule = Schedule.from_steps(list(plan.steps), solver=plan.solver, timesteps=list(plan.timesteps), extra=figures)
    label = (str(budget).replace("%", "pct") if budget is not None else "") + \
        ("" if max_loss is None else f"{'_' if budget is not None else ''}maxloss{max_loss:g}")
    # the file's own flops_per_image stays dense, as every loader of a schedule recomputes it; gflops_per_image
    # and flops_share above are in the run's cost
    dense = net.with_cost("dense")
    path = save_schedule(Path(out) if out else Path(run) / f"schedule_{label}.json", schedule, dense)
    return path, schedule.to_dict(dense)
