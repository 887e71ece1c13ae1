"""Order a U-Net supernet's channels by importance, so that slicing (which keeps the leading channels of
every layer) keeps the most important GroupNorm groups and attention heads at each width, while the
full-size network computes the same function.

Criterion: first-order Taylor importance accumulated over timesteps, as Diff-Pruning does (VainF/
Diff-Pruning with torch-pruning's TaylorImportance): the diffusion loss's gradients are summed over a
few batches of training images at timesteps spread evenly over the noise schedule, and a channel scores
sum over the layers it touches of |sum over its weights of w * grad| (torch-pruning's multivariable
form, reduced over layers by a sum; norm scales and biases included). Diff-Pruning walks t = 0, 1, ...
until the loss falls below a share of its largest; evenly spread timesteps cover the whole schedule that
a per-step width schedule runs. torch-pruning is not installed here (and is not a dependency); it would
not help much anyway: its dependency graph prunes plain layers, not our per-segment-sliced ones, and
the permutations below must move whole groups and heads. So the few lines of Taylor scores are by hand.

What is permuted (each a "channel set": every layer row and column that carries the same channels,
permuted together; `channel_sets` lists them):
- inside every ResBlock: conv1's outputs, norm2, the time projection's rows (both halves, scale and
  shift, or the one additive half) and conv2's inputs, in whole norm2 groups;
- inside every attention layer: whole heads (their q, k and v rows with proj's columns) when the head
  dimension is fixed; with a fixed number of heads, the channels inside each head (q and k together; v
  with proj's columns);
- the time MLP's hidden features and the time embedding (every block's projection reads it);
- the residual stream between resampling layers: conv_in's, a Downsample's, an Upsample's or a
  projecting ResBlock's outputs, through the identity ResBlocks and attention layers that add into them,
  into every layer that reads them, the decoder's skip concatenations included (as their own segment of
  the reading ResBlock's norm1, conv1 and skip convolution), in units of the least common multiple of
  the groups of every GroupNorm that reads them.
Where a GroupNorm reads a residual set with a group that straddles the set's edge (a decoder
concatenation [h, skip] whose channels per group do not divide h, as a fixed group count at full width
gives), the channels of that group stay where they are and only blocks aligned with every reading
norm's groups move (their size is then the least common multiple of those groups); a set with fewer
than two such blocks keeps its order. `reorder_by_importance` reports what moved and what stayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.slim import SlimGroupNorm
from ...config import DiffusionConfig
from ...errors import DDSMError


@dataclass
class Tap:
    """One segment of a slimmable layer that carries a channel set: its output rows ("out"), its input
    columns ("in"), or a GroupNorm's scale and bias ("norm")."""

    layer: nn.Module
    kind: str
    segment: int = 0

    @property
    def offset(self) -> int:
        segments = self.layer.in_segments if self.kind == "in" else self.layer.out_segments
        return sum(segments[:self.segment])

    @property
    def size(self) -> int:
        return (self.layer.in_segments if self.kind == "in" else self.layer.out_segments)[self.segment]


@dataclass
class ChannelSet:
    """Channels that every tap carries in the same order; permuted `unit` channels at a time."""

    name: str
    size: int
    unit: int = 1
    taps: list[Tap] = field(default_factory=list)

    def add(self, *taps: Tap) -> None:
        for tap in taps:
            if tap.size != self.size:
                raise ValueError(f"{self.name}: a tap of {tap.size} channels in a set of {self.size}")
        self.taps.extend(taps)

    def blocks(self) -> tuple[list[int], int]:
        """Return (the first channel of each block that may move, the block size): blocks of whole units
        (a multiple of every reading GroupNorm's group size) that start on a group boundary of every
        GroupNorm reading the set. Channels in no such block (a group straddling the set's edge) stay."""
        norms = [tap for tap in self.taps if tap.kind == "norm"]
        unit = math.lcm(self.unit, *[tap.layer.group_size for tap in norms])
        starts, p = [], 0
        while p + unit <= self.size:
            if all((tap.offset + p) % tap.layer.group_size == 0 for tap in norms):
                starts.append(p)
                p += unit
            else:
                p += 1
        return starts, unit


