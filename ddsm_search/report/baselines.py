"""A search's front against its baselines (search.baselines): for each front point, the best baseline
that costs no more, and the cheapest baseline that is as good, with the ratios of their costs."""

from __future__ import annotations

import numpy as np
import pandas as pd


def compare(front: pd.DataFrame, baselines: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Return one row per front point (`schedule`, `gflops`, the metric, `seconds_per_image` where
    timed) with `best_baseline` (the baseline of the lowest metric at no more GFLOPs; empty if none
    costs so little) and its metric, and `as_good` (the cheapest baseline whose metric is no worse) with
    `flops_ratio` and `seconds_ratio`: its cost over the point's (above 1: the point is cheaper at the
    same quality)."""
    rows = []
    for _, point in front.sort_values("gflops").iterrows():
        row = {"schedule": point["schedule"], "gflops": float(point["gflops"]), metric: float(point[metric]),
               "seconds_per_image": float(point.get("seconds_per_image", np.nan))}
        cheaper = baselines[baselines["gflops"] <= point["gflops"] * (1 + 1e-9)]
        best = cheaper.sort_values([metric, "gflops"]).iloc[0] if len(cheaper) else None
        row["best_baseline"] = best["baseline"] if best is not None else ""
        row[f"best_baseline_{metric}"] = float(best[metric]) if best is not None else np.nan
        good = baselines[baselines[metric] <= point[metric]]
        same = good.sort_values(["gflops", metric]).iloc[0] if len(good) else None
        row["as_good"] = same["baseline"] if same is not None else ""
        row["flops_ratio"] = float(same["gflops"]) / row["gflops"] if same is not None else np.nan
        row["seconds_ratio"] = (float(same["seconds_per_image"]) / row["seconds_per_image"]
                                if same is not None else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame, metric: str) -> str:
    """Return the comparison as text: one line per front point."""
    lines = []
    for _, r in table.iterrows():
        best = (f"best baseline at no more FLOPs: {r['best_baseline']} ({metric.upper()} "
                f"{r[f'best_baseline_{metric}']:.4g})" if r["best_baseline"] else "no baseline costs so little")
        same = (f"cheapest as good: {r['as_good']} ({r['flops_ratio']:.2f}x the FLOPs"
                + ("" if np.isnan(r["seconds_ratio"]) else f", {r['seconds_ratio']:.2f}x the seconds") + ")"
                if r["as_good"] else "no baseline is as good")
        lines.append(f"{r['gflops']:.4g} GFLOPs, {metric.upper()} {r[metric]:.4g}: {best}; {same}")
    return "\n".join(lines)
