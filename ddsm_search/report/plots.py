"""Report plots: the front (and beside its baselines), a schedule's subnet per step (every axis),
hypervolume per generation, and a schedule's samples beside full size's from the same noise.

Each function draws on a new `matplotlib.figure.Figure` (no pyplot: the user's backend and pyplot's
figures are left alone) and returns it; given a path, it also writes the figure there as a PNG,
atomically. Show one in a notebook by leaving it as a cell's value, or with `fig.savefig`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..images import make_grid, new_figure, save_figure

PathLike = str | Path | None


def _done(fig, path: PathLike):
    """Write the figure to `path` if one is given; return the figure."""
    if path is not None:
        save_figure(fig, path)
    return fig


def _staircase(ax, x, y, **style) -> None:
    """Draw a front (x ascending, y descending) as the staircase it is: from each point the same
    quality holds until the next, costlier point improves on it."""
    ax.step(x, y, where="post", **style)


def plot_front(table: pd.DataFrame, path: PathLike = None, metric: str = "fid", chosen: pd.Series | None = None):
    """Draw GFLOPs against the metric: all evaluations faint, the front bold as a staircase, the uniform
    schedules of each axis marked (one marker per axis, labelled with the value); return the Figure."""
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    ax.scatter(table["gflops"], table[metric], s=12, color="0.7", label="evaluated schedules")
    front = table[table["on_front"]].sort_values("gflops")
    _staircase(ax, front["gflops"], front[metric], color="C0", lw=2, marker="o", ms=5, label="Pareto front")
    uniform = table[table["uniform"].notna()].sort_values("gflops")
    markers = {"full": ("o", "k"), "width": ("s", "C3"), "depth": ("^", "C4")}
    for kind, group in uniform.groupby(uniform["uniform"].map(_uniform_kind), sort=False):
        marker, color = markers.get(kind, ("D", "C5"))
        ax.scatter(group["gflops"], group[metric], marker=marker, s=50, facecolors="none", edgecolors=color, lw=1.5,
                   label="full size" if kind == "full" else f"uniform {kind}", zorder=3)
        for _, row in group.iterrows():
            if kind != "full":
                ax.annotate(row["uniform"].split("=", 1)[-1] if kind != "mixed" else row["uniform"],
                            (row["gflops"], row[metric]), textcoords="offset points", xytext=(5, 4), color=color,
                            fontsize=8)
    if chosen is not None:
        ax.scatter([chosen["gflops"]], [chosen[metric]], marker="*", s=180, color="C2", zorder=4, label="best within the budget")
    ax.set_xlabel("GFLOPs per image (whole sampling run)")
    ax.set_ylabel(metric.upper())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _done(fig, path)


def plot_baselines(front: pd.DataFrame, baselines: pd.DataFrame, path: PathLike = None, metric: str = "fid",
                   x: str = "gflops"):
    """Draw the searched front beside the baselines on `x` (gflops, or seconds_per_image): each solver's
    full size over its numbers of steps as a staircase, the other baselines (uniform feature caching)
    as markers; return the Figure."""
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    front = front.sort_values(x)
    _staircase(ax, front[x], front[metric], color="C0", lw=2.5, marker="o", ms=5, label="searched front")
    plain = baselines[baselines["kind"] == "full size"]
    for k, (solver, group) in enumerate(plain.groupby("solver", sort=False)):
        group = group.sort_values(x)
        ax.plot(group[x], group[metric], "--", marker="s", ms=4, color=f"C{k + 1}", lw=1,
                label=f"full size, {solver}, {int(group['sampling_steps'].min())}-{int(group['sampling_steps'].max())} steps")
    other = baselines[~baselines.index.isin(plain.index)]
    if len(other):
        ax.scatter(other[x], other[metric], marker="x", color="0.3", s=30,
                   label="full size, " + ", ".join(sorted(set(other["kind"]))))
    ax.set_xlabel("GFLOPs per image (whole sampling run)" if x == "gflops" else "seconds per image (this machine)")
    ax.set_ylabel(metric.upper())
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _done(fig, path)


def plot_heldout_front(table: pd.DataFrame, path: PathLike = None, rho: float = float("nan")):
    """Draw the search's front beside the same schedules re-scored on held-out noise (and the front of
    those held-out scores, both as staircases): where they part, the search was fooled by its noise;
    return the Figure."""
    from ..search.pareto import pareto_mask

    metric = table.attrs["metric"]
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    table = table.sort_values("gflops")
    _staircase(ax, table["gflops"], table[f"search_{metric}"], color="C0", lw=2, marker="o", ms=5,
               label="front, search noise")
    ax.plot(table["gflops"], table[f"heldout_{metric}"], "o", color="C1", ms=5,
            label=f"the same schedules, held-out noise (n={table.attrs['samples']})")
    points = table[["gflops", f"heldout_{metric}"]].to_numpy(dtype=float)
    held = table[pareto_mask(points)].sort_values("gflops")
    _staircase(ax, held["gflops"], held[f"heldout_{metric}"], color="C1", lw=1.5, label="held-out front")
    ax.set_xlabel("GFLOPs per image (whole sampling run)")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"Spearman rank correlation, search vs held-out: {rho:.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _done(fig, path)


def _uniform_kind(label: str) -> str:
    """Return which axis a uniform schedule's label varies: 'full', an axis name, or 'mixed'."""
    if label == "full":
        return "full"
    axes = [part.split("=")[0] for part in label.split(",")]
    return axes[0] if len(axes) == 1 else "mixed"