class _Walker:
    """Follows UNet.forward and records which taps carry which channels."""

    def __init__(self, net):
        self.sets: list[ChannelSet] = []
        emb_ch = net.time_mlp[0].out_segments[0]
        hidden = self.new("time_mlp.hidden", emb_ch)
        hidden.add(Tap(net.time_mlp[0], "out"), Tap(net.time_mlp[2], "in"))
        self.emb = self.new("time_embedding", emb_ch)
        self.emb.add(Tap(net.time_mlp[2], "out"))
        x = self.new("conv_in", net.conv_in.out_segments[0])
        x.add(Tap(net.conv_in, "out"))
        skips = [x]
        for i, stage in enumerate(net.down):
            x = self.stage(f"down.{i}", stage, x)
            skips.append(x)
        for i, block in enumerate(net.mid):
            x = self.block(f"mid.{i}", block, x)
        for i, stage in enumerate(net.up):
            x = self.stage(f"up.{i}", stage, x, None if hasattr(stage, "conv") else skips.pop())
        x.add(Tap(net.norm_out, "norm"), Tap(net.conv_out, "in"))

    def new(self, name: str, size: int, unit: int = 1) -> ChannelSet:
        self.sets.append(ChannelSet(name, size, unit))
        return self.sets[-1]

    def stage(self, name: str, stage: nn.Module, x: ChannelSet, skip: ChannelSet | None = None) -> ChannelSet:
        if isinstance(stage, nn.ModuleList):
            for j, block in enumerate(stage):
                x = self.block(f"{name}.{j}", block, x, skip if j == 0 else None)
            return x
        x.add(Tap(stage.conv, "in"))  # Downsample or Upsample: a new set of channels
        out = self.new(f"{name}.conv", stage.conv.out_segments[0])
        out.add(Tap(stage.conv, "out"))
        return out

    def block(self, name: str, block: nn.Module, x: ChannelSet, skip: ChannelSet | None = None) -> ChannelSet:
        if hasattr(block, "qkv"):
            return self.attention(name, block, x)
        projecting = not isinstance(block.skip, nn.Identity)
        for seg, channels in enumerate([x] if skip is None else [x, skip]):
            channels.add(Tap(block.norm1, "norm", seg), Tap(block.conv1, "in", seg))
            if projecting:
                channels.add(Tap(block.skip, "in", seg))
        inner = self.new(f"{name}.conv1", block.conv1.out_segments[0])
        inner.add(Tap(block.conv1, "out"), Tap(block.norm2, "norm"), Tap(block.conv2, "in"),
                  *[Tap(block.emb, "out", k) for k in range(len(block.emb.out_segments))])
        self.emb.add(Tap(block.emb, "in"))
        if not projecting:
            x.add(Tap(block.conv2, "out"))
            return x
        out = self.new(name, block.conv2.out_segments[0])
        out.add(Tap(block.conv2, "out"), Tap(block.skip, "out"))
        return out

    def attention(self, name: str, block: nn.Module, x: ChannelSet) -> ChannelSet:
        if isinstance(block.norm, SlimGroupNorm):
            x.add(Tap(block.norm, "norm"))
        x.add(Tap(block.qkv, "in"), Tap(block.proj, "out"))
        if block.heads is None:  # whole heads: q, k and v of head i with proj's columns of head i
            heads = self.new(f"{name}.heads", block.qkv.out_segments[0], unit=block.head_dim)
            heads.add(*[Tap(block.qkv, "out", k) for k in range(3)], Tap(block.proj, "in"))
            return x
        h = block.heads
        for i in range(h):  # fixed heads: q and k channels pair up inside a head; v goes with proj
            qk = self.new(f"{name}.head{i}.qk", block.qkv.out_segments[i])
            qk.add(Tap(block.qkv, "out", i), Tap(block.qkv, "out", h + i))
            v = self.new(f"{name}.head{i}.v", block.qkv.out_segments[2 * h + i])
            v.add(Tap(block.qkv, "out", 2 * h + i), Tap(block.proj, "in", i))
        return x


def channel_sets(net) -> list[ChannelSet]:
    """Return every channel set of a U-Net supernet (see the module's docstring)."""
    from ...backbones.unet import UNet

    if not isinstance(net, UNet) or not hasattr(net, "space"):
        raise DDSMError(f"importance ordering needs a U-Net supernet, not a {type(net).__name__}")
    return _Walker(net).sets


def accumulate_gradients(net, x0: torch.Tensor, diffusion: DiffusionConfig, timesteps, batch_size: int,
                         seed: int, progress: bool = False) -> None:
    """Leave in every parameter's .grad the full-size diffusion loss's gradient summed over batches of
    `x0` at each of `timesteps` (one timestep for a whole batch, as Diff-Pruning does), on the device
    of the network (the noise drawn on the CPU, so the same on any device)."""
    from tqdm.auto import tqdm

    from ...diffusion import NoiseSchedule

    schedule = NoiseSchedule(diffusion)
    generator = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    net.zero_grad(set_to_none=True)
    starts = range(0, len(x0), batch_size)
    bar = tqdm(total=len(starts) * len(timesteps), desc="importance", unit="pass", disable=not progress, leave=False)
    with torch.enable_grad():
        for start in starts:
            batch = x0[start:start + batch_size]
            noise = torch.randn(batch.shape, generator=generator)
            batch, noise = batch.to(device), noise.to(device)
            for t in timesteps:
                tt = torch.full((len(batch),), int(t), dtype=torch.long, device=device)
                F.mse_loss(net(schedule.q_sample(batch, tt, noise), tt), noise).backward()
                bar.update(1)
    bar.close()


