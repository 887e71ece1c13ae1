"""The multi-stage U-Net (arXiv 2312.09181, CVPR 2024): one shared encoder, one slimmable decoder per
stage of timesteps, as a U-Net topology in the step-aware space.

The encoder (the U-Net's time embedding, conv_in, down path and middle block) runs at full width for
every stage, as the paper's shared encoder does: slimming it would change the skips every decoder
reads. Decoder k (the up path, norm_out and conv_out, base channels `model.decoders[k].channels`) runs
the timesteps of stage k and slims with its own widths; it reads the encoder's skips and time
embedding at their full size (`slim.Fixed` segments), so its `[h, skip]` concatenations slice `h` only.

Subnet axes: `stage` (0 .. K-1, least noise first) and `width` (of that stage's decoder). The stage of
a step follows from its timestep, so a subnet may leave it out (`width=0.5`: width 0.5 of whichever
decoder the step's timestep selects): `step_subnets` fills it in per step, and a network set to (or
exported for) such a subnet routes each image to its stage's decoder. A subnet that names its stage
refuses a timestep outside that stage. FLOPs are measured per (stage, width): a schedule's cost
follows its stages.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DDSMError
from ..space.subnet import Subnet, SubnetSpace, choices_text, matching_choice
from .base import SlimModel
from .slim import Fixed, SlimGroupNorm, SlimKit, StaticKit, slim_layers
from .unet import AttnBlock, Downsample, ResBlock, Upsample, check_image_shape, timestep_embedding, up_path

if TYPE_CHECKING:  # annotations only: a backbone reads its section's fields
    from ..config import MultiStageConfig


@dataclass(frozen=True)
class StagedSpace(SubnetSpace):
    """The subnets of a multi-stage U-Net: (stage, width) with each stage's own widths.

    `axes` hold the stages and the widths every decoder serves: what a subnet that leaves its stage to
    the step may name (and a search gene). Members (iteration, FLOPs keys, exports) are every stage
    with each of its decoder's widths, largest stage first."""

    stage_widths: tuple[tuple[float, ...], ...] = ()  # per stage, its decoder's widths (largest first)
    step_axis = "stage"

    @property
    def full(self) -> Subnet:
        """Return full size: full width at whichever stage the step is in (the stage left out)."""
        return Subnet.of(width=self.choices("width")[0])

    @property
    def smallest(self) -> Subnet:
        """Return the smallest width every decoder serves (the stage left out)."""
        return Subnet.of(width=self.choices("width")[-1])

    def __iter__(self):
        for stage in range(len(self.stage_widths) - 1, -1, -1):
            for w in self.stage_widths[stage]:
                yield Subnet.of(stage=stage, width=w)

    def __len__(self) -> int:
        return sum(len(w) for w in self.stage_widths)

    def along(self, axis: str) -> list[Subnet]:
        """Return full size at each width every decoder serves; none along the stage (no stage samples
        on its own: the step's timestep picks it)."""
        return [] if axis == self.step_axis else [Subnet.of(width=w) for w in self.choices(axis)]

    def stage(self, stage: int) -> SubnetSpace:
        """Return the subnets of one stage (its decoder's widths)."""
        return SubnetSpace.of({"stage": [stage], "width": self.stage_widths[stage]})

    def check(self, subnet) -> Subnet:
        """Return `subnet` checked: with a stage, a width of that stage's decoder; without, a width every
        decoder serves (the step's timestep decides the stage)."""
        if isinstance(subnet, Subnet) and subnet in self.members:
            return subnet
        if isinstance(subnet, (int, float)) and not isinstance(subnet, bool):
            subnet = {"width": subnet}
        values = (subnet.as_dict() if isinstance(subnet, Subnet) else dict(subnet) if isinstance(subnet, Mapping)
                  else Subnet.parse(subnet).as_dict() if isinstance(subnet, str) else None)
        if values is None:
            raise DDSMError(f"{subnet!r} is not a subnet")
        unknown = [a for a in values if a not in self.names]
        if unknown:
            raise DDSMError(f"this supernet has no axis {unknown[0]!r} (axes: {', '.join(self.names)})")
        stage = values.get("stage")
        if stage is not None:
            stage = matching_choice(stage, self.choices("stage"))
            if stage is None:
                raise DDSMError(f"stage {values['stage']!r} is not in the supernet (stages 0 to "
                                f"{len(self.stage_widths) - 1}, least noise first)")
        choices = self.choices("width") if stage is None else self.stage_widths[stage]
        width = matching_choice(values.get("width", choices[0]), choices)
        if width is None:
            shown = repr(float(values["width"]))
            if stage is None:
                raise DDSMError(f"width {shown} is not served by every stage's decoder (widths all serve: "
                                f"{choices_text('width', choices)}); name the stage, e.g. stage=0,width={shown}")
            raise DDSMError(f"width {shown} is not in stage {stage}'s decoder (its widths: {choices_text('width', choices)})")
        return Subnet.of(width=width) if stage is None else Subnet.of(stage=stage, width=width)

    def to_json(self) -> dict:
        """Return {axis: [choices]}, with each stage's widths as 'stage_widths'."""
        return {**super().to_json(), "stage_widths": [list(w) for w in self.stage_widths]}


