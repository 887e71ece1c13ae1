"""Sparsity's plug-in points: a hook into every training step (masks applied, RigL/MagRan updates,
checkpointed with their generator), the masks as a supernet add-on file (masks.safetensors, described
in meta.json) read when a supernet loads, and a sparse FLOPs table beside the dense one (`search.cost`)."""

from __future__ import annotations

from pathlib import Path

from ...errors import DDSMError
from ...space.plugins import MethodFamily

MASKS = "masks.safetensors"


def load_masks(path, meta: dict, model, weights: dict | None = None) -> dict:
    """Return a sparse supernet's masks {layer: bool tensor}, hash-checked and checked against the model
    (and, given its EMA `weights`, that every weight the masks leave out is zero); else raise DDSMError."""
    from ...checkpoint import META, WEIGHTS, load_verified
    from .masks import check_masks, maskable_layers

    info = meta.get("sparsity")
    if not isinstance(info, dict) or not isinstance(info.get("masks_sha256"), str):
        raise DDSMError(f"{Path(path) / META}: field 'sparsity' lacks the masks' hash")
    stored = load_verified(Path(path) / MASKS, info["masks_sha256"])
    shapes = {name: tuple(layer.weight.shape) for name, layer in maskable_layers(model).items()}
    try:
        masks = check_masks(stored, shapes)
    except DDSMError as exc:
        raise DDSMError(f"{Path(path) / MASKS}: {exc}") from None
    for name, mask in masks.items():
        w = (weights or {}).get(f"{name}.weight")
        if w is not None and bool((w.masked_select(~mask) != 0).any()):
            raise DDSMError(f"{Path(path) / WEIGHTS}: layer {name} has nonzero weights outside its mask")
    return masks


class SparseTraining:
    """The training hook of a sparse supernet: a Sparsifier applied to the online and EMA weights."""

    def __init__(self, cfg, model):
        from .masks import Sparsifier

        self.cfg = cfg
        self.sparsifier = Sparsifier(cfg.train.sparsity, model, cfg.train.steps, cfg.train.seed)

    def start(self, model, ema) -> None:
        """Zero the masked weights of both models (masks drawn on the weights training starts from)."""
        self.sparsifier.apply(model, ema)

    def replaces_step(self, step: int) -> bool:
        """Return True if training step `step` (1-based) updates the masks instead of the weights (RigL)."""
        return self.sparsifier.is_update_step(step)

    def update(self, model, optimizer, step: int) -> None:
        """Drop and regrow connections (RigL's Algorithm 1), resetting the optimizer state of what changed."""
        self.sparsifier.update(model, optimizer, step)

    def before_optimizer(self, model) -> None:
        """Zero the gradients of masked weights."""
        self.sparsifier.mask_gradients(model)

    def after_step(self, model, ema) -> None:
        """Keep the masked weights exactly zero in both models."""
        self.sparsifier.apply(model, ema)

    def state_tensors(self) -> dict:
        """Return the masks' generator state and the like, for an exact resume."""
        return self.sparsifier.state_tensors()

    def restore(self, out_dir, meta: dict, model, tensors: dict) -> None:
        """Take back the masks and their generator from the checkpoint in `out_dir`."""
        from .masks import MASK_PREFIX

        if "sparsity" not in meta:
            raise DDSMError(f"--resume: the checkpoint in {out_dir} has no masks (trained dense)")
        masks = {MASK_PREFIX + name: mask for name, mask in load_masks(out_dir, meta, model).items()}
        self.sparsifier.restore(masks, tensors)

    def addons(self, image_shape) -> list:
        """Return the masks file for the checkpoint, with its densities and the sparse FLOPs table (the
        masks move under RigL and MagRan: their FLOPs are counted anew)."""
        from ...backbones.cost import flops_tables
        from ...checkpoint import AddonFile

        sparse = self.sparsifier
        table = flops_tables(self.cfg.model, image_shape, sparse.masks)[1]
        summary = sparse.summary()

        def meta(sha256: str) -> dict:
            return {"sparsity": {**summary, "masks": MASKS, "masks_sha256": sha256},
                    "sparse_flops_per_image": {s.key: int(f) for s, f in table.items()}}

        return [AddonFile(MASKS, sparse.mask_tensors(), meta)]


class Sparsity(MethodFamily):
    """Sparse-to-sparse supernet training (Static, RigL, MagRan masks)."""

    name = "sparsity"
    summary = "sparse-to-sparse training: Static, RigL or MagRan masks on every layer, sparse FLOPs counted apart"
    addons = (MASKS,)

    def load_addons(self, supernet, meta: dict, weights: dict) -> None:
        if "sparsity" not in meta:
            return
        from ...checkpoint import META, flops_by_subnet

        try:
            if not isinstance(meta.get("sparse_flops_per_image"), dict):
                raise DDSMError("field 'sparse_flops_per_image' is missing or not an object")
            sparse = flops_by_subnet(meta["sparse_flops_per_image"], supernet.model)
        except (DDSMError, TypeError, ValueError) as exc:
            raise DDSMError(f"{Path(supernet.path) / META}: {exc}") from None
        supernet.masks = load_masks(supernet.path, meta, supernet.model, weights)
        supernet.flops_tables["sparse"] = sparse

    def training_hook(self, cfg, model):
        return SparseTraining(cfg, model) if cfg.train.sparsity is not None else None
