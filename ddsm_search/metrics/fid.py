"""FID and KID from feature matrices: the one Frechet distance and the one kernel distance of the project.

Both follow clean-fid (`cleanfid.fid.frechet_distance` and `kernel_distance`), which cannot be
imported on the CPU build of torch used here, so they are re-implemented and tested against closed forms.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

KID_SUBSETS = 100  # clean-fid's num_subsets
KID_SUBSET_SIZE = 1000  # clean-fid's max_subset_size
GRAM_ROWS = 4096  # up to this many rows per set, KID uses whole kernel matrices (128 MiB each at most)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean (D,) and unbiased covariance (D, D) of a feature matrix (N, D) as float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need a feature matrix with at least 2 rows, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg  # deferred: scipy takes half a second to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are expected and handled by the caller
        return linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Return the Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # as clean-fid: a (nearly) singular product has no stable root; nudge both covariances
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # rounding gives the root of a near-PSD product a small imaginary part; a large one is a real failure
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the cubic polynomial kernel matrix (a.b / d + 1)^3."""
    k = a @ b.T
    k /= a.shape[1]
    k += 1
    cube = k * k
    cube *= k  # three multiplies: ** 3 takes numpy's slow pow() path, five times slower
    return cube


def _mmd_loop(feats1: np.ndarray, feats2: np.ndarray, draws: list, m: int) -> np.ndarray:
    values = np.empty(len(draws))
    for i, (ix, iy) in enumerate(draws):
        x, y = feats2[ix], feats1[iy]
        kxx, kyy = _kernel(x, x), _kernel(y, y)
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        values[i] = (within / (m - 1) - _kernel(x, y).sum() * 2 / m) / m
    return values


def _mmd_gram(feats1: np.ndarray, feats2: np.ndarray, draws: list, m: int) -> np.ndarray:
    # one kernel matrix per pair of sets, then every subset's sums as indicator-vector products:
    # the same numbers as the loop, twenty times faster at a few thousand rows
    sx = np.zeros((len(draws), feats2.shape[0]))
    sy = np.zeros((len(draws), feats1.shape[0]))
    for i, (ix, iy) in enumerate(draws):
        sx[i, ix], sy[i, iy] = 1.0, 1.0
    k22, k11, k12 = _kernel(feats2, feats2), _kernel(feats1, feats1), _kernel(feats1, feats2)
    within = (((sx @ k22) * sx).sum(1) - sx @ np.diagonal(k22) + ((sy @ k11) * sy).sum(1) - sy @ np.diagonal(k11))
    between = ((sy @ k12) * sx).sum(1)
    return (within / (m - 1) - between * 2 / m) / m


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = KID_SUBSETS,
                    max_subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
                    gram_rows: int = GRAM_ROWS) -> tuple[float, float]:
    """Return (mean, std over subsets) of the unbiased MMD^2 with kernel (x.y / d + 1)^3: the KID.

    As clean-fid's `kernel_distance`, but the subsets come from a seeded generator, so the same
    features always give the same KID, and the spread over subsets is returned too.
    """
    feats1, feats2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"mismatched feature matrices {feats1.shape} and {feats2.shape}")
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 rows in each feature matrix")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(feats2.shape[0], m, replace=False), rng.choice(feats1.shape[0], m, replace=False))
             for _ in range(num_subsets)]
    small = max(feats1.shape[0], feats2.shape[0]) <= gram_rows
    values = (_mmd_gram if small else _mmd_loop)(feats1, feats2, draws, m)
    return float(values.mean()), float(values.std())


def fid_kid(feats: np.ndarray, mu: np.ndarray, sigma: np.ndarray, ref_feats: np.ndarray, *, kid: bool = True,
            seed: int = 0) -> dict:
    """Return {fid, kid, kid_std} of a feature matrix against reference statistics (KID as NaN if kid=False)."""
    mu1, sigma1 = gaussian_stats(feats)
    out = {"fid": frechet_distance(mu1, sigma1, mu, sigma), "kid": float("nan"), "kid_std": float("nan")}
    if kid:
        out["kid"], out["kid_std"] = kernel_distance(feats, ref_feats, seed=seed)
    return out
