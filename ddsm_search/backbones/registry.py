"""The backbone registry: `model.kind` -> its config section's class and the supernet class that builds it.

One table for both (as timm's `_registry.py`): the config reader asks it which dataclass a `model`
section is, `build_supernet` which class builds it. It is a leaf: the classes are named by their
module and attribute and imported on first use, so reading a config or listing the backbones imports
no model (nor torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from ..errors import DDSMError


@dataclass(frozen=True)
class Backbone:
    """A registered `model.kind`: where its config class and its supernet class live, and one line on it."""

    kind: str
    config: str  # "module:Class" of its config section's dataclass
    model: str  # "module:Class" of its supernet (a backbones.base.SlimModel)
    summary: str


_REGISTRY: dict[str, Backbone] = {}


def register(kind: str, config: str, model: str, summary: str = "") -> None:
    """Register a backbone under `model.kind` (its classes as "module:Class"; a later call replaces it)."""
    _REGISTRY[kind] = Backbone(kind, config, model, summary)


register("unet", "ddsm_search.config.schema:UNetConfig", "ddsm_search.backbones.unet:SlimUNet",
         "a slimmable U-Net: its width (channels per block)")
register("dit", "ddsm_search.config.schema:DiTConfig", "ddsm_search.backbones.dit:SlimDiT",
         "a slimmable DiT: its width (heads and MLP channels) and depth (blocks run)")
register("multistage", "ddsm_search.config.schema:MultiStageConfig", "ddsm_search.backbones.multistage:SlimMultiStageUNet",
         "a multi-stage U-Net: one shared encoder, one slimmable decoder per timestep stage")


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


def list_backbones() -> list[str]:
    """Return the registered `model.kind` names, in registration order."""
    return list(_REGISTRY)


def backbone(kind: str) -> Backbone:
    """Return the registry entry of `kind`, or raise DDSMError naming the known ones."""
    if kind not in _REGISTRY:
        raise DDSMError(f"model.kind: unknown backbone {kind!r} (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[kind]


def config_class(kind: str) -> type:
    """Return the dataclass of a `model` section of this kind."""
    return _load(backbone(kind).config)


def build_supernet(cfg, image_shape: tuple[int, int, int]):
    """Return the supernet (a SlimModel) that model config `cfg` describes for images of `image_shape` (C, H, W)."""
    return _load(backbone(cfg.kind).model)(cfg, tuple(image_shape))
