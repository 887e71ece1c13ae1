"""Confidence intervals for confirming an exported schedule on held-out noise, against the full-size model.

Image i of a schedule and image i of the full-size model come from the same initial noise, so every interval
here is paired: per-image differences (or drifts) get a plain standard error, and the FID gap is bootstrapped
by resampling image indices, the same indices for both sets.

`bootstrap_interval` is `scipy.stats.bootstrap` (percentile method by default). `fid_gap_interval` does not
use it: its statistic reads two (N, D) feature matrices at once, while scipy hands a non-vectorized statistic
1-D slices along the resampled axis (so it would need an index-array workaround), and its BCa method needs N
jackknife FIDs. A direct loop over seeded index draws is shorter and lets each FID reuse one square root of
the reference covariance (see `fid_gap_interval`).
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from .fid import frechet_distance, gaussian_stats


def _values(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 values, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or infinity")
    return values


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_interval(values, confidence: float = 0.95) -> dict:
    """Return {mean, se, low, high, n, confidence}: the mean, its standard error, a normal-approximation interval."""
    values = _values(values)
    _check_confidence(confidence)
    mean = float(values.mean())
    # the values are already per-image paired differences (or drifts), so this is the paired standard error
    se = float(values.std(ddof=1) / np.sqrt(values.size))
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    return {"mean": mean, "se": se, "low": mean - z * se, "high": mean + z * se, "n": int(values.size),
            "confidence": confidence}


def bootstrap_interval(values, statistic=np.mean, confidence: float = 0.95, resamples: int = 1000,
                       seed: int = 0, method: str = "percentile") -> dict:
    """Return {estimate, se, low, high, n, resamples, confidence}: a bootstrap interval of statistic(values)."""
    values = _values(values)
    _check_confidence(confidence)
    if resamples < 2:
        raise ValueError(f"need at least 2 resamples, got {resamples}")
    # scipy calls statistic(sample, axis=-1) on whole batches of resamples when it takes `axis` (np.mean does)
    res = sps.bootstrap((values,), statistic, n_resamples=resamples, confidence_level=confidence,
                        method=method, rng=np.random.default_rng(seed))
    return {"estimate": float(statistic(values)), "se": float(res.standard_error),
            "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high),
            "n": int(values.size), "resamples": resamples, "confidence": confidence}


class _RootedFID:
    """FID against fixed reference statistics, with the reference covariance's square root computed once.

    Tr sqrt(S R) = Tr sqrt(R^1/2 S R^1/2), and R^1/2 S R^1/2 is the covariance of the features times R^1/2: a
    symmetric PSD matrix whose eigenvalues (eigvalsh) give the trace term. That is the quantity
    `frechet_distance` computes with a general matrix square root, which is ten to fifty times slower.
    """

    def __init__(self, ref_mu: np.ndarray, ref_sigma: np.ndarray):
        w, v = np.linalg.eigh(ref_sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # clip: rounding makes zero eigenvalues negative
        self.mu, self.trace = ref_mu, float(np.trace(ref_sigma))

    def prepare(self, feats: np.ndarray) -> np.ndarray:
        """Return the features times R^1/2, computed once per set so that each resample only gathers rows."""
        return feats @ self.root

    def __call__(self, feats: np.ndarray, rooted: np.ndarray) -> float:
        """Return the FID of feats (with rooted = prepare(feats), same rows) against the reference."""
        mu = feats.mean(axis=0)
        trace = float(feats.var(axis=0, ddof=1).sum())  # Tr S: unbiased, as gaussian_stats' covariance
        _, cov_rooted = gaussian_stats(rooted)  # R^1/2 S R^1/2
        root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(cov_rooted), 0, None)).sum()
        diff = mu - self.mu
        return float(diff @ diff + trace + self.trace - 2 * root_trace)


def fid_gap_interval(feats_sched: np.ndarray, feats_full: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                     confidence: float = 0.95, resamples: int = 200, seed: int = 0, method: str = "basic") -> dict:
    """Return {estimate, debiased, fid_sched, fid_full, bias, se, low, high, ...}: FID(sched) - FID(full), paired CI.

    The point estimate is `frechet_distance` on all images. The interval is a paired bootstrap: each resample
    draws N image indices with replacement, the same for both sets (row i of each comes from the same noise),
    and recomputes both FIDs against the fixed reference statistics.

    method "basic" (default) is the reverse-percentile interval (2 estimate - q_high, 2 estimate - q_low): FID
    is biased upwards on finite N, more so for the wider-spread set, and a resample (about 63% distinct images)
    adds that bias again, so the plain "percentile" interval is shifted by the bias twice. In a simulation
    (D = 64, N = 1000, population gap 1.99, estimate's mean 2.19, 100 runs) the percentile interval covered
    the population gap in 0% of runs, the basic one in 93% (94% at D = 16, N = 500; 97-99% at N = 128-300).
    `bias` is the bootstrap's estimate of that bias (mean resampled gap - estimate) and `debiased` is
    estimate - bias; the basic interval is centred near `debiased`, so the plain estimate can lie outside it
    when the bias exceeds about two standard errors (few images, many features). The other keys: n,
    resamples, confidence, method.

    Cost: two covariances (N D^2) and two D x D eigvalsh per resample. N = 2000, D = 64, 200 resamples: about
    0.7 s on 2 cores. D = 2048 (Inception): about 1 s per FID, so about 7 minutes for 200 resamples on 2 cores
    (a general sqrtm per FID, as `frechet_distance` does, takes about 35 s: 4 hours).
    """
    a, b = np.asarray(feats_sched, dtype=np.float64), np.asarray(feats_full, dtype=np.float64)
    ref_mu, ref_sigma = np.asarray(ref_mu, dtype=np.float64), np.asarray(ref_sigma, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"need two paired feature matrices (N >= 2, D) of one shape, got {a.shape} and {b.shape}")
    d = a.shape[1]
    if ref_mu.shape != (d,) or ref_sigma.shape != (d, d):
        raise ValueError(f"reference statistics {ref_mu.shape}, {ref_sigma.shape} do not match {d} features")
    _check_confidence(confidence)
    if resamples < 2:
        raise ValueError(f"need at least 2 resamples, got {resamples}")
    if method not in ("basic", "percentile"):
        raise ValueError(f"method must be 'basic' or 'percentile', got {method!r}")

    # the point estimate is exactly the project's FID (its sqrtm, its handling of singular products)
    fid_a = frechet_distance(*gaussian_stats(a), ref_mu, ref_sigma)
    fid_b = frechet_distance(*gaussian_stats(b), ref_mu, ref_sigma)
    estimate = fid_a - fid_b

    fid = _RootedFID(ref_mu, ref_sigma)
    rooted_a, rooted_b = fid.prepare(a), fid.prepare(b)
    rng = np.random.default_rng(seed)
    gaps = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, a.shape[0], a.shape[0])
        gaps[r] = fid(a[idx], rooted_a[idx]) - fid(b[idx], rooted_b[idx])
    alpha = (1 - confidence) / 2
    q_low, q_high = np.quantile(gaps, [alpha, 1 - alpha])
    low, high = (2 * estimate - q_high, 2 * estimate - q_low) if method == "basic" else (q_low, q_high)
    bias = float(gaps.mean() - estimate)
    return {"estimate": estimate, "debiased": estimate - bias, "fid_sched": fid_a, "fid_full": fid_b, "bias": bias,
            "se": float(gaps.std(ddof=1)), "low": float(low), "high": float(high), "n": int(a.shape[0]),
            "resamples": resamples, "confidence": confidence, "method": method}
