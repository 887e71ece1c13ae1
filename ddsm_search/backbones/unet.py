"""The slimmable U-Net supernet (DDPM-style, scale/shift time conditioning) and its static subnets.

Besides its own design the network takes the options of a diffusers UNet2DModel of the DDPM/ADM family
(`UNetConfig`'s second group of fields; `ddsm_search.imports` maps such a model onto it): additive time
conditioning, SiLU on the embedding, a fixed GroupNorm group count at full width, one head per attention
layer, attention at other levels in the decoder than in the encoder, a middle block without attention
or its norm, a scaled middle block, right/bottom-padded downsampling and centred inputs. Their defaults
leave the network exactly as it was: the same parameters, bit-identical outputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DDSMError
from ..space.subnet import Subnet, SubnetSpace
from .base import SlimModel
from .slim import Channels, SlimGroupNorm, SlimKit, StaticKit

if TYPE_CHECKING:  # annotations only: a backbone reads its section's fields
    from ..config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Return sinusoidal embeddings (N, dim) of timesteps t (N,) or () -> (1, dim): [cos, sin], or [sin,
    cos] without `flip_sin_to_cos`; frequencies as diffusers' get_timestep_embedding (`freq_shift` is its
    downscale_freq_shift), in the same order of operations."""
    t = t.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift if freq_shift else half))
    args = t[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1)


class ResBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, conv, time scale/shift, conv; input may be a concatenation.

    With `additive` the time projection is added before the second norm (diffusers' "default"); the
    output is divided by `out_scale` (diffusers' output_scale_factor) where that is not 1."""

    def __init__(self, kit, in_ch: Channels, out_ch: int, emb_ch: int, dropout: float, additive: bool = False,
                 out_scale: float = 1.0):
        super().__init__()
        self.additive, self.out_scale = additive, out_scale
        self.norm1 = kit.norm(in_ch)
        self.conv1 = kit.conv(in_ch, out_ch, 3, padding=1)
        # [scale, shift], sliced per segment (additive: one shift)
        self.emb = kit.linear(emb_ch, out_ch if additive else (out_ch, out_ch))
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
        if self.additive:
            shift = self.emb(emb)[:, :, None, None]
            h = self.norm2(h.add_(shift) if inplace else h + shift)
        else:
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h).mul_(1 + scale).add_(shift) if inplace else self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        h = h.add_(self.skip(x)) if inplace else self.skip(x) + h  # never add into x: it may be a skip
        if self.out_scale != 1.0:
            h = h.div_(self.out_scale) if inplace else h / self.out_scale
        return h



class AttnBlock(nn.Module):
    """Self-attention with a fixed head dimension, so heads = active channels // head_dim; or, with
    `heads`, a fixed number of heads whose dimension shrinks with the width (each head is then its own
    segment of q, k and v, sliced on its own). Without `norm` it has no GroupNorm; its output is divided
    by `out_scale` where that is not 1."""

    def __init__(self, kit, channels: int, head_dim: int, heads: int | None = None, norm: bool = True,
                 out_scale: float = 1.0):
        super().__init__()
        self.head_dim, self.heads, self.out_scale = head_dim, heads, out_scale
        self.norm = kit.norm(channels) if norm else nn.Identity()
        per_head = (channels,) if heads is None else (channels // heads,) * heads
        self.qkv = kit.conv(channels, per_head * 3, 1)  # fused, sliced per segment
        self.proj = kit.conv(channels if heads is None else per_head, channels, 1)

    def head_size(self, inner: int) -> int:
        """Return the head dimension when q (and k, v) have `inner` active channels."""
        return self.head_dim if self.heads is None else inner // self.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x))
        inner = qkv.shape[1] // 3
        head_dim = self.head_size(inner)
        q, k, v = qkv.reshape(b, 3, inner // head_dim, head_dim, hgt * wid).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = x + self.proj(out.transpose(-1, -2).reshape(b, inner, hgt, wid))
        return out if self.out_scale == 1.0 else out / self.out_scale



class Downsample(nn.Module):
    """Halve the resolution with a stride-2 convolution (padding 1, or with `padding` 0 a zero row and
    column added at the bottom and right only, as diffusers' downsample_padding=0)."""

    def __init__(self, kit, channels: int, padding: int = 1):
        super().__init__()
        self.pad_right = padding == 0
        self.conv = kit.conv(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)



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


def up_path(kit, cfg, base: int, ch: int, skips: list, res: int, stage) -> tuple[nn.ModuleList, int]:
    """Return a U-Net's up path (coarsest level first: num_res_blocks + 1 stages per level, then an
    upsampler) and its output channels. `stage(channels in, skip channels, channels out, resolution)`
    builds one stage, which reads h and the skip popped from `skips`; modules are made in the order they
    run, so their initial weights are drawn in that order."""
    up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mults))):
        for _ in range(cfg.num_res_blocks + 1):
            up.append(stage(ch, skips.pop(), base * mult, res))
            ch = base * mult
        if level != 0:
            up.append(Upsample(kit, ch))
            res *= 2
    return up, ch


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
                self.down.append(self._stage(kit, ch, base * mult, emb_ch, res in cfg.attention_resolutions))
                ch = base * mult
                skips.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(Downsample(kit, ch, cfg.downsample_padding))
                skips.append(ch)
                res //= 2
        mid = [self._resblock(kit, ch, ch, emb_ch, cfg.mid_scale)]
        if cfg.mid_attention:
            mid.append(AttnBlock(kit, ch, cfg.head_dim, cfg.attn_heads, cfg.mid_attn_norm, cfg.mid_scale))
        self.mid = nn.ModuleList(mid + [self._resblock(kit, ch, ch, emb_ch, cfg.mid_scale)])
        up_attention = cfg.up_attention_resolutions
        up_attention = cfg.attention_resolutions if up_attention is None else up_attention
        self.up, ch = up_path(kit, cfg, base, ch, skips, res, lambda c, skip, out, r: self._stage(
            kit, (c, skip), out, emb_ch, r in up_attention))
        self.norm_out = kit.norm(ch)
        self.conv_out = kit.conv(ch, img_ch, 3, padding=1, slim_out=False)
        self.to(memory_format=torch.channels_last)

    def _resblock(self, kit, in_ch: Channels, out_ch: int, emb_ch: int, out_scale: float = 1.0) -> ResBlock:
        return ResBlock(kit, in_ch, out_ch, emb_ch, self.cfg.dropout, self.cfg.time_conditioning == "additive",
                        out_scale)

    def _stage(self, kit, in_ch: Channels, out_ch: int, emb_ch: int, attention: bool) -> nn.Module:
        blocks = [self._resblock(kit, in_ch, out_ch, emb_ch)]
        if attention:
            blocks.append(AttnBlock(kit, out_ch, self.cfg.head_dim, self.cfg.attn_heads))
        return nn.ModuleList(blocks)

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Return the time embedding that every block's projection reads, for timesteps t (N,) or ()."""
        cfg = self.cfg
        emb = self.time_mlp(timestep_embedding(t, self.emb_in, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        return F.silu(emb) if cfg.emb_act else emb  # diffusers applies it in each block: the same values

    @staticmethod
    def _run(stage: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(stage, nn.ModuleList):
            for block in stage:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            return h
        return stage(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return predicted noise for images x (B, C, H, W) at timesteps t: (B,) or a scalar for all."""
        return self.deep_forward(x, t)[0]

    # -- DeepCache (Ma et al. 2024; methods/caching) ------------------------------------------------
    @property
    def cache_branches(self) -> int:
        """Return the number of skip branches: a cached step runs the b outermost, 1 <= b <= this (the
        last skips only the middle blocks)."""
        return len(self.down) + 1

    def _branch_stage(self, branch: int) -> int:
        """Return the index in `up` of the stage that reads skip branch `branch` (1: the input
        convolution's output, the last stage; cache_branches: the deepest, the first stage)."""
        readers = [i for i, stage in enumerate(self.up) if not isinstance(stage, Upsample)]
        return readers[len(self.down) - (branch - 1)]

    def deep_forward(self, x: torch.Tensor, t: torch.Tensor, *, branch: int | None = None,
                     feature: torch.Tensor | None = None, record=()) -> tuple[torch.Tensor, dict]:
        """Return (predicted noise, {b: the main-branch input of the up stage that reads skip branch b}
        for each b in `record`).

        With `branch` b and `feature` (what a full step recorded for b), run only the b outermost skip
        branches: the input convolution, the first b - 1 down stages and the up path from the stage
        that reads skip b, its main-branch input taken from `feature` (DeepCache's partial inference).
        """
        t = torch.as_tensor(t, device=x.device)
        emb = self.time_embedding(t, x.dtype)
        if self.cfg.center_input:
            x = 2 * x - 1.0
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        for stage in self.down if branch is None else self.down[: branch - 1]:
            h = self._run(stage, h, emb)
            hs.append(h)
        if branch is None:
            for block in self.mid:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            start = 0
        else:
            h, start = feature, self._branch_stage(branch)
        wanted = {self._branch_stage(b): b for b in record}
        kept = {}
        for i in range(start, len(self.up)):
            stage = self.up[i]
            if i in wanted:
                kept[wanted[i]] = h
            if isinstance(stage, Upsample):
                h = stage(h)
            else:
                h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())), kept


class SlimUNet(UNet, SlimModel):
    """The supernet: one set of weights, a working denoiser at every width in `cfg.widths`."""

    def __init__(self, cfg: UNetConfig, image_shape: tuple[int, int, int]):
        super().__init__(cfg, image_shape, SlimKit(cfg.group_size, cfg.norm_groups, cfg.norm_eps))
        self.space = SubnetSpace.of(cfg.axes())
        self.subnet = self.space.full
        widths = self.space.choices("width")
        for block in self.modules():
            if isinstance(block, AttnBlock):
                _check_heads(block, cfg, widths)
            if isinstance(block, SlimGroupNorm):
                for w in widths:
                    c = sum(block.active_out(w))
                    if c % block.group_size:
                        raise DDSMError(f"model.norm_groups: a GroupNorm of {block.num_channels} channels in groups "
                                        f"of {block.group_size} has {c} channels at width {w!r}, not whole groups")

    def cache_branches_at(self, subnet) -> int:
        """Return the skip branches of the U-Net, whatever the width."""
        self.check_subnet(subnet)
        return self.cache_branches

    def apply_subnet(self, subnet: Subnet) -> None:
        """Make every slimmable layer run at the subnet's width."""
        self.set_width(subnet["width"])

    def export(self, subnet) -> UNet:
        """Return a plain static U-Net (torch layers only) equal to the supernet at `subnet`."""
        width = self.check_subnet(subnet)["width"]
        kit = StaticKit(self.cfg.group_size, width, self.cfg.norm_groups, self.cfg.norm_eps)
        static = self.load_into(UNet(self.cfg, self.image_shape, kit), width)
        return static.to(memory_format=torch.channels_last)


def _check_heads(block: AttnBlock, cfg: UNetConfig, widths) -> None:
    """Raise DDSMError unless the attention layer has whole heads at every width."""
    for w in widths:
        if block.heads is None:
            c = block.proj.active_out(w)[0]
            if c % cfg.head_dim:
                raise DDSMError(f"model.head_dim: {cfg.head_dim} does not divide the {c} channels of an "
                                f"attention layer at width {w!r}")
            continue
        full = block.proj.out_segments[0]
        per_head = full / block.heads
        if full % block.heads or abs(per_head * w - round(per_head * w)) > 1e-6 or round(per_head * w) < 1:
            raise DDSMError(f"model.attn_heads: {block.heads} heads of an attention layer of {full} channels are "
                            f"not whole channels at width {w!r}")