def plot_schedule(steps: Sequence, path: PathLike = None, title: str = "", space=None, executed: dict | None = None):
    """Draw a schedule's value of every axis at each sampling step (noisiest step on the left), one
    panel per axis, each panel's range that axis's choices (from `space`, a SubnetSpace, if given), then
    one panel per field of its steps' extras (space.steps.Step; an early exit's threshold, say).

    `steps` may be Steps or Subnets. With `executed` (sampling.executed_summary of a dynamic plan), each
    figure it recorded per step is drawn in the panel of the axis of that name (`depth_per_step` in the
    depth panel): its mean over images and a band of one standard deviation, under the subnet's cap.
    """
    from ..space.steps import Step

    steps = [s if isinstance(s, Step) else Step(s) for s in steps]
    fields = sorted({f for s in steps for f in s.fields})
    axes = [a for a, _ in steps[0].subnet.items] + fields
    fig = new_figure(6.4, 1.2 + 1.5 * len(axes))
    panels = fig.subplots(len(axes), 1, sharex=True, squeeze=False)
    x = np.arange(len(steps))
    for ax, axis in zip(panels[:, 0], axes):
        if axis in fields:
            values = [np.nan if s.get(axis) is None else float(s.get(axis)) for s in steps]
            ax.step(x, values, where="mid", color="C1", lw=2)
            ax.set_ylim(0, max(1.05, np.nanmax(values) * 1.08) if not np.all(np.isnan(values)) else 1.05)
            ax.set_ylabel(axis)
            ax.grid(alpha=0.3)
            continue
        values = [s.subnet[axis] for s in steps]
        measured = (executed or {}).get(f"{axis}_per_step")
        label = f"{axis} cap" if measured is not None else None
        ax.step(x, values, where="mid", color="C0" if axis == "width" else "C4", lw=2, label=label)
        if measured is not None:
            mean, sd = np.asarray(measured["mean"], dtype=float), np.asarray(measured["sd"], dtype=float)
            ax.plot(x, mean, "-", color="C1", lw=1.5, label=f"executed {axis} (mean over images)")
            ax.fill_between(x, mean - sd, mean + sd, color="C1", alpha=0.25, lw=0, label="+/- 1 sd")
            ax.legend(fontsize=7, loc="lower right")
        top = max(space.choices(axis)) if space is not None else max(values)
        ax.set_ylim(0, top * 1.08)
        ax.set_ylabel(axis)
        ax.grid(alpha=0.3)
    panels[-1, 0].set_xlabel("sampling step (noisiest first)")
    panels[0, 0].set_title(title, fontsize=9)
    return _done(fig, path)


def plot_hypervolume(generations: pd.DataFrame, path: PathLike = None):
    """Draw the front's hypervolume against generation; return the Figure."""
    fig = new_figure(5.2, 3.2)
    ax = fig.subplots()
    ax.plot(generations["generation"], generations["hypervolume"], "-o", color="C0")  # numbered from 1
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    return _done(fig, path)


def plot_grids(images: torch.Tensor, full: torch.Tensor, path: PathLike = None, titles=("schedule", "full size")):
    """Draw a schedule's sample grid beside full size's grid from the same noise; return the Figure."""
    fig = new_figure(8, 4.2)
    axes = fig.subplots(1, 2)
    for ax, imgs, title in zip(axes, (images, full), titles):
        grid = make_grid(imgs)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _done(fig, path)
