"""Images in and out: [-1, 1] tensors to uint8, sample grids as PNG, image arrays as .npz, figures as PNG.

Figures are `matplotlib.figure.Figure`s made without pyplot: drawing them never touches the user's
matplotlib backend or pyplot's figure list."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import write_atomic

OUTPUT_SUFFIXES = (".png", ".npz")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Return images (N, C, H, W) in [-1, 1] as a uint8 array (N, H, W, C) in [0, 255]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Return one uint8 picture (rows, cols, C) tiling the images in a near-square grid."""
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    return grid


def save_grid(path: str | Path, images: torch.Tensor, scale: int | None = None) -> Path:
    """Write the images as one PNG grid (small images enlarged to about 32 px); return the path."""
    if scale is None:
        scale = max(1, 32 // images.shape[-1])
    grid = make_grid(images, scale)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_images(path: str | Path, images: torch.Tensor, **extra) -> Path:
    """Write images to `path` as a PNG grid or an .npz (uint8 NHWC under 'images'); return the path."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return save_grid(path, images)
    arrays = {"images": to_uint8(images), **{k: np.asarray(v) for k, v in extra.items()}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file handle: np.savez would append .npz to the temporary name
            np.savez(fh, **arrays)

    return write_atomic(path, write)


def new_figure(width: float, height: float):
    """Return a matplotlib Figure of that size in inches, drawn without pyplot (the backend is left alone)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig, path: str | Path) -> Path:
    """Write a Figure as a PNG at `path` atomically; return the path."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
