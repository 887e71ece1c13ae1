"""The slimmable U-Net supernet (DDPM-style, scale/shift time conditioning) and its static subnets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..errors import DDSMError
from ..subnet import Subnet, SubnetSpace
from . import register
from .base import SlimModel
from .slim import Channels, SlimKit, StaticKit


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Return sinusoidal embeddings (N, dim) of timesteps t (N,) or () -> (1, dim)."""
    t = t.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, conv, time scale/shift, conv; input may be a concatenation."""

    def __init__(self, kit, in_ch: Channels, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = kit.norm(in_ch)
        self.conv1 = kit.conv(in_ch, out_ch, 3, padding=1)
        self.emb = kit.linear(emb_ch, (out_ch, out_ch))  # [scale, shift], sliced per segment
        self.norm2 = kit.norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = kit.conv(out_ch, out_ch, 3, padding=1)
        in_total = in_ch if isinstance(in_ch, int) else sum(in_ch)
        needs_skip = not isinstance(in_ch, int) and len(in_ch) > 1 or in_total != out_ch
        self.skip = kit.conv(in_ch, out_ch, 1) if needs_skip else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Without autograd the activations are overwritten in place: these memory-bound passes shrink
        # only linearly with width, so each one saved brings a slim subnet's time closer to its FLOPs.
        # The same arithmetic in the same order either way, so both paths give bit-identical results.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h).mul_(1 + scale).add_(shift) if inplace else self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        return h.add_(self.skip(x)) if inplace else self.skip(x) + h  # never add into x: it may be a skip



class AttnBlock(nn.Module):
    """Self-attention with a fixed head dimension, so heads = active channels // head_dim."""

    def __init__(self, kit, channels: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.norm = kit.norm(channels)
        self.qkv = kit.conv(channels, (channels, channels, channels), 1)  # fused, sliced per segment
        self.proj = kit.conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads = c // self.head_dim
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, heads, self.head_dim, hgt * wid).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))



class Downsample(nn.Module):
    """Halve the resolution with a stride-2 convolution."""

    def __init__(self, kit, channels: int):
        super().__init__()
        self.conv = kit.conv(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)



class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a convolution."""

    def __init__(self, kit, channels: int):
        super().__init__()
        self.conv = kit.conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))



def check_image_shape(cfg: UNetConfig, image_shape: tuple[int, int, int]) -> None:
    """Raise DDSMError unless every level of the U-Net can halve the images exactly."""
    _, height, width = image_shape
    halvings = len(cfg.channel_mults) - 1
    if height % 2**halvings or width % 2**halvings:
        raise DDSMError(f"model.channel_mults: {len(cfg.channel_mults)} levels halve the {height}x{width} images "
                        f"{halvings} times; the image size must be a multiple of {2**halvings}")


class UNet(nn.Module):
    """A U-Net epsilon-predictor on torch's layers; its layers come from `kit` (slimmable, or static at
    one width). The fused CPU kernel runs it as a backend (`backends.fused.unet_graph`)."""

    def __init__(self, cfg: UNetConfig, image_shape: tuple[int, int, int], kit):
        """Build the network; 4-D weights and activations use channels-last, which ran 15-25% faster
        than NCHW for these small convolutions with oneDNN on CPU."""
        check_image_shape(cfg, image_shape)
        super().__init__()
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        img_ch, res, _ = image_shape
        base = cfg.base_channels
        self.emb_in = base  # sinusoidal embedding size: an input, not slimmed
        emb_ch = 4 * base
        self.time_mlp = nn.Sequential(kit.linear(base, emb_ch, slim_in=False), nn.SiLU(), kit.linear(emb_ch, emb_ch))
        self.conv_in = kit.conv(img_ch, base, 3, padding=1, slim_in=False)

        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._stage(kit, ch, base * mult, emb_ch, res))
                ch = base * mult
                skips.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(Downsample(kit, ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(kit, ch, ch, emb_ch, cfg.dropout), AttnBlock(kit, ch, cfg.head_dim),
                                  ResBlock(kit, ch, ch, emb_ch, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(self._stage(kit, (ch, skips.pop()), base * mult, emb_ch, res))
                ch = base * mult
            if level != 0:
                self.up.append(Upsample(kit, ch))
                res *= 2
        self.norm_out = kit.norm(ch)
        self.conv_out = kit.conv(ch, img_ch, 3, padding=1, slim_out=False)
        self.to(memory_format=torch.channels_last)

    def _stage(self, kit, in_ch: Channels, out_ch: int, emb_ch: int, res: int) -> nn.Module:
        blocks = [ResBlock(kit, in_ch, out_ch, emb_ch, self.cfg.dropout)]
        if res in self.cfg.attention_resolutions:
            blocks.append(AttnBlock(kit, out_ch, self.cfg.head_dim))
        return nn.ModuleList(blocks)

    @staticmethod
    def _run(stage: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(stage, nn.ModuleList):
            for block in stage:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            return h
        return stage(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return predicted noise for images x (B, C, H, W) at timesteps t: (B,) or a scalar for all."""
        t = torch.as_tensor(t, device=x.device)
        emb = self.time_mlp(timestep_embedding(t, self.emb_in).to(x.dtype))
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        for stage in self.up:
            if isinstance(stage, Upsample):
                h = stage(h)
            else:
                h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


@register("unet")
class SlimUNet(UNet, SlimModel):
    """The supernet: one set of weights, a working denoiser at every width in `cfg.widths`."""

    def __init__(self, cfg: UNetConfig, image_shape: tuple[int, int, int]):
        super().__init__(cfg, image_shape, SlimKit(cfg.group_size))
        self.space = SubnetSpace.of(cfg.axes())
        self.subnet = self.space.full
        for block in self.modules():
            if isinstance(block, AttnBlock):
                for w in self.space.choices("width"):
                    c = block.proj.active_out(w)[0]
                    if c % cfg.head_dim:
                        raise DDSMError(f"model.head_dim: {cfg.head_dim} does not divide the {c} channels of an "
                                        f"attention layer at width {w!r}")

    def apply_subnet(self, subnet: Subnet) -> None:
        """Make every slimmable layer run at the subnet's width."""
        self.set_width(subnet["width"])

    def export(self, subnet) -> UNet:
        """Return a plain static U-Net (torch layers only) equal to the supernet at `subnet`."""
        width = self.check_subnet(subnet)["width"]
        static = self.load_into(UNet(self.cfg, self.image_shape, StaticKit(self.cfg.group_size, width)), width)
        return static.to(memory_format=torch.channels_last)
