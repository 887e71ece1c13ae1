"""Reference statistics of real images (mean, covariance, KID features), computed once and cached on disk.

A cache entry is a safetensors file of arrays and a JSON beside it (written last) holding the key
fields and the arrays file's SHA-256. An entry whose key fields differ (other extractor weights,
other images) is stale and one whose checksum or arrays do not check out is corrupt: either is
rebuilt with one logged line, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DDSMError
from ..io import cache_dir as cache_dir_default
from ..io import read_json, sha256_file, write_atomic, write_json_atomic
from .features import FeatureExtractor
from .fid import fid_kid, gaussian_stats

log = logging.getLogger(__name__)

FORMAT, VERSION = "ddsm-search/reference", 1
KID_ROWS = 5000  # feature rows kept for KID: clean-fid's subsets hold at most 1000, so 5000 is plenty


@dataclass
class ReferenceStats:
    """Mean and covariance of real images' features, a sample of the feature rows for KID, and their key."""

    key: dict
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    path: Path | None = None

    @property
    def name(self) -> str:
        """Return a short readable identity: dataset, extractor key and image count."""
        return f"{self.key['dataset']}/{self.key['split']}/{self.key['extractor']}/n={self.key['count']}"

    def score(self, feats: np.ndarray, *, kid: bool = True, seed: int = 0) -> dict:
        """Return {fid, kid, kid_std} of a feature matrix against these statistics."""
        return fid_kid(feats, self.mu, self.sigma, self.feats, kid=kid, seed=seed)


def images_sha256(images: torch.Tensor) -> str:
    """Return the SHA-256 of uint8 images' bytes and shape: the identity of the exact pixels used."""
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _entry_stem(key: dict) -> str:
    # readable and short: a folder's or CIFAR's dataset key holds an absolute path, so it is hashed
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "_", key["dataset"])
    if len(dataset) > 40:
        dataset = f"{dataset[:24]}-{hashlib.sha1(key['dataset'].encode()).hexdigest()[:12]}"
    return f"{key['extractor_name']}__{dataset}__{key['split']}__{key['requested']}"


def _compute(data, n: int | None, extractor: FeatureExtractor, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = data.to_float(slice(0, n))
    feats = extractor.features(images, batch_size)
    mu, sigma = gaussian_stats(feats)
    if len(feats) > KID_ROWS:  # a fixed, seeded sample keeps entries small for big datasets
        feats = feats[np.sort(np.random.default_rng(0).choice(len(feats), KID_ROWS, replace=False))]
    return mu, sigma, feats.astype(np.float32)


def _read(stem: Path, key: dict) -> tuple[ReferenceStats | None, str]:
    """Return (stats, '') from a valid cache entry, or (None, why it cannot be used)."""
    arrays_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not meta_path.is_file() or not arrays_path.is_file():
        return None, "missing"
    try:
        meta = read_json(meta_path)
    except DDSMError:
        return None, "corrupt (unreadable JSON)"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return None, "stale (another format version)"
    stored = meta.get("key") or {}
    differ = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
    if differ:
        return None, f"stale ({', '.join(differ)} changed)"
    if sha256_file(arrays_path) != meta.get("sha256"):
        return None, "corrupt (checksum mismatch)"
    try:
        from safetensors.numpy import load_file

        arrays = load_file(str(arrays_path))
        mu, sigma, feats = arrays["mu"], arrays["sigma"], arrays["feats"].astype(np.float64)
    except Exception as err:  # noqa: BLE001 - any failure to read means the same: rebuild
        return None, f"corrupt ({type(err).__name__})"
    d = mu.shape[0] if mu.ndim == 1 else -1
    if sigma.shape != (d, d) or feats.ndim != 2 or feats.shape[1] != d:
        return None, "corrupt (array shapes)"
    return ReferenceStats(key, mu, sigma, feats, arrays_path), ""


def _write(stem: Path, stats: ReferenceStats) -> None:
    from safetensors.numpy import save

    blob = save({"mu": stats.mu, "sigma": stats.sigma, "feats": stats.feats.astype(np.float32)})
    arrays_path = stem.with_suffix(".safetensors")
    write_atomic(arrays_path, lambda tmp: tmp.write_bytes(blob))  # bytes: safetensors' save_file resets the mode
    write_json_atomic(stem.with_suffix(".json"), {"format": FORMAT, "version": VERSION, "key": stats.key,
                                                  "sha256": hashlib.sha256(blob).hexdigest()})
    stats.path = arrays_path


def reference_stats(data, *, dataset: str, split: str, extractor: FeatureExtractor, n: int | None = None,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 500) -> ReferenceStats:
    """Return the reference statistics of the first `n` (default all) images of `data`, from cache or computed.

    `data` is a `ddsm_search.data.ImageData`; `dataset` its `data.dataset_key(...)` and `split` its split.
    """
    if n is not None and not 2 <= n <= len(data):
        raise ValueError(f"reference image count must be between 2 and {len(data)}, got {n}")
    count = len(data) if n is None else n
    key = {"dataset": dataset, "split": split, "extractor": extractor.key, "extractor_name": extractor.name,
           "requested": "all" if n is None else str(n), "count": count,
           "images_sha256": images_sha256(data.images[:count])}
    stem = Path(cache_dir if cache_dir is not None else cache_dir_default()).expanduser() / "reference" / _entry_stem(key)
    stats, why = _read(stem, key)
    if stats is not None:
        return stats
    if why == "missing":
        log.info("computing reference statistics %s/%s with %s (%d images)", dataset, split, extractor.name, count)
    else:
        log.warning("reference cache %s is %s; rebuilding", stem.with_suffix(".json"), why)
    mu, sigma, feats = _compute(data, count, extractor, batch_size)
    stats = ReferenceStats(key, mu, sigma, feats.astype(np.float64))
    _write(stem, stats)
    return stats
