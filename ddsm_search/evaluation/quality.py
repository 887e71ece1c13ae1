"""The evaluate stage: sample a plan on a named seed set and score it: FID, KID, drift, FLOPs and time.

Generated images are compared with the supernet's own training images (its `config.data`, all of
them): the distribution the model learns. Real images the model never saw (the test split) serve for
the noise floor, the score that real images themselves get at the same sample count.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import DataConfig
from ..data import SPLITS, load_data
from ..errors import DDSMError
from ..metrics import FeatureExtractor, ReferenceStats, default_extractor_for, get_extractor, seed_for
from ..sampling import PrefixCache, executed_summary, generate
from ..space.steps import ExecutedRecord
from .full_samples import full_size_samples
from .scoring import FullReference, Scorer, check_reference, score_images, training_reference


def evaluate(plan, scorer: Scorer, *, n: int, seed_set: str = "search", batch_size: int = 500,
             progress: bool = False, cache: PrefixCache | None = None, full: FullReference | None = None,
             drift: bool = False, keep: bool = False, kid: bool = True, cache_dir=None) -> dict:
    """Return FID, KID (mean and spread), drift, GFLOPs per image and timings of a plan on a named seed set.

    Every plan scored on the same seed set starts from the same noise (common random numbers). Make
    the `scorer` (evaluation.scoring.scorer_for or make_scorer) once when scoring many plans, and pass a
    `sampling.PrefixCache` (one per n and seed set) to resume from latents of a shared prefix.
    With `drift` (or a `full` reference given), drift from full size's images of the same noise is
    measured too (they are made once and kept beside the supernet); with `keep`, the per-image values
    that confidence intervals need come back as well (`features`, `drift_values`). A plan with dynamic
    steps reports the GFLOPs per image they executed, measured while sampling (mean; `executed` holds
    their spread and each recorded figure per step).
    """
    if not isinstance(n, int) or n < 2:
        raise DDSMError(f"evaluation needs at least 2 images (a covariance), got n={n}")
    seed = seed_for(seed_set)
    if scorer.extractor is not None:
        check_reference(scorer.reference, scorer.extractor)
    if (drift or keep) and full is None:
        full = FullReference(full_size_samples(plan, n=n, seed_set=seed_set, batch_size=batch_size, cache=cache,
                                               cache_dir=cache_dir))
    record = ExecutedRecord() if plan.dynamic else None
    started = time.perf_counter()
    images = generate(plan, n=n, seed=seed, batch_size=batch_size, progress=progress, cache=cache, record=record)
    seconds = time.perf_counter() - started
    done = None
    if record is not None:
        done = executed_summary(plan, record, n)
        done.pop("per_image")
    started = time.perf_counter()
    scores = score_images(scorer, images, full=full, batch_size=batch_size, kid=kid, keep=keep)
    eval_seconds = time.perf_counter() - started
    supernet = plan.supernet
    return {
        **scores,
        "gflops_per_image": (done["flops_per_image"]["mean"] if done else plan.flops()) / 1e9,
        "executed": done,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
        "n": n,
        "seed_set": seed_set,
        "seed": seed,
        "extractor": scorer.extractor.name if scorer.extractor is not None else None,
        "reference": scorer.reference.name if scorer.reference is not None else None,
        "drift_space": scorer.drift_space if full is not None else None,
        "solver": plan.solver.key,
        "timesteps": list(plan.timesteps),
        "steps": len(plan),
        "schedule": plan.key,
        "supernet": str(supernet.path),
        "supernet_sha256": supernet.sha256,
    }


def noise_floor(data: DataConfig, *, n: int, source: str = "test", seed: int = 0,
                extractor: FeatureExtractor | None = None, device: str = "cpu", reference: ReferenceStats | None = None,
                cache_dir=None, batch_size: int = 500) -> dict:
    """Return FID and KID of `n` real images against the training reference: what a perfect generator scores.

    source="test" draws from the held-out split, disjoint from the reference: the honest floor while n
    fits in the split, an upper bound beyond (images are then drawn with replacement and duplicates
    carry no new information). source="train" draws from the reference images themselves: a lower bound.
    """
    if source not in ("test", "train"):
        raise DDSMError(f"noise floor source must be 'test' or 'train', got {source!r}")
    if not isinstance(n, int) or n < 2:
        raise DDSMError(f"the noise floor needs at least 2 images, got n={n}")
    if extractor is None:
        extractor = get_extractor(default_extractor_for(data.kind), device)
    if reference is None:
        reference = training_reference(data, extractor, cache_dir=cache_dir, batch_size=batch_size)
    check_reference(reference, extractor)
    split = data.split
    if source == "test":
        if data.split != "train" or "test" not in SPLITS[data.kind]:
            raise DDSMError(f"dataset '{data.kind}' split '{data.split}' has no held-out test split for the noise floor; "
                            "use source='train'")
        split = "test"
    pool = load_data(data, split)
    replace = n > len(pool)
    index = np.random.default_rng(seed).choice(len(pool), n, replace=replace)
    images = pool.to_float(torch.from_numpy(index))
    scores = reference.score(extractor.features(images, batch_size))
    return {**scores, "n": n, "source": source, "pool": len(pool), "with_replacement": replace, "seed": seed,
            "extractor": extractor.name, "reference": reference.name}
