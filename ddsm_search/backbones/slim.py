"""Slimmable layers that slice their weights (never mask) so a smaller width does less work.

Each layer's input and output may be a concatenation of segments (a U-Net skip `[h, skip]`, fused
`qkv`, `[scale, shift]`). Every segment is sliced on its own: taking the first `k` channels of the
concatenation as one tensor (as DDSM's reference code does) would feed skip channels into weights
that belong to `h`. The active width is a plain attribute (`layer.width`), as in once-for-all.

A `Kit` builds the layers of a network: `SlimKit` builds these slimmable layers, `StaticKit(width)`
builds plain torch layers with the channel counts of one width, so one network definition serves as
both the supernet and any exported static subnet.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Channels = int | Sequence[int]


def channels_at(full: int, width: float) -> int:
    """Return the active channel count of a segment with `full` channels at `width`."""
    return max(1, int(round(full * width)))


class Fixed(int):
    """A segment of channels that keeps its full size at every width, inside a layer that otherwise
    slims: a multi-stage U-Net's decoder reads the skips and the time embedding of a full-width encoder."""


def _segment(c) -> int:
    return c if isinstance(c, Fixed) else int(c)


def _segments(channels: Channels) -> tuple[int, ...]:
    return (_segment(channels),) if isinstance(channels, int) else tuple(_segment(c) for c in channels)


def _active(segments: tuple[int, ...], slim: bool, width: float) -> tuple[int, ...]:
    return tuple(channels_at(c, width) if slim and not isinstance(c, Fixed) else c for c in segments)


def slice_segments(t: torch.Tensor, dim: int, segments: tuple[int, ...], active: tuple[int, ...]) -> torch.Tensor:
    """Return `t` restricted along `dim` to the leading `active[i]` channels of each segment."""
    if active == segments:
        return t
    parts, offset = [], 0
    for full, keep in zip(segments, active):
        parts.append(t.narrow(dim, offset, keep))
        offset += full
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class _Slim:
    """Mixin: segment bookkeeping shared by the slimmable layers."""

    width: float = 1.0

    def _init_segments(self, in_ch: Channels, out_ch: Channels, slim_in: bool, slim_out: bool) -> None:
        self.in_segments, self.out_segments = _segments(in_ch), _segments(out_ch)
        self.slim_in, self.slim_out = slim_in, slim_out

    def active_in(self, width: float | None = None) -> tuple[int, ...]:
        """Return the active size of each input segment."""
        return _active(self.in_segments, self.slim_in, self.width if width is None else width)

    def active_out(self, width: float | None = None) -> tuple[int, ...]:
        """Return the active size of each output segment."""
        return _active(self.out_segments, self.slim_out, self.width if width is None else width)

    def sliced_weight(self, width: float | None = None) -> torch.Tensor:
        """Return the weight restricted to the active input and output channels."""
        w = slice_segments(self.weight, 0, self.out_segments, self.active_out(width))
        if self.weight.dim() > 1:
            w = slice_segments(w, 1, self.in_segments, self.active_in(width))
        return w

    def sliced_bias(self, width: float | None = None) -> torch.Tensor | None:
        """Return the bias restricted to the active output channels (None if there is none)."""
        if self.bias is None:
            return None
        return slice_segments(self.bias, 0, self.out_segments, self.active_out(width))

    def sliced_state(self, width: float) -> dict[str, torch.Tensor]:
        """Return this layer's parameters at `width`, keyed as in the static layer."""
        state = {"weight": self.sliced_weight(width)}
        if self.bias is not None:
            state["bias"] = self.sliced_bias(width)
        return state


class SlimConv2d(_Slim, nn.Conv2d):
    """Conv2d whose input and output channels (each segment separately) shrink with `width`."""

    def __init__(self, in_ch: Channels, out_ch: Channels, kernel_size: int, stride: int = 1, padding: int = 0,
                 slim_in: bool = True, slim_out: bool = True):
        nn.Conv2d.__init__(self, sum(_segments(in_ch)), sum(_segments(out_ch)), kernel_size, stride, padding)
        self._init_segments(in_ch, out_ch, slim_in, slim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.sliced_weight(), self.sliced_bias(), self.stride, self.padding)


