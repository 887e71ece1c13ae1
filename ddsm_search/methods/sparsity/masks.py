"""Sparse-to-sparse supernet training (arXiv 2504.21380): Static, RigL and MagRan masks (`train.sparsity`).

Every convolution and linear layer of the supernet but the first (the one reading the images) and the
last (the one writing the noise prediction) carries an unstructured mask over its full-size weight, as
in Evci et al.'s RigL. Masked weights are kept exactly zero, in the online weights and in the EMA
weights, so a slimmable layer that slices the leading channels of its weight at forward time runs
the slice of the mask with no change to any layer, and an exported static subnet holds the zeros of
its slice: a width's subnet uses its slice of the mask by construction.

- static (Static-DM): a random mask drawn at the start, never changed.
- rigl (RigL-DM, Evci et al. 2020, Algorithm 1): every `update_every` steps while the step is before
  `stop_at` of training, each layer drops the fraction f(t) = drop_fraction / 2 (1 + cos(pi t / T_end))
  of its active weights with the smallest magnitude and regrows as many inactive weights (those just
  dropped included, as in RigL) where the magnitude of the step's dense gradient is largest; newly
  grown weights start at zero. As in Algorithm 1, a mask-update step updates the connections instead
  of taking an optimizer step.
- magran (MagRan-DM): the same schedule and drop; regrowth uniformly at random among the inactive.

Per-layer densities: `uniform` (every layer at `density`) or `erk` (Erdos-Renyi-Kernel: density of a
layer proportional to (n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w), layers that would exceed 1
kept dense, as in RigL's code), so that the kept share over all masked layers is `density`.

Where this departs from the papers, and why:
- The supernet's loss is the sandwich rule's sum over subnets, so RigL's "dense gradient" is the
  gradient of that sum (a weight outside a narrow subnet's slice is scored by the subnets that use it).
- A layer without a gradient at an update step (a multi-stage U-Net's decoders of the stages this
  batch did not train) keeps its mask under RigL (nothing scores its regrowth); MagRan still updates it.
- The optimizer (AdamW) state of every weight whose mask changed is reset to zero (the paper resets it
  for regrown weights; resetting dropped ones too keeps a dropped weight from moving on stale momentum).
- Masks are per layer over the full-size weight, so a narrow subnet's slice may be denser or sparser
  than `density` (RigL tends to regrow into the leading channels every subnet trains): the FLOPs table
  counts each subnet's own nonzero weights (`backbones.cost.flops_tables`).
- Masks are drawn from a generator of their own (seeded from train.seed), checkpointed like training's,
  so a sparse run sees the same batches, timesteps and noise as the dense run of the same seed.
- T_end is `stop_at` of train.steps: a run resumed after an interruption continues bit-exactly, but a
  run resumed with a larger --train-steps target follows the schedule of the new target from there on.

Library: torch.ao.pruning was read and not used. Its BaseSparsifier attaches a FakeSparsity
parametrization, so every layer's parameter becomes `parametrizations.weight.original` (our
checkpoints, strict loaders and static export read `weight`), each access of `weight` multiplies the
whole full-size tensor before a slim layer slices it (full-size work for a narrow subnet), the EMA copy
would carry a second set of masks to keep in step, and it has no regrowth, no drop schedule and no ERK
(its sparsifiers prune by norm only): what it would give is a mask buffer. rigl-torch (2020, unmaintained)
draws from torch's global generator (no exact resume), has no MagRan and hooks the optimizer step. So
this short module is written by hand; it touches no layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import SparsityConfig
from ...errors import DDSMError

# The first and the last layer of each backbone stay dense (as RigL's): a layer is matched by its name or
# the end of its name (a multi-stage U-Net's encoder.conv_in and every decoders.K.conv_out)
DENSE_LAYERS = ("conv_in", "conv_out", "patch_embed", "final_layer.linear")
SEED_OFFSET = 0x5EED  # the masks' generator: train.seed + this, a stream apart from the batches'
MASK_PREFIX = "mask."


def _dense(name: str) -> bool:
    return any(name == d or name.endswith("." + d) for d in DENSE_LAYERS)


def maskable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Return {name: layer} for every convolution and linear layer of `model` that carries a mask (all
    but the first and the last), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not _dense(name)}


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, float]:
    """Return each layer's density for weights of `shapes` so that the kept share over all is `density`:
    the same everywhere (uniform) or Erdos-Renyi-Kernel (erk, layers that would exceed 1 made dense)."""
    if distribution == "uniform":
        return {name: density for name in shapes}
    if distribution != "erk":
        raise DDSMError(f"train.sparsity.distribution: expected uniform or erk, got {distribution!r}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}  # (n_out + n_in + k_h + k_w) / (n_out n_in k_h k_w)
    total, dense = sum(numel.values()), set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            break
        eps = (density * total - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1]
        if not over:
            break
        dense.add(max(over, key=raw.__getitem__))  # the layer with the largest ERK share first, as RigL's code
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def random_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """Return a bool mask of `shape` with exactly round(density * size) entries set (at least one),
    drawn uniformly from `generator`."""
    n = math.prod(shape)
    keep = min(n, max(1, int(round(density * n))))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:keep]] = True
    return flat.view(shape)


def _weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in names}


class Sparsifier:
    """The masks of one sparse training run, the generator they are drawn from, and how they change."""

    def __init__(self, cfg: SparsityConfig, model: nn.Module, total_steps: int, seed: int):
        """Draw the initial random masks for `model`'s maskable layers (not yet applied: see `apply`)."""
        self.cfg, self.total_steps = cfg, total_steps
        self.names = list(maskable_layers(model))
        if not self.names:
            raise DDSMError("train.sparsity: this model has no convolution or linear layer besides its first and last")
        self.generator = torch.Generator().manual_seed(seed + SEED_OFFSET)
        shapes = {name: tuple(w.shape) for name, w in _weights(model, self.names).items()}
        densities = layer_densities(shapes, cfg.density, cfg.distribution)
        self.masks = {name: random_mask(shapes[name], densities[name], self.generator) for name in self.names}

    # --- applying the masks -----------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, *models: nn.Module) -> None:
        """Zero every masked weight of `models` (the online network, its EMA copy)."""
        for model in models:
            for name, w in _weights(model, self.names).items():
                w.mul_(self.masks[name].to(w.device))

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        """Zero the gradient of every masked weight, so the optimizer moves active weights only."""
        for name, w in _weights(model, self.names).items():
            if w.grad is not None:
                w.grad.mul_(self.masks[name].to(w.grad.device))

    # --- the update schedule ----------------------------------------------------------------------
    @property
    def stop_step(self) -> float:
        """Return T_end: the step from which the masks stay fixed."""
        return self.cfg.stop_at * self.total_steps

    def is_update_step(self, step: int) -> bool:
        """Return True if training step `step` (1-based: the step being taken) updates the masks."""
        return (self.cfg.method != "static" and step > 0 and step % self.cfg.update_every == 0
                and step < self.stop_step)

    def drop_fraction(self, step: int) -> float:
        """Return RigL's cosine-decayed drop fraction at `step`: alpha / 2 (1 + cos(pi step / T_end))."""
        return self.cfg.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.stop_step))

    @torch.no_grad()
    def update(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, int]:
        """Drop and regrow in every layer (RigL: by the gradients now in `model`; MagRan: at random), zero
        the weights the new masks leave out, reset the optimizer state of every weight whose mask changed;
        return {layer: weights regrown}."""
        fraction, changed = self.drop_fraction(step), {}
        for name, w in _weights(model, self.names).items():
            if self.cfg.method == "rigl" and w.grad is None:
                continue  # not trained this step: nothing scores its regrowth
            old = self.masks[name]
            n = int(round(fraction * int(old.sum())))
            if n == 0:
                continue
            flat = old.reshape(-1)  # logical order (a channels-last weight's too), so indices match across tensors
            magnitude = w.detach().abs().reshape(-1).float().cpu()
            drop = torch.sort(magnitude.masked_fill(~flat, math.inf), stable=True).indices[:n]
            kept = flat.clone()
            kept[drop] = False
            if self.cfg.method == "rigl":
                score = w.grad.detach().abs().reshape(-1).float().cpu()
            else:
                score = torch.rand(flat.numel(), generator=self.generator)
            grow = torch.sort(score.masked_fill(kept, -math.inf), descending=True, stable=True).indices[:n]
            new = kept.clone()
            new[grow] = True
            new = new.view(old.shape)
            self.masks[name] = new
            moved = (new ^ old).to(w.device)
            w.masked_fill_(~new.to(w.device), 0.0)
            w.masked_fill_((new & ~old).to(w.device), 0.0)  # regrown weights start at zero (RigL)
            for value in optimizer.state.get(w, {}).values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    value.masked_fill_(moved, 0.0)
            changed[name] = int((new & ~old).sum())
        return changed

    # --- checkpointing ----------------------------------------------------------------------------
    def mask_tensors(self) -> dict[str, torch.Tensor]:
        """Return the masks as named tensors (bool, one per layer) for the checkpoint's masks file."""
        return {MASK_PREFIX + name: mask for name, mask in self.masks.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return what resuming needs besides the masks: the generator's state."""
        return {"rng.sparsity": self.generator.get_state()}

    def restore(self, masks: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Take the masks and generator state of a checkpoint (checked against this model's layers)."""
        self.masks = check_masks(masks, {n: m.shape for n, m in self.masks.items()})
        if "rng.sparsity" not in tensors:
            raise DDSMError("--resume: the checkpoint's train state has no sparsity generator (trained dense?)")
        self.generator.set_state(tensors["rng.sparsity"])

    def summary(self) -> dict:
        """Return the kept share per layer and over all masked layers (what meta.json records)."""
        return density_summary(self.masks)


def check_masks(stored: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Return {layer: mask} from a masks file's tensors, or raise DDSMError naming what does not fit."""
    masks = {k[len(MASK_PREFIX):]: v for k, v in stored.items() if k.startswith(MASK_PREFIX)}
    missing, extra = sorted(set(shapes) - set(masks)), sorted(set(masks) - set(shapes))
    if missing or extra or len(masks) != len(stored):
        raise DDSMError(f"the masks do not fit the model (missing {missing[:3]}, unknown {extra[:3]})")
    for name, mask in masks.items():
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shapes[name]):
            raise DDSMError(f"the mask of {name} is not a bool tensor of the weight's shape {list(shapes[name])}")
    return masks


def density_summary(masks: dict[str, torch.Tensor]) -> dict:
    """Return {"layers": {layer: kept share}, "total": kept share over all masked weights}."""
    kept = sum(int(m.sum()) for m in masks.values())
    size = sum(m.numel() for m in masks.values())
    return {"layers": {n: round(int(m.sum()) / m.numel(), 6) for n, m in masks.items()},
            "total": round(kept / size, 6) if size else 1.0}
