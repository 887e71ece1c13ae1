"""Supernet checkpoints: safetensors weights + JSON metadata with a content hash, written atomically.

Layout of a supernet directory:
  supernet.safetensors     EMA weights of the supernet (the denoiser that sampling and search use)
  train_state.safetensors  online weights, optimizer state and RNG states (for --resume only)
  meta.json                format, config, step, image shape, axes, FLOPs per subnet, SHA-256 of each file
Method families may keep add-on files beside them (space.plugins): a sparse supernet's masks
(masks.safetensors, described in meta.json with their hash), exit heads, an import record. The weight
and add-on files are written first and meta.json last, so meta.json always describes whole files;
loading hands meta.json and the weights to each family's `load_addons`. Nothing here unpickles:
safetensors stores raw tensors only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save

from .backbones.base import SlimModel
from .backbones.registry import build_supernet
from .config import ExperimentConfig, config_from_dict
from .diffusion import sampling_timesteps
from .errors import DDSMError
from .io import read_json, sha256_file, write_atomic, write_json_atomic
from .space.plugins import families, family_of_field
from .space.subnet import Subnet

FORMAT = "ddsm-search/supernet"
VERSION = 2  # 2: axes and FLOPs per subnet key; version 1 (widths, FLOPs per width) still reads
WEIGHTS, TRAIN_STATE, META = "supernet.safetensors", "train_state.safetensors", "meta.json"
COSTS = ("dense", "sparse")


@dataclass
class Supernet:
    """A loaded supernet checkpoint: the model (EMA weights) and what is known about it."""

    path: Path
    config: ExperimentConfig
    model: SlimModel
    step: int
    image_shape: tuple[int, int, int]
    flops: dict[Subnet, int]  # the FLOPs table in use: `cost`'s
    sha256: str
    dataset: str
    masks: dict[str, torch.Tensor] | None = None  # a sparse supernet's, per masked layer (None: dense)
    flops_tables: dict[str, dict[Subnet, int]] = field(default_factory=dict)  # "dense", "sparse"
    cost: str = "dense"  # which table `flops` is: dense, or sparse (nonzero weights under the masks only)
    measured: dict = field(default_factory=dict)  # what families measured of steps their values change, by cost

    def __post_init__(self):
        self.flops_tables = {"dense": self.flops, "sparse": self.flops, **self.flops_tables}

    @property
    def sparse(self) -> bool:
        """Return True for a supernet trained with masks (train.sparsity)."""
        return self.masks is not None

    def with_cost(self, cost: str) -> "Supernet":
        """Return this supernet counting FLOPs as `cost` says: dense, sparse (nonzero weights only; for a
        dense supernet the same figures) or auto (sparse for a sparse supernet, else dense)."""
        if cost == "auto":
            cost = "sparse" if self.sparse else "dense"
        if cost not in COSTS:
            raise DDSMError(f"search.cost: expected auto, dense or sparse, got {cost!r}")
        return dataclasses.replace(self, flops=self.flops_tables[cost], cost=cost)

    def step_subnets(self, subnets, timesteps=None) -> list[Subnet]:
        """Return the subnet each step of a schedule runs (a multi-stage supernet: with the stage of the
        step's timestep, from `timesteps` or the uniform grid of as many steps)."""
        subnets = list(subnets)
        staged = self.model.num_stages > 1 and subnets
        if staged and timesteps is None:
            timesteps = sampling_timesteps(self.config.diffusion.timesteps, len(subnets))
        return self.model.step_subnets(subnets, timesteps if staged else None)

    def schedule_flops(self, subnets, timesteps=None) -> int:
        """Return the FLOPs per image of a schedule of subnets: the sum over its steps."""
        return sum(self.flops[s] for s in self.step_subnets(subnets, timesteps))

    def step_flops(self, step) -> int:
        """Return the FLOPs per image of one step (space.steps.Step, its subnet as the step runs it):
        what the family of a field that changes what the step runs measures (a cached step), else its
        subnet's from the table."""
        for name, value in step.extras:
            flops = family_of_field(name).step_flops(self, step.subnet, value)
            if flops is not None:
                return flops
        return self.flops[step.subnet]

    def steps_flops(self, steps, timesteps=None) -> int:
        """Return the FLOPs per image of a schedule of steps (a multi-stage supernet: each step's subnet
        with the stage of its timestep, as `step_subnets`)."""
        subnets = self.step_subnets([s.subnet for s in steps], timesteps)
        return sum(self.step_flops(s.replace(subnet)) for s, subnet in zip(steps, subnets))

    def full_schedule_flops(self, steps: int) -> int:
        """Return the FLOPs per image of full size over `steps` sampling steps."""
        return self.schedule_flops([self.model.full] * steps)

    @property
    def full_flops(self) -> int:
        """Return the FLOPs per image of one step of the full-size subnet (a multi-stage supernet's
        depends on the step's stage: see full_schedule_flops)."""
        if self.model.full not in self.flops:
            raise DDSMError("full size costs a different amount at each stage of this supernet: use "
                            "full_schedule_flops(steps)")
        return self.flops[self.model.full]


def in_memory(config: ExperimentConfig, model: SlimModel, image_shape: tuple[int, int, int] | None = None) -> Supernet:
    """Return a supernet that is not on disk (a model built or trained in Python): its FLOPs table
    measured now, no path and no hash, so no schedule file can name it."""
    from .backbones.cost import flops_table

    shape = tuple(image_shape or model.image_shape)
    return Supernet(path=Path("<in memory>"), config=config, model=model, step=0, image_shape=shape,
                    flops=flops_table(config.model, shape), sha256="", dataset="")


@dataclass
class AddonFile:
    """A file a method family keeps beside a supernet: its tensors, and what meta.json says of it given
    the file's SHA-256 (e.g. {"sparsity": {..., "masks_sha256": sha}})."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: Callable[[str], dict]


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = save(plain)  # bytes: safetensors' save_file recreates the file with mode 0600
    write_atomic(path, lambda tmp: tmp.write_bytes(blob))


def save_supernet(out_dir: str | Path, *, config: ExperimentConfig, ema: SlimModel, train_state: dict[str, torch.Tensor],
                  step: int, flops: dict[Subnet, int], dataset: str, addons: Sequence[AddonFile] = ()) -> Path:
    """Write weights, train state, add-on files and meta.json (last) into `out_dir`; return the meta.json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / WEIGHTS, ema.state_dict())
    _save_tensors(out / TRAIN_STATE, train_state)
    for addon in addons:
        _save_tensors(out / addon.name, addon.tensors)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": config.name,
        "step": step,
        "dataset": dataset,
        "image_shape": list(ema.image_shape),
        "axes": ema.space.to_json(),
        "flops_per_image": {s.key: int(f) for s, f in flops.items()},
        "weights": WEIGHTS,
        "sha256": sha256_file(out / WEIGHTS),
        "train_state": TRAIN_STATE,
        "train_state_sha256": sha256_file(out / TRAIN_STATE),
        "config": supernet_config(config.to_dict()),
    }
    for addon in addons:  # without add-ons meta.json is as it always was
        meta.update(addon.meta(sha256_file(out / addon.name)))
    meta["meta_sha256"] = meta_digest(meta)
    return write_json_atomic(out / META, meta)


