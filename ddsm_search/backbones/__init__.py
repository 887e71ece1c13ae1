"""The backbone registry: `model.kind` -> the supernet class that builds it.

One place builds a model from its config (as timm's `create_model`): no stage constructs a backbone
class directly. Each backbone declares its axes (its config's `axes()`) and implements `SlimModel`.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import DDSMError
from .base import SlimModel

BACKBONES: dict[str, type] = {}


def register(kind: str):
    """Return a class decorator that registers a supernet class under `model.kind`."""
    def decorate(cls):
        BACKBONES[kind] = cls
        return cls
    return decorate


def _load_all() -> None:
    from . import dit, multistage, unet  # noqa: F401  (importing registers them)


def build_supernet(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> SlimModel:
    """Return the supernet that `cfg` describes for images of `image_shape` (C, H, W)."""
    _load_all()
    if cfg.kind not in BACKBONES:
        raise DDSMError(f"model.kind: unknown backbone {cfg.kind!r} (known: {', '.join(sorted(BACKBONES))})")
    return BACKBONES[cfg.kind](cfg, tuple(image_shape))


__all__ = ["BACKBONES", "SlimModel", "build_supernet", "register"]
