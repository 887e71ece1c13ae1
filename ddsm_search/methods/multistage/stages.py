"""Timestep stages for a multi-stage (multi-decoder) U-Net: contiguous timestep intervals found by
dynamic programming over a per-timestep dissimilarity matrix (after arXiv 2312.09181, Multi-stage).

Three dissimilarities between grid timesteps t_i, t_j (symmetric, zero diagonal, ascending t):
- "denoiser": how much the optimal denoiser E[x0 | x_t] under the empirical training distribution
  changes between t_i and t_j, on one shared set of (x0, noise) pairs: x0 drawn from the training
  images, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with the same noise at every t. Metric
  "mse" (default): the mean over pairs and pixels of (D(x_ti, t_i) - D(x_tj, t_j))^2, in [-1, 1]
  pixel units. Metric "pixels" (the paper's): 1 - the share of pixels whose two outputs differ by
  less than 2/256 of the [0, 1] range (1/64 in [-1, 1] units).
- "logsnr": |log SNR(t_i) - log SNR(t_j)|, log SNR = log(abar / (1 - abar)).
- "gradient": 1 - cosine similarity of the gradients (flattened over all parameters) of an
  eps-predictor's MSE loss at fixed timestep t_i and t_j, on one fixed batch of x0 and noise.

`interval_cluster` splits the grid into k contiguous segments minimising the sum of segment costs.
The segment cost is, as in the paper's code, "center": the summed dissimilarity of every member to
the segment's middle element (index start + length // 2), or "pairwise": the sum over its pairs.
Balance, as in the paper's code: every segment holds between floor((1 - b) n / k) (at least 1) and
ceil((1 + b) n / k) grid points, b = 0.5 by default (their floor(n / 2k) .. ceil(3n / 2k)); None
lifts the bound.

This module is a building block: it imports no stage (the CLI command loads a supernet lazily).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ExperimentConfig, load_config
from ...data import ImageData, data_key, load_data
from ...diffusion import NoiseSchedule, log_snr
from ...errors import DDSMError
from ...images import new_figure, save_figure
from ...io import write_json_atomic

COSTS = ("denoiser", "logsnr", "gradient")
SEGMENT_COSTS = ("center", "pairwise")
DENOISER_METRICS = ("mse", "pixels")
DEFAULT_GRID = {"denoiser": 100, "logsnr": 100, "gradient": 50}  # gradient: grid x parameters floats held
DEFAULT_SAMPLES = {"denoiser": 256, "logsnr": 0, "gradient": 64}
PIXEL_TOLERANCE = 2 * 2 / 256  # the paper's 2/256 on [0, 1] images, in [-1, 1] units
FORMAT, VERSION = "ddsm-search/stages", 1
STAGES_JSON, SIMILARITY_PNG = "stages.json", "similarity.png"


def _images(data: ImageData | torch.Tensor) -> torch.Tensor:
    """Return training images as a float N x ... tensor in [-1, 1]."""
    return data.to_float() if isinstance(data, ImageData) else data


@torch.no_grad()
def optimal_denoiser(x_t: torch.Tensor, t, data: ImageData | torch.Tensor, alphas_cumprod,
                     chunk: int = 1 << 22) -> torch.Tensor:
    """Return E[x0 | x_t] under the empirical distribution of `data` (one timestep or one per query).

    The posterior over training image y_i has log-weight -||x_t - sqrt(abar) y_i||^2 / (2 (1 - abar));
    ||x_t||^2 is the same for every i and drops out of the softmax, which keeps the logits small. The
    softmax runs as a streaming logsumexp over chunks of training images (at most `chunk` logits at a
    time), in float64: at t = 0 the logits are ~1e5 apart and float32 would round them.
    """
    y = _images(data).to(x_t.device, torch.float64).flatten(1)
    x = x_t.to(torch.float64).flatten(1)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=x.device)
    t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(len(x))
    a = abar[t][:, None]
    s, v = a.sqrt(), 1 - a
    y_sq = (y * y).sum(1)
    out = torch.empty_like(x)
    rows = max(1, min(len(x), chunk // max(1, min(len(y), chunk))))
    cols = max(1, chunk // rows)
    for q in range(0, len(x), rows):
        xq, sq, vq = x[q:q + rows], s[q:q + rows], v[q:q + rows]
        m = torch.full((len(xq), 1), -math.inf, dtype=torch.float64, device=x.device)
        total = torch.zeros_like(m)
        acc = torch.zeros_like(xq)
        for c in range(0, len(y), cols):
            yc = y[c:c + cols]
            logits = (sq * (xq @ yc.T) - sq * sq * y_sq[c:c + cols] / 2) / vq
            m_new = torch.maximum(m, logits.max(1, keepdim=True).values)
            scale, w = torch.exp(m - m_new), torch.exp(logits - m_new)
            total = total * scale + w.sum(1, keepdim=True)
            acc = acc * scale + w @ yc
            m = m_new
        out[q:q + rows] = acc / total
    return out.reshape(x_t.shape).to(x_t.dtype)


def grid_timesteps(num_timesteps: int, grid: int) -> list[int]:
    """Return `grid` evenly spaced timesteps from 0 to T-1 (ascending: least noise first)."""
    if not 2 <= grid <= num_timesteps:
        raise DDSMError(f"the grid must hold between 2 and {num_timesteps} timesteps, got {grid}")
    return [int(v) for v in np.round(np.linspace(0, num_timesteps - 1, grid))]


def logsnr_cost(timesteps: Sequence[int], alphas_cumprod) -> np.ndarray:
    """Return |log SNR(t_i) - log SNR(t_j)| over the grid."""
    lam = log_snr(alphas_cumprod)[np.asarray(timesteps)]
    return np.abs(lam[:, None] - lam[None, :])


def _pick(data: ImageData | torch.Tensor, samples: int, g: torch.Generator) -> torch.Tensor:
    """Return `samples` training images (without replacement while there are enough)."""
    images = _images(data)
    n = len(images)
    idx = torch.randperm(n, generator=g)[:samples] if samples <= n else torch.randint(n, (samples,), generator=g)
    return images[idx]


def _bar(timesteps: Sequence[int], what: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(timesteps, desc=what, unit="timestep", disable=not progress, leave=False)


def denoiser_cost(data: ImageData | torch.Tensor, timesteps: Sequence[int], alphas_cumprod, *, samples: int = 256,
                  seed: int = 0, metric: str = "mse", progress: bool = False) -> np.ndarray:
    """Return the optimal denoiser's dissimilarity between grid timesteps on shared (x0, noise) pairs."""
    if metric not in DENOISER_METRICS:
        raise DDSMError(f"unknown denoiser metric {metric!r} (choose from {', '.join(DENOISER_METRICS)})")
    g = torch.Generator().manual_seed(seed)
    x0 = _pick(data, samples, g).to(torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    outs = []
    for t in _bar(timesteps, "optimal denoiser", progress):
        a = abar[t]
        outs.append(optimal_denoiser(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, data, abar).float().flatten())
    n = len(outs)
    cost = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            diff = outs[i].double() - outs[j].double()
            d = (diff * diff).mean() if metric == "mse" else 1 - (diff.abs() < PIXEL_TOLERANCE).double().mean()
            cost[i, j] = cost[j, i] = float(d)
    return cost


def gradient_cost(model: torch.nn.Module, data: ImageData | torch.Tensor, timesteps: Sequence[int], alphas_cumprod,
                  *, samples: int = 64, seed: int = 0, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Return 1 - cosine similarity of the eps-MSE loss gradients at each pair of grid timesteps."""
    params = list(model.parameters())
    if not params:
        raise DDSMError("the gradient cost needs a model with parameters")
    device = params[0].device
    g = torch.Generator().manual_seed(seed)
    x0 = _pick(data, samples, g).float()
    noise = torch.randn(x0.shape, generator=g)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    was_training, wanted = model.training, [p.requires_grad for p in params]
    model.eval()  # no dropout: the same batch must give the same loss at the same t
    G = torch.empty(len(timesteps), sum(p.numel() for p in params))  # float32, filled row by row
    try:
        for p in params:
            p.requires_grad_(True)
        for row, t in enumerate(_bar(timesteps, "loss gradients", progress)):
            a = float(abar[t])
            total = [torch.zeros_like(p) for p in params]
            for c in range(0, len(x0), batch_size):  # the mean loss over the batch, in chunks
                xc, nc = x0[c:c + batch_size].to(device), noise[c:c + batch_size].to(device)
                try:
                    pred = model(math.sqrt(a) * xc + math.sqrt(1 - a) * nc, torch.full((len(xc),), t, device=device))
                except RuntimeError as exc:  # e.g. a supernet trained on other images
                    raise DDSMError(f"the model cannot run on images of {tuple(xc.shape[1:])}: "
                                    f"{str(exc).splitlines()[0]}") from None
                if pred.shape != nc.shape:
                    raise DDSMError(f"the model predicts shape {tuple(pred.shape)} for images of {tuple(nc.shape)}")
                loss = F.mse_loss(pred, nc) * (len(xc) / len(x0))
                parts = torch.autograd.grad(loss, params, allow_unused=True)
                total = [s if d is None else s + d for s, d in zip(total, parts)]
            G[row] = torch.cat([s.detach().flatten().float().cpu() for s in total])
    finally:
        for p, w in zip(params, wanted):
            p.requires_grad_(w)
        model.train(was_training)
    gram = torch.zeros(len(G), len(G), dtype=torch.float64)
    for c in range(0, G.shape[1], 1 << 16):  # float64 Gram without a float64 copy of every gradient
        block = G[:, c:c + (1 << 16)].double()
        gram += block @ block.T
    norm = gram.diagonal().sqrt()
    cos = torch.where(norm[:, None] * norm[None, :] > 0, gram / (norm[:, None] * norm[None, :]).clamp_min(1e-300),
                      torch.zeros_like(gram))
    cost = (1 - cos).clamp_min(0).numpy()
    cost = (cost + cost.T) / 2
    np.fill_diagonal(cost, 0.0)
    return cost


def segment_costs(cost: np.ndarray, segment_cost: str = "center") -> np.ndarray:
    """Return seg[a, b], the cost of the segment of grid points a..b inclusive (inf for b < a)."""
    if segment_cost not in SEGMENT_COSTS:
        raise DDSMError(f"unknown segment cost {segment_cost!r} (choose from {', '.join(SEGMENT_COSTS)})")
    c = np.asarray(cost, dtype=np.float64)
    n = len(c)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    valid = b >= a
    if segment_cost == "center":
        rows = np.concatenate([np.zeros((n, 1)), np.cumsum(c, axis=1)], axis=1)  # rows[r, j] = sum c[r, :j]
        center = np.where(valid, a + (b - a + 1) // 2, 0)
        seg = rows[center, np.where(valid, b + 1, 0)] - rows[center, a]
    else:  # half the block sum without its diagonal: sum over pairs i < j of (c[i, j] + c[j, i]) / 2
        box = np.zeros((n + 1, n + 1))
        box[1:, 1:] = np.cumsum(np.cumsum(c, axis=0), axis=1)
        diag = np.concatenate([[0.0], np.cumsum(np.diag(c))])
        hi = np.where(valid, b + 1, 0)
        block = box[hi, hi] - box[a, hi] - box[hi, a] + box[a, a]
        seg = (block - (diag[hi] - diag[a])) / 2
    return np.where(valid, seg, np.inf)


def length_bounds(n: int, k: int, balance: float | None) -> tuple[int, int]:
    """Return the (shortest, longest) segment allowed when splitting n grid points into k segments."""
    if balance is None:
        return 1, n
    lo = math.floor((1 - balance) * n / k + 1e-9)
    hi = math.ceil((1 + balance) * n / k - 1e-9)
    return max(1, lo), min(n, hi)


def check_split(n: int, k, balance) -> None:
    """Raise DDSMError unless k segments (and the balance) suit a grid of n timesteps."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DDSMError(f"k (the number of stages) must be an integer of at least 1, got {k!r}")
    if k > n:
        raise DDSMError(f"k={k} stages do not fit a grid of {n} timesteps")
    if balance is not None and not (isinstance(balance, (int, float)) and 0 <= balance <= 1):
        raise DDSMError(f"balance must be between 0 and 1 (or none), got {balance!r}")


def interval_cluster(cost, k: int, balance: float | None = 0.5, segment_cost: str = "center",
                     timesteps: Sequence[int] | None = None) -> dict:
    """Return the split of the grid into k contiguous segments with the least total segment cost.

    Exact dynamic programming: best[m, i] is the least cost of the first i grid points in m segments,
    every segment's length within `length_bounds`; ties go to the earliest boundary. The result has
    `boundaries` (grid index where segments 2..k start), `boundary_timesteps`, `segments` (inclusive
    grid index ranges), `lengths` and the total `cost`.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or not np.isfinite(cost).all():
        raise DDSMError(f"the cost must be a finite square matrix, got shape {cost.shape}")
    n = len(cost)
    check_split(n, k, balance)
    seg = segment_costs(cost, segment_cost)
    lo, hi = length_bounds(n, k, balance)
    best = np.full((k + 1, n + 1), np.inf)
    back = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for i in range(m * lo, n + 1):
            starts = np.arange(max(0, i - hi), i - lo + 1)  # the last segment is starts..i-1
            totals = best[m - 1, starts] + seg[starts, i - 1]
            j = int(np.argmin(totals))
            best[m, i], back[m, i] = totals[j], starts[j]
    if not np.isfinite(best[k, n]):
        raise DDSMError(f"no split of {n} timesteps into {k} segments of {lo}..{hi} exists")
    starts, i = [], n
    for m in range(k, 0, -1):
        i = int(back[m, i])
        starts.append(i)
    starts.reverse()
    ends = starts[1:] + [n]
    grid = list(range(n)) if timesteps is None else [int(t) for t in timesteps]
    return {"boundaries": starts[1:], "boundary_timesteps": [grid[s] for s in starts[1:]],
            "segments": [[s, e - 1] for s, e in zip(starts, ends)], "lengths": [e - s for s, e in zip(starts, ends)],
            "cost": float(best[k, n])}


def plot_similarity(matrix, timesteps: Sequence[int], boundaries: Sequence[int], path: str | Path | None = None,
                    title: str = "dissimilarity between timesteps"):
    """Draw the matrix as a heat map (timesteps on both axes) with the stage boundaries, on a matplotlib
    Figure made without pyplot (the user's backend is left alone); write it to `path` as a PNG if given;
    return the Figure."""
    from matplotlib.patches import Rectangle

    matrix = np.asarray(matrix, dtype=float)
    n = len(matrix)
    fig = new_figure(5.6, 4.8)
    ax = fig.subplots()
    im = ax.imshow(matrix, origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    edges = [-0.5] + [b - 0.5 for b in boundaries] + [n - 0.5]
    for b in boundaries:
        ax.axhline(b - 0.5, color="w", lw=0.8, alpha=0.7)
        ax.axvline(b - 0.5, color="w", lw=0.8, alpha=0.7)
    for a, b in zip(edges[:-1], edges[1:]):  # each stage's own block
        ax.add_patch(Rectangle((a, a), b - a, b - a, fill=False, edgecolor="r", lw=1.5, zorder=3))
    ticks = sorted(set(np.linspace(0, n - 1, min(n, 6)).round().astype(int).tolist()))
    ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks])
    ax.set_yticks(ticks, [str(timesteps[i]) for i in ticks])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t")
    ax.set_title(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def check_stage_args(num_timesteps: int, k, cost: str, has_model: bool, grid: int | None, samples: int | None,
                     balance, segment_cost: str, metric: str) -> tuple[int, int]:
    """Raise DDSMError on a bad stage request; return the (grid, samples) it will use."""
    if cost not in COSTS:
        raise DDSMError(f"unknown cost {cost!r} (choose from {', '.join(COSTS)})")
    if cost == "gradient" and not has_model:
        raise DDSMError("the gradient cost needs a model (--supernet DIR)")
    if segment_cost not in SEGMENT_COSTS:
        raise DDSMError(f"unknown segment cost {segment_cost!r} (choose from {', '.join(SEGMENT_COSTS)})")
    if metric not in DENOISER_METRICS:
        raise DDSMError(f"unknown denoiser metric {metric!r} (choose from {', '.join(DENOISER_METRICS)})")
    grid = min(DEFAULT_GRID[cost], num_timesteps) if grid is None else grid
    if isinstance(grid, bool) or not isinstance(grid, int):
        raise DDSMError(f"the grid must be a number of timesteps, got {grid!r}")
    grid_timesteps(num_timesteps, grid)
    check_split(grid, k, balance)
    samples = DEFAULT_SAMPLES[cost] if samples is None else samples
    if cost != "logsnr" and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise DDSMError(f"samples must be at least 1, got {samples!r}")
    return grid, samples


def find_stages(cfg: ExperimentConfig | str | Path, k: int, cost: str = "denoiser", model: torch.nn.Module | None = None,
                grid: int | None = None, samples: int | None = None, seed: int = 0, balance: float | None = 0.5,
                segment_cost: str = "center", metric: str = "mse", progress: bool = False) -> dict:
    """Return k timestep stages of the experiment's training data: boundaries, the matrix and metadata
    (`progress`: a bar over the grid's timesteps while the matrix is computed)."""
    cfg = cfg if isinstance(cfg, ExperimentConfig) else load_config(cfg)
    T = cfg.diffusion.timesteps
    grid, samples = check_stage_args(T, k, cost, model is not None, grid, samples, balance, segment_cost, metric)
    timesteps = grid_timesteps(T, grid)
    abar = NoiseSchedule(cfg.diffusion).alphas_cumprod
    d = cfg.data
    data = None
    if cost == "logsnr":
        matrix = logsnr_cost(timesteps, abar)
    else:
        data = load_data(d)
        if cost == "denoiser":
            matrix = denoiser_cost(data, timesteps, abar, samples=samples, seed=seed, metric=metric, progress=progress)
        else:
            matrix = gradient_cost(model, data, timesteps, abar, samples=samples, seed=seed, progress=progress)
    split = interval_cluster(matrix, k, balance=balance, segment_cost=segment_cost, timesteps=timesteps)
    starts = [0] + split["boundary_timesteps"]
    stops = [t - 1 for t in split["boundary_timesteps"]] + [T - 1]
    return {
        "format": FORMAT, "version": VERSION, "experiment": cfg.name,
        "dataset": data_key(d),
        "images": None if data is None else len(data), "diffusion": cfg.to_dict()["diffusion"],
        "cost": cost, "metric": metric if cost == "denoiser" else None, "segment_cost": segment_cost,
        "balance": balance, "k": int(k), "samples": samples if cost != "logsnr" else None, "seed": seed,
        "grid": timesteps, "boundaries": split["boundaries"], "boundary_timesteps": split["boundary_timesteps"],
        "stages": [{"stage": i, "t_min": a, "t_max": b, "grid": seg}  # stage 0: least noise
                   for i, (a, b, seg) in enumerate(zip(starts, stops, split["segments"]))],
        "objective": split["cost"], "matrix": np.asarray(matrix, dtype=float).tolist(),
    }


def write_stages(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write similarity.png, then stages.json (atomically, the JSON last) into out_dir; return both paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a directory")
    title = f"{result['cost']} dissimilarity, {result['k']} stages ({result['experiment']})"
    png = out / SIMILARITY_PNG
    plot_similarity(result["matrix"], result["grid"], result["boundaries"], png, title=title)
    return write_json_atomic(out / STAGES_JSON, result), png


def describe(result: dict) -> str:
    """Return one line naming each stage's timestep range."""
    ranges = ", ".join(f"[{s['t_min']}, {s['t_max']}]" for s in result["stages"])
    return (f"{result['k']} stage(s) by {result['cost']} cost over {len(result['grid'])} timesteps, least noise "
            f"first: t in {ranges}; boundaries at t = {result['boundary_timesteps']}")