def meta_digest(meta: dict) -> str:
    """Return the SHA-256 of meta.json's content (all fields but this digest, in canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def supernet_config(config: dict) -> dict:
    """Return the parts of an experiment config that define a supernet (not how it is later searched)."""
    return {k: v for k, v in config.items() if k != "search"}


def read_meta(path: str | Path) -> dict:
    """Return the parsed meta.json of a supernet directory, or raise DDSMError saying what is wrong."""
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise DDSMError(f"supernet directory not found: {path}")
    if not meta_path.is_file():
        raise DDSMError(f"{path} is not a supernet directory (no {META}; train one with 'ddsm-search train')")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise DDSMError(f"{meta_path} is not a ddsm-search supernet file")
    if meta.get("version") not in (1, VERSION):
        raise DDSMError(f"{meta_path} has format version {meta.get('version')}; this ddsm-search reads 1 and {VERSION}")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        raise DDSMError(f"{meta_path} was changed after training (its meta_sha256 does not match its content); "
                        "restore it or retrain")
    _check_meta_fields(meta, meta_path)
    return meta


_META_FIELDS = {"step": int, "dataset": str, "image_shape": list, "flops_per_image": dict,
                "sha256": str, "train_state_sha256": str, "config": dict}


def _check_meta_fields(meta: dict, meta_path: Path) -> None:
    """Raise DDSMError naming the first field of meta.json that is missing or of the wrong type.

    Files written before meta_sha256 existed are not covered by a hash, so their fields are checked here.
    """
    for key, kind in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DDSMError(f"{meta_path}: field {key!r} is missing or not a {kind.__name__}")
    shape = meta["image_shape"]
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise DDSMError(f"{meta_path}: image_shape must be three positive integers, got {shape}")


def load_verified(path: Path, expected_sha: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Return the tensors of a safetensors file beside a supernet, after checking its SHA-256."""
    if not path.is_file():
        raise DDSMError(f"missing checkpoint file: {path}")
    if sha256_file(path) != expected_sha:
        raise DDSMError(f"{path} does not match the hash in {META} (corrupt or replaced)")
    return load_file(str(path), device=device)


