"""Export the best schedule of a search for a FLOP budget, re-checked on noise the search never saw."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_supernet
from .errors import DDSMError
from .evaluation import evaluate
from .report import load_run, pick, run_info
from .schedule import Schedule, save_schedule


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
    return loaded


def export_schedule(run: str | Path, budget: float | str, out: str | Path | None = None, *,
                    heldout_samples: int | None = None, device: str = "cpu", progress: bool = False,
                    supernet: str | Path | None = None) -> tuple[Path, dict]:
    """Pick the lowest-FID schedule within `budget`, score it and full width on the held-out seeds, write
    the schedule JSON (default RUN/schedule_<budget>.json); return (path, its contents)."""
    info = run_info(run)
    q = info["search"]
    table = load_run(run)
    row = pick(table, budget, q["metric"])  # raises before any work if the budget is too small
    supernet = supernet_of_run(run, device, supernet)
    n = heldout_samples or max(int(q["samples"]), 1000)
    common = dict(n=n, seed_set="heldout", device=device, batch_size=int(q["batch_size"]), sampler=q["sampler"],
                  eta=float(q["eta"]), progress=progress)
    chosen = evaluate(supernet, row["widths"], **common)
    full = evaluate(supernet, [supernet.model.widths[0]] * len(row["widths"]), **common)
    figures = {
        "budget": str(budget),
        "gflops_per_image": float(row["gflops"]),
        "flops_share": float(row["flops_share"]),
        "quality": {
            "metric": q["metric"],
            "search": {"fid": float(row["fid"]), "kid": float(row["kid"]), "samples": int(row["samples"]),
                       "seed_set": row["seed_set"]},
            "heldout": {"fid": chosen["fid"], "kid": chosen["kid"], "samples": n, "seed_set": "heldout"},
            "full_width_heldout": {"fid": full["fid"], "kid": full["kid"], "samples": n,
                                   "gflops_per_image": full["gflops_per_image"]},
        },
        "search_run": str(Path(run)),
    }
    schedule = Schedule(widths=list(row["widths"]), sampler=q["sampler"], eta=float(q["eta"]), extra=figures)
    label = str(budget).replace("%", "pct")
    path = save_schedule(Path(out) if out else Path(run) / f"schedule_{label}.json", schedule, supernet)
    return path, schedule.to_dict(supernet)
