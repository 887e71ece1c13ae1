"""What a schedule's images are scored with: FID and KID against the training images, and drift from
the full-size images made from the same noise.

FID and KID need a feature extractor (the embedded digits CNN, or clean-fid's Inception, whose
weights must be on disk); drift needs none: where no extractor is used it is measured in pixel space
(1 - SSIM per image), so CIFAR-10 and image folders can be searched offline. A `Scorer` holds those
choices for one supernet, made once per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import DataConfig
from ..data import data_key, load_data
from ..errors import DDSMError
from ..metrics import FeatureExtractor, ReferenceStats, default_extractor_for, get_extractor, reference_stats

METRICS = ("fid", "kid", "drift")
DRIFT_SPACES = ("auto", "features", "pixels")


@dataclass
class Scorer:
    """The scoring of one supernet's samples.

    extractor, reference: FID/KID features and the training images' statistics (None: not scored).
    drift_extractor: the feature space drift is measured in (None: pixel space, 1 - SSIM).
    """

    extractor: object | None
    reference: object | None
    drift_extractor: object | None

    @property
    def drift_space(self) -> str:
        """Return "features" or "pixels": where drift is measured."""
        return "pixels" if self.drift_extractor is None else "features"


@dataclass
class FullReference:
    """The full-size images of a seed set, and their features in the drift space once computed."""

    images: torch.Tensor
    features: np.ndarray | None = field(default=None, repr=False)


def drift_space_for(data_kind: str, drift_space: str) -> str:
    """Return "features" or "pixels" for a drift_space setting: auto is features for digits (its CNN is
    embedded) and pixels elsewhere, whatever happens to be on this machine's disk, so that a run's
    drift means the same on every machine."""
    if drift_space not in DRIFT_SPACES:
        raise DDSMError(f"search.drift_space: expected one of {', '.join(DRIFT_SPACES)}, got {drift_space!r}")
    if drift_space == "auto":
        return "features" if data_kind == "digits" else "pixels"
    return drift_space


def make_scorer(supernet, *, metric: str, drift_space: str = "auto", device: str = "cpu", cache_dir=None,
                batch_size: int = 500) -> Scorer:
    """Return the scorer a run with this metric needs.

    For fid and kid the extractor is required (a missing Inception file is an error naming it). For
    drift it is used if it loads without downloading anything, so FID and KID are recorded beside drift
    where they can be, and left out (NaN) where they cannot.
    """
    if metric not in METRICS:
        raise DDSMError(f"search.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    kind = supernet.config.data.kind
    space = drift_space_for(kind, drift_space)
    try:
        extractor = get_extractor(default_extractor_for(kind), device)
    except DDSMError:
        if metric != "drift" or space == "features":
            raise
        extractor = None
    reference = None
    if extractor is not None:
        reference = training_reference(supernet.config.data, extractor, cache_dir=cache_dir, batch_size=batch_size)
    return Scorer(extractor, reference, extractor if space == "features" else None)


def score_images(scorer: Scorer, images: torch.Tensor, *, full: FullReference | None = None, batch_size: int = 500,
                 kid: bool = True, keep: bool = False) -> dict:
    """Return fid, kid, kid_std and drift of `images` (NaN for what the scorer cannot measure).

    With `keep`, also `features` (the FID features) and `drift_values` (one per image), which
    confidence intervals resample.
    """
    from ..metrics.paired import drift as paired_drift

    out = {"fid": math.nan, "kid": math.nan, "kid_std": math.nan, "drift": math.nan}
    feats = None
    if scorer.extractor is not None:
        feats = scorer.extractor.features(images, batch_size)
        out.update(scorer.reference.score(feats, kid=kid))
        if keep:
            out["features"] = feats
    if full is not None:
        if len(full.images) != len(images):
            raise ValueError(f"{len(images)} images against {len(full.images)} full-size ones")
        if scorer.drift_extractor is not None:
            if full.features is None:
                full.features = scorer.drift_extractor.features(full.images, batch_size)
            mine = feats if scorer.drift_extractor is scorer.extractor else scorer.drift_extractor.features(images, batch_size)
            from ..metrics.paired import feature_drift

            values = feature_drift(mine, full.features)
        else:
            values = paired_drift(images, full.images)
        out["drift"] = float(np.mean(values))
        if keep:
            out["drift_values"] = values
    return out


def training_reference(data: DataConfig, extractor: FeatureExtractor, *, cache_dir=None,
                       batch_size: int = 500) -> ReferenceStats:
    """Return the (cached) reference statistics of an experiment's training images."""
    images = load_data(data)
    if len(images) < 2:
        raise DDSMError(f"data.limit: the reference statistics (FID, KID) need at least 2 training images, "
                        f"got {len(images)}")
    return reference_stats(images, dataset=data_key(data), split=data.split, extractor=extractor, cache_dir=cache_dir,
                           batch_size=batch_size)


def check_reference(reference: ReferenceStats, extractor: FeatureExtractor) -> None:
    """Raise ValueError unless the reference statistics were made with this extractor."""
    if reference.key["extractor"] != extractor.key:
        raise ValueError(f"reference statistics were made with {reference.key['extractor']}, not {extractor.key}")


def scorer_for(supernet, *, extractor: str | None = None, drift_space: str = "auto", device: str = "cpu",
               cache_dir=None, batch_size: int = 500) -> Scorer:
    """Return the scorer of a supernet's samples with a named feature `extractor` (default: the data's:
    digits-cnn for digits, inception elsewhere), FID/KID against its training images and drift in the
    space `drift_space` says (features or pixels)."""
    data = supernet.config.data
    feats = get_extractor(extractor or default_extractor_for(data.kind), device)
    reference = training_reference(data, feats, cache_dir=cache_dir, batch_size=batch_size)
    return Scorer(feats, reference, feats if drift_space_for(data.kind, drift_space) == "features" else None)