def load_supernet(path: str | Path, device: str = "cpu") -> Supernet:
    """Return the supernet stored in directory `path` with its EMA weights, after checking its hash."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = config_from_dict(supernet_config(meta["config"]))
    except DDSMError as exc:
        raise DDSMError(f"{path / META}: its config is not valid: {exc}") from None
    image_shape = tuple(meta["image_shape"])
    model = build_supernet(config.model, image_shape)
    state = load_verified(path / WEIGHTS, meta["sha256"], "cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise DDSMError(f"{path / WEIGHTS} does not fit the model that {META} describes (edited by hand?)") from None
    try:
        flops = flops_by_subnet(meta["flops_per_image"], model)
    except (DDSMError, TypeError, ValueError) as exc:
        raise DDSMError(f"{path / META}: {exc}") from None
    supernet = Supernet(path=path, config=config, model=model, step=int(meta["step"]), image_shape=image_shape,
                        flops=flops, sha256=meta["sha256"], dataset=meta["dataset"])
    for family in families():  # add-on files beside it (a sparse supernet's masks)
        family.load_addons(supernet, meta, state)
    supernet.model = model.to(device).eval()
    return supernet


def flops_by_subnet(stored: dict, model: SlimModel) -> dict[Subnet, int]:
    """Return meta.json's FLOPs table keyed by the supernet's subnets; raise DDSMError if it does not fit.

    Version-1 files keyed it by width ('1.0', or '0.666667' from `:g`): a bare number is a width,
    matched to the supernet's width it rounds from.
    """
    table = {}
    for key, flops in stored.items():
        try:
            subnet = model.check_subnet(float(key) if "=" not in key else key)
        except (DDSMError, ValueError) as exc:
            raise DDSMError(f"the FLOPs table names {key!r}, which is not a subnet of the supernet ({exc})") from None
        if not isinstance(flops, int) or isinstance(flops, bool):
            raise DDSMError(f"the FLOPs table's entry for {key} is not a whole number")
        table[subnet] = flops
    missing = [s.key for s in model.space if s not in table]
    if missing:
        raise DDSMError(f"the FLOPs table lacks subnets {', '.join(missing)}")
    return table


def load_train_state(path: str | Path, device: str = "cpu") -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (meta, EMA weights, train-state tensors) of a supernet directory, verifying both hashes."""
    path = Path(path)
    meta = read_meta(path)
    return (meta, load_verified(path / WEIGHTS, meta["sha256"], device),
            load_verified(path / TRAIN_STATE, meta["train_state_sha256"], device))
