"""FLOPs measured with torch's FlopCounterMode on meta tensors (no memory, no compute), dense and, for a
sparse supernet, counting only the nonzero weights under its masks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..space.subnet import Subnet
from .slim import _Slim, slice_segments

if TYPE_CHECKING:  # annotations only: a backbone reads its section's fields
    from ..config import ModelConfig


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Return the FLOPs (multiply-add = 2) of one forward pass of `module` on `inputs`."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def flops_table(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> dict[Subnet, int]:
    """Return FLOPs per image of the supernet at each of its subnets, measured on the meta device.

    Meta tensors carry shapes only, so this costs no memory even for large models, and on meta the
    attention kernel is counted (the CPU fused kernel is not registered with the flop counter).
    """
    return flops_tables(cfg, image_shape)[0]


def active_slice(layer: nn.Module, full: torch.Tensor) -> torch.Tensor:
    """Return the part of a tensor shaped like `layer`'s full weight (its mask) that the layer's active
    subnet uses: a slimmable layer's slice of its active channels (as `sliced_weight`), a plain layer's all."""
    if not isinstance(layer, _Slim):
        return full
    part = slice_segments(full, 0, layer.out_segments, layer.active_out())
    return slice_segments(part, 1, layer.in_segments, layer.active_in()) if full.dim() > 1 else part


def flops_tables(cfg: ModelConfig, image_shape: tuple[int, int, int],
                 masks: dict[str, torch.Tensor] | None = None) -> tuple[dict[Subnet, int], dict[Subnet, int]]:
    """Return (dense, sparse) FLOPs per image at each subnet: sparse counts, in each masked layer, only
    the multiply-adds of the nonzero weights of the slice the subnet runs (without `masks`: the same as
    dense).

    One general path for every axis: a hook on each masked layer records, per call, the positions it
    ran at (output elements per output channel) and the zeros of its active slice of the mask, so
    blocks a depth skips or decoders of other stages, never called, cost nothing; the zeros' FLOPs,
    2 x positions x zeros (as the flop counter's convolution and matmul formulas), come off the dense
    figure.
    """
    net, x, t = _meta_supernet(cfg, image_shape)
    dense, sparse = {}, {}
    with _masked_zeros(net, masks) as saved:
        for subnet in net.space:
            net.set_subnet(subnet)
            saved[0] = 0
            dense[subnet] = count_flops(net, x, t)
            sparse[subnet] = dense[subnet] - saved[0]
    net.set_subnet(net.full)
    return dense, sparse


def cached_step_flops(cfg: ModelConfig, image_shape: tuple[int, int, int], subnet: Subnet, branch: int,
                      masks: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """Return (dense, sparse) FLOPs per image of a cached step of `subnet` at `branch` (the backbone's
    `deep_forward` from a recorded feature: methods/caching), measured on the meta device as the table is."""
    net, x, t = _meta_supernet(cfg, image_shape)
    net.set_subnet(subnet)
    with torch.no_grad():
        _, kept = net.deep_forward(x, t, record=(branch,))
    counter = FlopCounterMode(display=False)
    with _masked_zeros(net, masks) as saved, counter, torch.no_grad():
        net.deep_forward(x, t, branch=branch, feature=kept[branch])
    dense = int(counter.get_total_flops())
    return dense, dense - saved[0]


def _meta_supernet(cfg: ModelConfig, image_shape: tuple[int, int, int]):
    """Return (the supernet, one image, one timestep) on the meta device: shapes only, no memory."""
    from .registry import build_supernet

    with torch.device("meta"):
        return build_supernet(cfg, image_shape), torch.empty(1, *image_shape), torch.zeros(1)


@contextmanager
def _masked_zeros(net: nn.Module, masks: dict[str, torch.Tensor] | None):
    """Count, while active, the FLOPs of the zeros of `masks` in the calls of the masked layers of `net`:
    yields a one-element list that the hooks add to."""
    modules = dict(net.named_modules())
    saved = [0]

    def hook(name: str):
        def record(layer, _inputs, output):
            keep = active_slice(layer, masks[name])
            channels = output.shape[1] if isinstance(layer, nn.Conv2d) else output.shape[-1]
            saved[0] += 2 * (output.numel() // channels) * (keep.numel() - int(keep.sum()))
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in (masks or {})]
    try:
        yield saved
    finally:
        for handle in handles:
            handle.remove()