class SlimLinear(_Slim, nn.Linear):
    """Linear layer whose input and output features (each segment separately) shrink with `width`."""

    def __init__(self, in_ch: Channels, out_ch: Channels, slim_in: bool = True, slim_out: bool = True):
        nn.Linear.__init__(self, sum(_segments(in_ch)), sum(_segments(out_ch)))
        self._init_segments(in_ch, out_ch, slim_in, slim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sliced_weight(), self.sliced_bias())


class SlimGroupNorm(_Slim, nn.GroupNorm):
    """GroupNorm that keeps channels per group fixed, so groups = active channels // group_size.

    A fixed group count would shrink the groups with the width until, at small widths, each group is
    one channel and the layer has silently become InstanceNorm.
    """

    def __init__(self, channels: Channels, group_size: int, eps: float = 1e-5):
        total = sum(_segments(channels))
        nn.GroupNorm.__init__(self, total // group_size, total, eps=eps)
        self._init_segments(channels, channels, True, True)
        self.group_size = group_size

    def sliced_weight(self, width: float | None = None) -> torch.Tensor:
        return slice_segments(self.weight, 0, self.out_segments, self.active_out(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1] // self.group_size, self.sliced_weight(), self.sliced_bias(), self.eps)


def group_size_of(channels: Channels, group_size: int, norm_groups: int | None) -> int:
    """Return the channels per group of a GroupNorm over `channels` at full width: `group_size`, or with
    a fixed group count at full width (`norm_groups`, as diffusers' norm_num_groups) its full-width share."""
    return group_size if norm_groups is None else sum(_segments(channels)) // norm_groups


class SlimKit:
    """Builds slimmable layers: the supernet."""

    def __init__(self, group_size: int, norm_groups: int | None = None, eps: float = 1e-5):
        self.group_size, self.norm_groups, self.eps = group_size, norm_groups, eps

    def conv(self, in_ch: Channels, out_ch: Channels, kernel_size: int, stride: int = 1, padding: int = 0,
             slim_in: bool = True, slim_out: bool = True) -> nn.Module:
        """Return a slimmable convolution."""
        return SlimConv2d(in_ch, out_ch, kernel_size, stride, padding, slim_in, slim_out)

    def linear(self, in_ch: Channels, out_ch: Channels, slim_in: bool = True, slim_out: bool = True) -> nn.Module:
        """Return a slimmable linear layer."""
        return SlimLinear(in_ch, out_ch, slim_in, slim_out)

    def norm(self, channels: Channels) -> nn.Module:
        """Return a slimmable GroupNorm with fixed channels per group."""
        return SlimGroupNorm(channels, group_size_of(channels, self.group_size, self.norm_groups), self.eps)


class StaticKit:
    """Builds plain torch layers with the channel counts of one width: an exported subnet."""

    def __init__(self, group_size: int, width: float, norm_groups: int | None = None, eps: float = 1e-5):
        self.group_size, self.width, self.norm_groups, self.eps = group_size, width, norm_groups, eps

    def _n(self, channels: Channels, slim: bool) -> int:
        return sum(_active(_segments(channels), slim, self.width))

    def conv(self, in_ch: Channels, out_ch: Channels, kernel_size: int, stride: int = 1, padding: int = 0,
             slim_in: bool = True, slim_out: bool = True) -> nn.Module:
        """Return a plain Conv2d at this kit's width."""
        return nn.Conv2d(self._n(in_ch, slim_in), self._n(out_ch, slim_out), kernel_size, stride, padding)

    def linear(self, in_ch: Channels, out_ch: Channels, slim_in: bool = True, slim_out: bool = True) -> nn.Module:
        """Return a plain Linear at this kit's width."""
        return nn.Linear(self._n(in_ch, slim_in), self._n(out_ch, slim_out))

    def norm(self, channels: Channels) -> nn.Module:
        """Return a plain GroupNorm at this kit's width, channels per group fixed."""
        n = self._n(channels, True)
        return nn.GroupNorm(n // group_size_of(channels, self.group_size, self.norm_groups), n, eps=self.eps)


def slim_layers(module: nn.Module):
    """Yield (name, layer) for every slimmable layer inside `module`."""
    for name, layer in module.named_modules():
        if isinstance(layer, _Slim):
            yield name, layer
