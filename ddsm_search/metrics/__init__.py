"""Sample quality: feature extractors, reference statistics cached on disk, FID and KID, named seed sets.

A building block: imports no stage. clean-fid is imported only when the Inception extractor is built.
"""

from .features import EXTRACTORS, FeatureExtractor, default_extractor_for, get_extractor, inception_weights_path
from .fid import fid_kid, frechet_distance, gaussian_stats, kernel_distance
from .reference import ReferenceStats, reference_stats
from .seeds import HELDOUT, SEARCH, is_heldout, replicates, seed_for

__all__ = [
    "EXTRACTORS", "FeatureExtractor", "default_extractor_for", "get_extractor", "inception_weights_path",
    "fid_kid", "frechet_distance", "gaussian_stats", "kernel_distance",
    "ReferenceStats", "reference_stats",
    "HELDOUT", "SEARCH", "is_heldout", "replicates", "seed_for",
]
