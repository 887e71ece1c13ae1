"""Slimmable supernets, one module per `model.kind` (unet, dit, multistage), built by `registry`."""

from .registry import build_supernet, list_backbones

__all__ = ["build_supernet", "list_backbones"]
