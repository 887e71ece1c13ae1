"""The evaluate stage: sample a schedule on a named seed set and score it: FID, KID, FLOPs and time.

Generated images are compared with the supernet's own training images (its `config.data`, all of
them): the distribution the model learns. Real images the model never saw (the test split) serve for
the noise floor, the score that real images themselves get at the same sample count.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..checkpoint import Supernet
from ..config import DataConfig
from ..data import SPLITS, dataset_key, load_dataset
from ..errors import DDSMError
from ..metrics import (FeatureExtractor, ReferenceStats, default_extractor_for, get_extractor, reference_stats,
                       seed_for)
from .full_samples import full_size_samples
from ..sampling import PrefixCache, generate, make_denoisers, plan_steps
from .scoring import FullReference, Scorer, _check_reference, drift_space_for, score_images, training_reference
from ..methods.early_exit.policy import ExitPolicy, ExitRecord, plan_key


def evaluate(supernet: Supernet, subnets: Sequence, *, n: int, seed_set: str = "search",
             extractor: FeatureExtractor | None = None, device: str = "cpu", batch_size: int = 500, cache_dir=None,
             progress: bool = False, sampler: str | None = None, eta: float | None = None,
             reference: ReferenceStats | None = None, kid: bool = True, denoisers: dict | None = None,
             cache: PrefixCache | None = None, scorer: Scorer | None = None, drift: bool = False,
             full: FullReference | None = None, keep: bool = False, backend: str = "torch",
             exit: ExitPolicy | None = None, heads=None, weights=None) -> dict:
    """Return FID, KID (mean and spread), drift, GFLOPs per image and timings of a schedule on a named seed set.

    Every schedule scored on the same seed set starts from the same noise (common random numbers).
    Pass a `scorer` (or `extractor` and `reference`) and `denoisers` when scoring many schedules, to build
    them once, and a `sampling.PrefixCache` (one per n and seed set) to resume from latents of a shared
    schedule prefix. With `drift` (or a `full` reference given), drift from the full-size images of the
    same noise is measured too (they are made once and kept beside the supernet); with `keep`, the
    per-image values that confidence intervals need come back as well (`features`, `drift_values`).

    With a dynamic `exit` policy (and the supernet's certainty `heads`, or `denoisers` made for its
    steps), GFLOPs per image are those executed, measured while sampling (mean; `executed` holds
    their spread and the depth each step ran). With a schedule's fine-tuned group `weights`
    (group_weights.GroupWeights), each step runs its group's copy of its subnet.
    """
    if not isinstance(n, int) or n < 2:
        raise DDSMError(f"evaluation needs at least 2 images (a covariance), got n={n}")
    seed = seed_for(seed_set)
    subnets = supernet.step_subnets(subnets)  # checked; a multi-stage supernet's with each step's stage
    sample_cfg = supernet.config.sample
    sampler = sampler or sample_cfg.sampler
    eta = sample_cfg.eta if eta is None else eta
    if scorer is None:
        if extractor is None:
            extractor = get_extractor(default_extractor_for(supernet.config.data.kind), device)
        if reference is None:
            reference = training_reference(supernet.config.data, extractor, cache_dir=cache_dir, batch_size=batch_size)
        space = drift_space_for(supernet.config.data.kind, "auto")
        scorer = Scorer(extractor, reference, extractor if space == "features" else None)
    if scorer.extractor is not None:
        _check_reference(scorer.reference, scorer.extractor)
    steps = plan_steps(supernet.model, subnets, exit, weights)
    if denoisers is None:  # exported once for the full-size samples and the schedule
        denoisers = make_denoisers(supernet.model, [supernet.model.full, *steps], device, backend,
                                   min(n, batch_size), heads=heads, weights=weights)
    missing = [k for k in dict.fromkeys(steps) if k not in denoisers]
    if missing:  # dynamic or group steps (or subnets) first seen here: made once, kept in the caller's map
        denoisers.update(make_denoisers(supernet.model, missing, device, backend, min(n, batch_size), heads=heads,
                                        weights=weights))
    if (drift or keep) and full is None:
        full = FullReference(full_size_samples(supernet, n=n, seed_set=seed_set, seed=seed, sampler=sampler, eta=eta,
                                               steps=len(subnets), batch_size=batch_size, device=device,
                                               denoisers=denoisers, cache=cache, cache_dir=cache_dir))

    record = ExitRecord() if exit is not None and exit.dynamic else None
    started = time.perf_counter()
    images = generate(supernet.model, supernet.config.diffusion, subnets, n=n, seed=seed, sampler=sampler, eta=eta,
                      batch_size=batch_size, device=device, progress=progress, denoisers=denoisers, cache=cache,
                      exit=exit, record=record, weights=weights)
    seconds = time.perf_counter() - started
    done = None
    if record is not None:
        from ..methods.early_exit.finetune import executed

        done = executed(supernet, subnets, record, n)
        done.pop("per_image")
    started = time.perf_counter()
    scores = score_images(scorer, images, full=full, batch_size=batch_size, kid=kid, keep=keep)
    eval_seconds = time.perf_counter() - started
    return {
        **scores,
        "gflops_per_image": (done["flops_per_image"]["mean"] if done else supernet.schedule_flops(subnets)) / 1e9,
        "executed": done,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
        "n": n,
        "seed_set": seed_set,
        "seed": seed,
        "extractor": scorer.extractor.name if scorer.extractor is not None else None,
        "reference": scorer.reference.name if scorer.reference is not None else None,
        "drift_space": scorer.drift_space if full is not None else None,
        "sampler": sampler,
        "eta": eta,
        "steps": len(subnets),
        "schedule": plan_key(subnets, exit),
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
    _check_reference(reference, extractor)
    split = data.split
    if source == "test":
        if data.split != "train" or "test" not in SPLITS[data.kind]:
            raise DDSMError(f"dataset '{data.kind}' split '{data.split}' has no held-out test split for the noise floor; "
                            "use source='train'")
        split = "test"
    pool = load_dataset(data.kind, data.path, split=split, image_size=data.image_size, channels=data.channels,
                        limit=data.limit if split == data.split else None)
    replace = n > len(pool)
    index = np.random.default_rng(seed).choice(len(pool), n, replace=replace)
    images = pool.to_float(torch.from_numpy(index))
    scores = reference.score(extractor.features(images, batch_size))
    return {**scores, "n": n, "source": source, "pool": len(pool), "with_replacement": replace, "seed": seed,
            "extractor": extractor.name, "reference": reference.name}