def _tap_rows(tap: Tap, tensor: torch.Tensor) -> torch.Tensor:
    """Return the rows of `tensor` (a weight, bias or their product with the gradient) that carry the
    tap's channels, one per channel, flattened."""
    part = tensor.narrow(1 if tap.kind == "in" else 0, tap.offset, tap.size)
    return (part.transpose(0, 1) if tap.kind == "in" else part).reshape(tap.size, -1)


def set_scores(channels: ChannelSet) -> torch.Tensor:
    """Return each channel's Taylor importance: over its taps, |sum of w * grad| of its weights (and of
    its biases and norm scales/shifts, where the tap owns them)."""
    score = torch.zeros(channels.size, dtype=torch.float64)
    for tap in channels.taps:
        params = [tap.layer.weight] + ([tap.layer.bias] if tap.kind != "in" and tap.layer.bias is not None else [])
        for p in params:
            if p.grad is not None:
                score += _tap_rows(tap, (p * p.grad).detach().double()).sum(1).abs()
    return score


def _permute(tap: Tap, perm: torch.Tensor) -> None:
    """Reorder the tap's channels: new channel i is old channel perm[i]."""
    dim = 1 if tap.kind == "in" else 0
    params = [tap.layer.weight] + ([tap.layer.bias] if dim == 0 and tap.layer.bias is not None else [])
    for p in params:
        index = torch.arange(p.shape[dim])
        index[tap.offset:tap.offset + tap.size] = tap.offset + perm
        with torch.no_grad():
            p.copy_(p.index_select(dim, index))


def block_order(scores: torch.Tensor, starts: list[int], unit: int) -> torch.Tensor:
    """Return the channel permutation that puts the movable blocks (of `unit` channels from each start,
    order inside kept) in decreasing order of their summed score into the same places; the channels
    outside them stay. Ties keep their order."""
    totals = np.array([float(scores[p:p + unit].sum()) for p in starts])
    perm = torch.arange(len(scores))
    for place, block in zip(starts, np.argsort(-totals, kind="stable")):
        perm[place:place + unit] = torch.arange(starts[block], starts[block] + unit)
    return perm


def reorder_by_importance(net, data, diffusion: DiffusionConfig, *, images: int = 64, timesteps: int = 8,
                          batch_size: int = 32, seed: int = 0, progress: bool = False) -> dict:
    """Permute the supernet's channels (in place) into decreasing Taylor importance on `images` training
    images (an ImageData, or float images in [-1, 1]) at `timesteps` timesteps spread over the schedule;
    return what was done, as JSON-able data. The full-size function is unchanged."""
    sets = channel_sets(net)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, torch.Tensor):
        x0 = data[torch.randperm(len(data), generator=generator)[:images]].float()
    else:
        x0 = data.to_float(torch.randperm(len(data), generator=generator)[:images])
    if len(x0) == 0:
        raise DDSMError("importance ordering needs at least one training image")
    steps = sorted({int(v) for v in np.round(np.linspace(0, diffusion.timesteps - 1, timesteps))})
    subnet, training = net.subnet, net.training
    net.set_subnet(net.full).eval()
    try:
        accumulate_gradients(net, x0, diffusion, steps, batch_size, seed, progress)
        permuted, kept = [], []
        for channels in sets:
            starts, unit = channels.blocks()
            if len(starts) < 2:
                kept.append({"set": channels.name, "channels": channels.size,
                             "why": "GroupNorm groups straddle it, leaving fewer than two whole blocks to order"})
                continue
            perm = block_order(set_scores(channels), starts, unit)
            for tap in channels.taps:
                _permute(tap, perm)
            permuted.append({"set": channels.name, "channels": channels.size, "unit": unit, "blocks": len(starts),
                             "fixed": channels.size - len(starts) * unit,
                             "moved": bool((perm != torch.arange(channels.size)).any())})
    finally:
        net.zero_grad(set_to_none=True)
        net.set_subnet(subnet).train(training)
    return {"criterion": "taylor |w * grad|, gradients summed over timesteps (Diff-Pruning)", "images": len(x0),
            "timesteps": steps, "sets_permuted": len(permuted), "sets": permuted, "kept_in_order": kept}
