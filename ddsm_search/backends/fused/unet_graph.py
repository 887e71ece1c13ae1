"""The U-Net as one fused-kernel program, and the denoiser that runs a static U-Net on it.

`unet_to_graph` translates a U-Net (its current width: a static subnet or a slim supernet) layer by
layer into the kernel's graph, as `UNet.forward` runs it: each ResBlock's concatenated input, its
GroupNorms with their scale/shift and SiLU, and its residual branch are folded into its two
convolutions. `FusedDenoiser` wraps a network and runs it as that program wherever the kernel can,
and on torch's layers elsewhere (autograd on, not float32 on the CPU, shapes the kernel cannot run).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ...backbones.unet import AttnBlock, Downsample, ResBlock, Upsample
from . import available
from .graph import Graph, Program, Slot, Unsupported


def untranslatable(net) -> str | None:
    """Return why the kernel cannot run this U-Net's kind of network at all, or None if it may.

    The options of an imported diffusers model that it translates: a fixed GroupNorm group count and
    the norms' eps (read from each layer), SiLU on the time embedding and the timestep features (both in
    `UNet.time_embedding`, which feeds the kernel), a fixed number of heads, centred inputs. The others
    change the arithmetic of its fused layers and keep torch's layers."""
    cfg = net.cfg
    if cfg.time_conditioning != "scale_shift":
        return f"{cfg.time_conditioning} time conditioning (the kernel applies scale/shift after the norm)"
    if cfg.mid_attention and not cfg.mid_attn_norm:
        return "an attention layer without GroupNorm"
    if cfg.mid_scale != 1.0:
        return "a scaled middle block (mid_scale)"
    if cfg.downsample_padding != 1:
        return "downsampling padded on the right and bottom only"
    return None


def _resblock(g: Graph, block, x: Slot, x2: Slot | None = None) -> Slot:
    h = g.conv(block.conv1, x, x2, norm=block.norm1)
    mod = g.mod(block.emb)
    if isinstance(block.skip, nn.Identity):
        return g.conv(block.conv2, h, norm=block.norm2, mod=mod, res=x)
    return g.conv(block.conv2, h, norm=block.norm2, mod=mod, skip=block.skip, skip_in=(x, x2))


def _attention(g: Graph, block, x: Slot) -> Slot:
    qkv = g.conv(block.qkv, x, norm=block.norm, act=False)
    return g.conv(block.proj, g.attention(qkv, block.head_size(qkv.channels // 3)), res=x)


def _block(g: Graph, block, x: Slot, x2: Slot | None = None) -> Slot:
    if isinstance(block, ResBlock):
        return _resblock(g, block, x, x2)
    if isinstance(block, AttnBlock):
        return _attention(g, block, x)
    if isinstance(block, Downsample):
        return g.conv(block.conv, x)
    if isinstance(block, Upsample):
        return g.conv(block.conv, x, upsample=True)
    raise Unsupported(f"no fused form of {type(block).__name__}")


def _stage(g: Graph, stage: nn.Module, h: Slot, skip: Slot | None = None) -> Slot:
    if isinstance(stage, nn.ModuleList):
        h = _block(g, stage[0], h, skip)  # the first block concatenates the skip
        for block in stage[1:]:
            h = _block(g, block, h)
        return h
    return _block(g, stage, h)


def unet_to_graph(net, height: int, width: int) -> Program:
    """Return the U-Net at its current width as one program for (C, height, width) images; raise
    Unsupported if the kernel cannot run one of its layers."""
    why = untranslatable(net)
    if why is not None:
        raise Unsupported(why)
    g = Graph()
    h = g.conv(net.conv_in, g.input(net.image_shape[0], height, width))
    hs = [h]
    for stage in net.down:
        h = _stage(g, stage, h)
        hs.append(h)
    for block in net.mid:
        h = _block(g, block, h)
    for stage in net.up:
        h = _block(g, stage, h) if isinstance(stage, Upsample) else _stage(g, stage, h, hs.pop())
    return g.compile(g.conv(net.conv_out, h, norm=net.norm_out, pad_out=True), net.image_shape[0])


# per network: its layers' parameter dicts and its programs; outside the modules, so that copying or
# pickling a network never meets ctypes
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_program(net, x: torch.Tensor) -> Program | None:
    """Return the program that runs `net` on `x`, or None where torch's layers must: autograd on, not
    float32 on the CPU, dropout active, or the kernel unavailable or unable.

    Programs are cached per input size, width and weights: each parameter's identity, storage and
    version counter, read through the layers found at the first call (walking the module tree on every
    call cost more than the whole forward of a small batch). So an optimizer step, load_state_dict or
    .to() is seen; replacing a whole layer afterwards is not, nor an in-place change to weights created
    under torch.inference_mode() (they have no version counter)."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4
            or net.training and net.cfg.dropout > 0 or not available()):
        return None
    entry = _PROGRAMS.get(net)
    if entry is None:
        entry = _PROGRAMS[net] = ([m._parameters for m in net.modules() if m._parameters], {})
    layers, cache = entry
    key = (x.shape[2], x.shape[3], getattr(net, "subnet", None),
           *[(id(p), p.data_ptr(), -1 if p.is_inference() else p._version)
             for params in layers for p in params.values() if p is not None])
    if key not in cache:
        if len(cache) >= 4:  # other sizes, widths or weights
            cache.clear()
        try:
            cache[key] = unet_to_graph(net, x.shape[2], x.shape[3])
        except Unsupported:
            cache[key] = None
    return cache[key]


class FusedDenoiser:
    """A U-Net denoiser run by the fused CPU kernel where it can, by torch's layers elsewhere."""

    backend = "fused"

    def __init__(self, net):
        self.net = net

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the predicted noise, as `net(x, t)` does."""
        net = self.net
        t = torch.as_tensor(t, device=x.device)
        program = fused_program(net, x)
        if program is None:
            return net(x, t)
        if net.cfg.center_input:
            x = 2 * x - 1.0
        # one timestep for the batch: its scale/shift rows are kept per timestep
        return program.run(x, lambda: net.time_embedding(t, x.dtype), emb_key=t.item() if t.numel() == 1 else None)

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Return whether a batch like `x` would run on the kernel (not on torch's fallback)."""
        with torch.inference_mode():
            return fused_program(self.net, x) is not None
