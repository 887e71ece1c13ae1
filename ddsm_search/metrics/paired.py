"""Paired drift: per image, how far a schedule's sample is from the full-size model's sample drawn from the
same initial noise (common random numbers), in feature space where an extractor exists, else as 1 - SSIM.

Pairing removes the noise of the initial draws: every image is compared with its own full-size twin, so the
mean over images has a plain paired standard error (see `stats.mean_interval`).

SSIM library: pytorch-msssim (1.0.0, `pip install pytorch-msssim`). Chosen over the other three because
- correctness: it averages the SSIM map over the "valid" positions only (windows wholly inside the image),
  exactly what scikit-image does (it crops the filter's border before averaging, Wang et al. 2004); the test
  checks the two agree to float precision. torchmetrics averages over a reflect-padded border instead, which
  on an 8x8 image is most of the map, and it ignores `kernel_size` for its Gaussian window (fixed by sigma);
- dependencies: it is one 10 kB module needing only torch. torchmetrics pulls lightning-utilities; piq
  requires torchvision, which does not import beside the CPU torch here; scikit-image (32 MB installed) pulls
  imageio, tifffile and lazy-loader, and is kept as the test's reference only;
- batch speed on CPU: a whole batch is a few separable grouped conv2d calls (2,000 3x32x32 pairs: about
  1.6 s in float64 on 2 cores; 2,000 1x8x8: 10 ms); scikit-image loops over images in numpy;
- maintenance: its last release is from 2023, but the code is small, stable and fully checked by the test;
- small images: the window is an argument, and `ssim_window` picks it from the image size (below).

Window rule (`ssim_window`): the standard 11-tap Gaussian (sigma 1.5) needs images of at least 14 pixels a
side to have a 4x4 grid of window positions; smaller images get the largest odd window w <= side - 3
(at least 3), with sigma = 1.5 * w / 11 so the window keeps scikit-image's truncation at 3.5 sigma (passing
that sigma to `skimage.metrics.structural_similarity(gaussian_weights=True)` gives the same window). Sides:
4 -> 3, 8 -> 5, 12 -> 9, >= 14 -> 11 (CIFAR's 32 included).
"""

from __future__ import annotations

import numpy as np
import torch

SSIM_WINDOW = 11  # Wang et al.'s 11-tap Gaussian with sigma 1.5, as scikit-image's gaussian_weights=True
SSIM_SIGMA = 1.5
MIN_POSITIONS = 4  # window positions kept per axis, so the mean is not over one or two local windows
DATA_RANGE = 2.0  # images are in [-1, 1]; SSIM's constants scale with this


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Return the (odd window size, Gaussian sigma) used for images of this size (see the module docstring)."""
    side = min(height, width)
    if side < 4:
        raise ValueError(f"SSIM needs images of at least 4x4 pixels, got {height}x{width}")
    size = min(SSIM_WINDOW, side - (MIN_POSITIONS - 1))
    size = max(3, size if size % 2 == 1 else size - 1)
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def feature_drift(feats_a: np.ndarray, feats_b: np.ndarray) -> np.ndarray:
    """Return the (N,) float64 Euclidean distances between paired feature rows feats_a[i] and feats_b[i]."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"need two feature matrices (N, D) of the same shape, got {a.shape} and {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def _check_images(images_a: torch.Tensor, images_b: torch.Tensor) -> None:
    if not (isinstance(images_a, torch.Tensor) and isinstance(images_b, torch.Tensor)):
        raise ValueError("pixel drift needs two torch tensors of images")
    if images_a.dim() != 4 or images_a.shape != images_b.shape or images_a.shape[0] == 0:
        raise ValueError(f"need two image batches (N, C, H, W) of the same shape, got "
                         f"{tuple(images_a.shape)} and {tuple(images_b.shape)}")
    if images_a.shape[1] not in (1, 3):
        raise ValueError(f"need 1 or 3 channels, got {images_a.shape[1]}")
    ssim_window(images_a.shape[2], images_a.shape[3])  # raises on images under 4x4


def pixel_drift(images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Return the (N,) float64 values 1 - SSIM(a[i], b[i]) for paired images in [-1, 1] (N, C, H, W)."""
    from pytorch_msssim import ssim  # deferred: only pixel-space drift needs it

    _check_images(images_a, images_b)
    size, sigma = ssim_window(images_a.shape[2], images_a.shape[3])
    # the 1-D Gaussian built in float64 (the library builds it in float32), shaped (C, 1, 1, size) as the
    # library's own: per-channel separable filtering, rows then columns
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    win = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    win = (win / win.sum()).reshape(1, 1, 1, size).repeat(images_a.shape[1], 1, 1, 1)
    out = []
    for a, b in zip(images_a.split(batch_size), images_b.split(batch_size)):
        # float64: the drift of near-identical images is a small difference of numbers close to 1
        a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        # size_average=False: one value per image, the mean over channels of each channel's mean SSIM map
        out.append(ssim(a, b, data_range=DATA_RANGE, size_average=False, win=win))
    return 1.0 - torch.cat(out).numpy()


def drift(images_a: torch.Tensor, images_b: torch.Tensor, extractor=None, batch_size: int = 500) -> np.ndarray:
    """Return the (N,) per-image drift: feature distance if an extractor is given, else 1 - SSIM."""
    if extractor is None:
        return pixel_drift(images_a, images_b)
    if images_a.shape != images_b.shape:
        raise ValueError(f"paired images differ in shape: {tuple(images_a.shape)} and {tuple(images_b.shape)}")
    return feature_drift(extractor.features(images_a, batch_size), extractor.features(images_b, batch_size))
