"""FLOPs measured with torch's FlopCounterMode on meta tensors (no memory, no compute)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from ..subnet import Subnet


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
    from . import build_supernet

    with torch.device("meta"):
        net = build_supernet(cfg, image_shape)
        x = torch.empty(1, *image_shape)
        t = torch.zeros(1)
    table = {}
    for subnet in net.space:
        net.set_subnet(subnet)
        table[subnet] = count_flops(net, x, t)
    net.set_subnet(net.full)
    return table
