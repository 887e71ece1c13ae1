"""The full-size model's samples on a seed set: what the drift of a schedule is measured against.

Drift compares each image of a schedule with the full-size image made from the same initial noise
(common random numbers), so every worker needs the full-size samples of its seed set. They are made
once and kept on disk beside the supernet (`full_size_samples/`), keyed by everything that decides
them: the supernet's hash, seed set, image count, solver and timesteps. A supernet folder that
cannot be written keeps them in the cache directory instead. Entries are written atomically and
checked by their SHA-256 before use; a stale or damaged one is made again, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import DDSMError
from ..io import cache_dir as default_cache_dir
from ..io import read_json, write_atomic, write_json_atomic
from ..metrics import seed_for
from ..sampling import generate

log = logging.getLogger(__name__)
FOLDER = "full_size_samples"
FORMAT, VERSION = "ddsm-search/full-size-samples", 1


def _key(plan, *, n: int, seed_set: str) -> dict:
    return {"supernet_sha256": plan.supernet.sha256, "seed_set": seed_set, "n": int(n), "solver": plan.solver.key,
            "timesteps": [int(t) for t in plan.timesteps]}


def _stem(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    solver = key["solver"].partition("(")[0]
    return f"{key['seed_set'].replace('/', '-')}-n{key['n']}-{solver}-{len(key['timesteps'])}steps-{digest}"


def _folders(supernet, cache_dir) -> list[Path]:
    spare = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [Path(supernet.path) / FOLDER, spare / FOLDER / supernet.sha256[:16]]


def _read(stem: Path, key: dict) -> torch.Tensor | None:
    from safetensors.torch import load_file

    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("key") != key:
            return None
        blob = data_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            log.warning("full-size samples %s are damaged (checksum); making them again", data_path)
            return None
        return load_file(str(data_path))["images"]
    except (OSError, ValueError, KeyError, DDSMError):
        return None


def _write(stem: Path, key: dict, images: torch.Tensor) -> None:
    from safetensors.torch import save

    blob = save({"images": images.contiguous()})
    write_atomic(stem.with_suffix(".safetensors"), lambda tmp: tmp.write_bytes(blob))
    write_json_atomic(stem.with_suffix(".json"), {"format": FORMAT, "version": VERSION, "key": key,
                                                  "sha256": hashlib.sha256(blob).hexdigest()})


def full_size_samples(plan, *, n: int, seed_set: str, batch_size: int = 500, cache=None,
                      cache_dir=None, progress: bool = False) -> torch.Tensor:
    """Return full size's `n` images on a seed set under `plan`'s solver and timesteps (a CPU
    float tensor in [-1, 1]), from disk if made before, else sampled now (with a bar if `progress`) and
    kept (beside the supernet, or in the cache directory)."""
    from ..backends import backend_of

    full = plan.full()  # a multi-stage supernet: each step's stage
    supernet = full.supernet
    # the backend is part of what made the images: another one differs in the last bits, and drift of
    # full size from itself must be exactly 0
    key = {**_key(full, n=n, seed_set=seed_set),
           "backend": "+".join(sorted({backend_of(full.denoiser(s)) for s in full.steps}))}
    folders = _folders(supernet, cache_dir)
    for folder in folders:
        images = _read(folder / _stem(key), key)
        if images is not None:
            return images
    images = generate(full, n=n, seed=seed_for(seed_set), batch_size=batch_size, cache=cache, progress=progress,
                      desc="full size")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                _write(folder / _stem(key), key, images)
                break
        except OSError as exc:  # a read-only supernet folder: try the cache directory
            log.info("cannot keep full-size samples in %s (%s)", folder, exc)
    return images