def _boundaries(cfg: MultiStageConfig) -> tuple[int, ...]:
    if cfg.stage_boundaries is None:  # equal spans need diffusion.timesteps, which the model section lacks
        raise DDSMError("model.stage_boundaries: not set (config_from_dict fills in equal spans of "
                        "diffusion.timesteps; a config built in code must give them)")
    if len(cfg.stage_boundaries) != len(cfg.decoders) - 1:
        raise DDSMError(f"model.stage_boundaries: {len(cfg.decoders)} decoders need {len(cfg.decoders) - 1} "
                        f"boundaries, got {len(cfg.stage_boundaries)}")
    return tuple(cfg.stage_boundaries)


class Encoder(nn.Module):
    """The shared encoder, in plain torch layers (it runs at full width for every stage): the time
    embedding, conv_in, the down path and the middle block. Its outputs: the embedding, the middle
    block's output and the skips."""

    def __init__(self, cfg: MultiStageConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        kit = StaticKit(cfg.group_size, 1.0)
        img_ch, res, _ = image_shape
        base = cfg.base_channels
        self.emb_in, self.emb_ch = base, 4 * base
        self.time_mlp = nn.Sequential(kit.linear(base, self.emb_ch), nn.SiLU(), kit.linear(self.emb_ch, self.emb_ch))
        self.conv_in = kit.conv(img_ch, base, 3, padding=1)
        self.down, self.skips, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(kit, ch, base * mult, self.emb_ch, cfg.dropout)]
                if res in cfg.attention_resolutions:
                    blocks.append(AttnBlock(kit, base * mult, cfg.head_dim))
                self.down.append(nn.ModuleList(blocks))
                ch = base * mult
                self.skips.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(Downsample(kit, ch))
                self.skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(kit, ch, ch, self.emb_ch, cfg.dropout), AttnBlock(kit, ch, cfg.head_dim),
                                  ResBlock(kit, ch, ch, self.emb_ch, cfg.dropout)])
        self.out_ch, self.bottom_res = ch, res
        for block in self.modules():
            if isinstance(block, AttnBlock) and block.proj.out_channels % cfg.head_dim:
                raise DDSMError(f"model.head_dim: {cfg.head_dim} does not divide the {block.proj.out_channels} "
                                "channels of an attention layer of the encoder")

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        """Return (time embedding, middle block output, skips) for images x at timesteps t."""
        emb = self.time_mlp(timestep_embedding(t, self.emb_in).to(x.dtype))
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        for stage in self.down:
            if isinstance(stage, nn.ModuleList):
                for block in stage:
                    h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            else:
                h = stage(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return emb, h, hs


class Decoder(nn.Module):
    """One stage's decoder (up path, norm_out, conv_out) from `kit`; it reads the encoder's skips and
    time embedding at full size."""

    def __init__(self, kit, cfg: MultiStageConfig, channels: int, encoder: Encoder, img_ch: int):
        super().__init__()
        skips, ch, res = list(encoder.skips), Fixed(encoder.out_ch), encoder.bottom_res
        emb = Fixed(encoder.emb_ch)

        def stage(c: int, skip: int, out: int, r: int) -> nn.ModuleList:  # the encoder's skips stay full size
            blocks = [ResBlock(kit, (c, Fixed(skip)), out, emb, cfg.dropout)]
            if r in cfg.attention_resolutions:
                blocks.append(AttnBlock(kit, out, cfg.head_dim))
            return nn.ModuleList(blocks)

        self.up, ch = up_path(kit, cfg, channels, ch, skips, res, stage)
        self.norm_out = kit.norm(ch)
        self.conv_out = kit.conv(ch, img_ch, 3, padding=1, slim_out=False)

    def forward(self, h: torch.Tensor, hs: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Return the predicted noise from the encoder's outputs (`hs` is not changed)."""
        hs = list(hs)
        for stage in self.up:
            if isinstance(stage, Upsample):
                h = stage(h)
                continue
            h = torch.cat([h, hs.pop()], dim=1)
            for block in stage:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class MultiStageUNet(nn.Module):
    """The shared encoder and the decoders of `stages` (layers from `kit`); `active` is the stage it runs
    (timesteps of other stages are refused), or None: each image goes to its timestep's stage."""

    def __init__(self, cfg: MultiStageConfig, image_shape: tuple[int, int, int], kit, stages=None,
                 active: int | None = None):
        check_image_shape(cfg, image_shape)
        super().__init__()
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        self.boundaries = _boundaries(cfg)
        self.stages = tuple(range(len(cfg.decoders))) if stages is None else tuple(stages)
        self.active = active
        self.encoder = Encoder(cfg, image_shape)
        self.decoders = nn.ModuleList(Decoder(kit, cfg, cfg.decoders[k].channels, self.encoder, image_shape[0])
                                      for k in self.stages)
        self.to(memory_format=torch.channels_last)

    def stage_of(self, t) -> int:
        """Return the stage of timestep `t` (the number of boundaries at or below it)."""
        return bisect.bisect_right(self.boundaries, int(t))

    def stage_span(self, stage: int) -> tuple[int, int | None]:
        """Return the timesteps [lo, hi) of `stage` (hi None: to the last timestep)."""
        edges = (0, *self.boundaries, None)
        return edges[stage], edges[stage + 1]

    def _decoder(self, stage: int) -> Decoder:
        if stage not in self.stages:
            raise DDSMError(f"this network holds the decoders of stages {list(self.stages)}, not stage {stage}")
        return self.decoders[self.stages.index(stage)]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return predicted noise for images x at timesteps t ((B,) or a scalar for all)."""
        t = torch.as_tensor(t, device=x.device)
        emb, h, hs = self.encoder(x, t)
        if t.device.type == "meta":  # shapes only (FLOPs): the active decoder, or the first held
            return self.decoders[0 if self.active is None else self.stages.index(self.active)](h, hs, emb)
        flat = t.reshape(-1)
        lo, hi = int(flat.min()), int(flat.max())
        if self.active is not None:
            if self.stage_of(lo) != self.active or self.stage_of(hi) != self.active:
                a, b = self.stage_span(self.active)
                bad = lo if self.stage_of(lo) != self.active else hi
                raise DDSMError(f"timestep {bad} is in stage {self.stage_of(bad)}, but this network runs stage "
                                f"{self.active} (t in [{a}, {'T' if b is None else b})); leave the stage out to "
                                "route by timestep")
            return self._decoder(self.active)(h, hs, emb)
        if self.stage_of(lo) == self.stage_of(hi):  # one stage for the whole batch (sampling: always)
            return self._decoder(self.stage_of(lo))(h, hs, emb)
        stages = torch.bucketize(flat, torch.tensor(self.boundaries, device=flat.device), right=True)
        stages = stages.expand(len(x)) if stages.numel() == 1 else stages
        out = None
        for stage in stages.unique().tolist():
            idx = (stages == stage).nonzero().squeeze(1)
            part = self._decoder(stage)(h[idx], [s[idx] for s in hs], emb[idx] if len(emb) > 1 else emb)
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[idx] = part
        return out


class SlimMultiStageUNet(MultiStageUNet, SlimModel):
    """The supernet: the shared encoder and every stage's slimmable decoder."""

    def __init__(self, cfg: MultiStageConfig, image_shape: tuple[int, int, int]):
        super().__init__(cfg, image_shape, SlimKit(cfg.group_size))
        axes = cfg.axes()
        self.space = StagedSpace(SubnetSpace.of(axes).axes,
                                 tuple(cfg.decoder_widths(k) for k in range(len(cfg.decoders))))
        self.num_stages = len(cfg.decoders)
        self.subnet = self.space.full
        for k, decoder in enumerate(self.decoders):
            _check_decoder(decoder, cfg, k, self.space.stage_widths[k])

    def stage_timesteps(self, stage: int, timesteps: int) -> tuple[int, int]:
        """Return the timesteps [lo, hi) of `stage` in a process of `timesteps` steps."""
        lo, hi = self.stage_span(stage)
        return lo, timesteps if hi is None else hi

    def stage_space(self, stage: int | None) -> SubnetSpace:
        """Return the subnets of `stage` (its decoder's widths); None: all."""
        return self.space if stage is None else self.space.stage(stage)

    def step_subnets(self, subnets, timesteps) -> list[Subnet]:
        """Return each step's subnet with the stage of its timestep; raise DDSMError naming the step if a
        subnet names another stage."""
        subnets = list(subnets)
        if timesteps is None or len(timesteps) != len(subnets):
            raise DDSMError(f"{len(subnets)} subnets need one timestep each, got "
                            f"{'none' if timesteps is None else len(timesteps)}")
        out = []
        for i, (subnet, t) in enumerate(zip(subnets, timesteps)):
            subnet, stage = self.check_subnet(subnet), self.stage_of(t)
            named = subnet.get("stage")
            if named is not None and named != stage:
                raise DDSMError(f"step {i} (t={int(t)}) is in stage {stage}, but its subnet {subnet.key} names stage "
                                f"{named}; leave the stage out (e.g. width={subnet['width']!r}) to follow the timestep")
            try:
                out.append(self.check_subnet(subnet.replace(stage=stage)))
            except DDSMError as exc:
                raise DDSMError(f"step {i} (t={int(t)}, stage {stage}): {exc}") from None
        return out

    def concrete(self, subnet) -> list[Subnet]:
        """Return `subnet` if it names its stage, else its width at every stage."""
        subnet = self.check_subnet(subnet)
        if subnet.get("stage") is not None:
            return [subnet]
        return [Subnet.of(stage=k, width=subnet["width"]) for k in range(self.num_stages - 1, -1, -1)]

    def apply_subnet(self, subnet: Subnet) -> None:
        """Run the subnet's stage (or, without one, route by timestep) with its decoder at its width."""
        self.active = subnet.get("stage")
        self.set_width(subnet["width"])  # every decoder's layers (the encoder has none that slim)

    def export(self, subnet) -> MultiStageUNet:
        """Return a plain static network equal to the supernet at `subnet`: the encoder and that stage's
        decoder at its width, or without a stage every decoder at that width, routing by timestep."""
        subnet = self.check_subnet(subnet)
        width, stage = subnet["width"], subnet.get("stage")
        stages = self.stages if stage is None else (stage,)
        static = MultiStageUNet(self.cfg, self.image_shape, StaticKit(self.cfg.group_size, width), stages, stage)
        state = {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.state_dict().items()}
        for i, k in enumerate(stages):
            for name, layer in slim_layers(self.decoders[k]):
                for key, value in layer.sliced_state(width).items():
                    state[f"decoders.{i}.{name}.{key}"] = value.detach().clone()
        static.load_state_dict(state, strict=True)
        return static.to(next(self.parameters()).device).train(self.training).to(memory_format=torch.channels_last)


def _check_decoder(decoder: Decoder, cfg: MultiStageConfig, stage: int, widths) -> None:
    """Raise DDSMError unless every GroupNorm has whole groups and every attention layer whole heads."""
    key = f"model.decoders[{stage}]"
    for block in decoder.modules():
        for w in widths:
            if isinstance(block, AttnBlock):
                c = block.proj.active_out(w)[0]
                if c % cfg.head_dim:
                    raise DDSMError(f"model.head_dim: {cfg.head_dim} does not divide the {c} channels of an "
                                    f"attention layer of {key} at width {w!r}")
            if isinstance(block, SlimGroupNorm):
                c = sum(block.active_out(w))
                if c % block.group_size:
                    raise DDSMError(f"{key}.widths: a GroupNorm of {block.num_channels} channels in groups of "
                                    f"{block.group_size} has {c} channels at width {w!r}, not whole groups")
