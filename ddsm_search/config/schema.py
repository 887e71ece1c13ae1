"""The experiment config's schema: one dataclass per YAML section, with its defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BACKEND_CHOICES = ("auto", "torch", "fused")  # as backends.CHOICES (config imports no model code)


@dataclass
class DataConfig:
    """Which images to train on."""

    kind: str = "digits"  # digits | cifar10 | folder
    path: str | None = None
    split: str = "train"
    image_size: int | None = None
    channels: int | None = None
    hflip: bool = False  # random horizontal flips (not for digits: a flipped digit is another shape)
    limit: int | None = None


@dataclass
class UNetConfig:
    """The slimmable U-Net supernet (`model.kind: unet`): full-width shape and the widths it serves."""

    kind: str = "unet"
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    group_size: int = 8  # channels per GroupNorm group, kept fixed at every width
    head_dim: int = 16  # channels per attention head, kept fixed at every width
    widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    # Options that an imported diffusers UNet2DModel needs (ddsm_search.imports); the defaults are this
    # U-Net's own design, and give bit-identical outputs and the same parameters as before they existed.
    norm_groups: int | None = None  # if set, each GroupNorm has this many groups at full width (diffusers'
    #   norm_num_groups), and its full-width channels per group then stay fixed at every width, so a group
    #   is never split; None: model.group_size channels per group everywhere
    norm_eps: float = 1e-5
    attn_heads: int | None = None  # if set, every attention layer keeps this many heads and their head
    #   dimension shrinks with the width (diffusers' attention_head_dim: null is one head); None: head_dim fixed
    time_conditioning: str = "scale_shift"  # scale_shift: norm2(h) * (1 + scale) + shift; additive: norm2(h + emb)
    emb_act: bool = False  # SiLU on the time embedding before each block's projection (diffusers does)
    flip_sin_to_cos: bool = True  # timestep features [cos, sin]; False: [sin, cos]
    freq_shift: float = 0.0  # frequencies exp(-ln(10000) i / (half - freq_shift)), i < half = base_channels / 2
    up_attention_resolutions: tuple[int, ...] | None = None  # the decoder's, if not attention_resolutions
    mid_attention: bool = True  # the middle block's attention (diffusers' add_attention)
    mid_attn_norm: bool = True  # its GroupNorm (diffusers' mid block has none with scale_shift)
    mid_scale: float = 1.0  # the middle block's residual outputs are divided by this (mid_block_scale_factor)
    downsample_padding: int = 1  # 1: padding 1 all round; 0: pad right and bottom by 1 (diffusers' 0)
    center_input: bool = False  # x -> 2x - 1 before the first convolution (center_input_sample)

    def axes(self) -> dict[str, tuple]:
        """Return the axes this backbone declares and their choices: the U-Net's width."""
        return {"width": tuple(sorted(self.widths, reverse=True))}


@dataclass
class DiTConfig:
    """The slimmable DiT supernet (`model.kind: dit`): adaLN-Zero blocks; width slices attention heads
    (head dimension fixed) and MLP channels, depth is the number of blocks run."""

    kind: str = "dit"
    patch_size: int = 2
    hidden_size: int = 384
    blocks: int = 12
    head_dim: int = 64  # channels per attention head, kept fixed at every width
    mlp_ratio: float = 4.0
    widths: tuple[float, ...] = (1.0, 0.5)
    depths: tuple[int, ...] | None = None  # blocks run; default: every depth from half the blocks to all
    dropout: float = 0.0

    @property
    def depth_choices(self) -> tuple[int, ...]:
        """Return the depths this supernet serves, deepest first."""
        depths = self.depths if self.depths is not None else range((self.blocks + 1) // 2, self.blocks + 1)
        return tuple(sorted(set(depths), reverse=True))

    def axes(self) -> dict[str, tuple]:
        """Return the axes this backbone declares and their choices: width and depth."""
        return {"width": tuple(sorted(self.widths, reverse=True)), "depth": self.depth_choices}


@dataclass
class DecoderConfig:
    """One decoder of the multi-stage U-Net: its own base channels and the widths it serves."""

    channels: int = 32  # base channels: its level l has channels * model.channel_mults[l]
    widths: tuple[float, ...] | None = None  # its widths, relative to its own channels (default: model.widths)


def _default_decoders() -> tuple[DecoderConfig, ...]:
    return (DecoderConfig(48), DecoderConfig(32), DecoderConfig(16))


@dataclass
class MultiStageConfig:
    """The multi-stage U-Net (`model.kind: multistage`; arXiv 2312.09181): one shared encoder at full
    width (the U-Net's conv_in, down path and middle block) and one slimmable decoder (up path, norm_out,
    conv_out) per stage of timesteps. Stage k runs t in [stage_boundaries[k-1], stage_boundaries[k])
    (stage 0: least noise; the paper's decoders go 192, 128, 16 channels from low to high noise)."""

    kind: str = "multistage"
    base_channels: int = 32  # the encoder's
    channel_mults: tuple[int, ...] = (1, 2, 2)  # of the encoder and of every decoder
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    group_size: int = 8  # channels per GroupNorm group, kept fixed at every width
    head_dim: int = 16  # channels per attention head, kept fixed at every width
    widths: tuple[float, ...] = (1.0, 0.5)  # the widths of every decoder that lists none of its own
    decoders: tuple[DecoderConfig, ...] = field(default_factory=_default_decoders)  # one per stage, low noise first
    # K - 1 increasing timesteps where stages change (`ddsm-search stages` prints them as boundary_timesteps);
    # default (null): K equal spans of diffusion.timesteps, filled in when the config is read
    stage_boundaries: tuple[int, ...] | None = None

    def decoder_widths(self, stage: int) -> tuple[float, ...]:
        """Return the widths the decoder of `stage` serves, largest first."""
        own = self.decoders[stage].widths
        return tuple(sorted(self.widths if own is None else own, reverse=True))

    def axes(self) -> dict[str, tuple]:
        """Return the axes this backbone declares: the stage (which each step's timestep decides) and the
        widths every decoder serves (what a subnet that leaves the stage to the step, or a search gene,
        may name; a decoder's other widths are named with their stage, e.g. stage=0,width=0.25)."""
        common = set(self.decoder_widths(0))
        for k in range(1, len(self.decoders)):
            common &= set(self.decoder_widths(k))
        return {"stage": tuple(range(len(self.decoders) - 1, -1, -1)), "width": tuple(sorted(common, reverse=True))}


def equal_stage_boundaries(stages: int, timesteps: int) -> tuple[int, ...]:
    """Return the K - 1 timesteps that split 0..timesteps-1 into `stages` spans of (nearly) equal length."""
    return tuple(int(round(k * timesteps / stages)) for k in range(1, stages))


ModelConfig = UNetConfig | DiTConfig | MultiStageConfig


@dataclass
class DiffusionConfig:
    """The forward noise process."""

    timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class SparsityConfig:
    """Sparse-to-sparse training (arXiv 2504.21380; `train.sparsity`): unstructured masks on every
    convolution and linear layer but the first and last, from the first step to the last.

    static: a fixed random mask (Static-DM); rigl: every `update_every` steps until `stop_at` of training,
    drop the `drop_fraction` (decayed by a cosine) of smallest-magnitude active weights per layer and regrow
    as many where the gradient is largest (RigL-DM, Evci et al. 2020); magran: the same drop, regrowth
    uniformly at random (MagRan-DM). `density` is the share of weights kept over the masked layers,
    spread evenly (uniform) or by Erdos-Renyi-Kernel (erk)."""

    method: str = "static"  # static | rigl | magran
    density: float = 0.5  # kept share of the masked weights, in (0, 1]
    update_every: int = 100  # steps between mask updates (RigL's delta T)
    drop_fraction: float = 0.3  # share of each layer's active weights dropped at the first update (RigL's
    #   alpha; the paper found 0.05 safer at high sparsity)
    distribution: str = "uniform"  # uniform | erk
    stop_at: float = 0.75  # share of train.steps after which the masks stay fixed (RigL's T_end)


@dataclass
class TrainConfig:
    """Supernet training: sandwich rule, distillation, EMA, checkpoints."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    sandwich_random: int = 1  # random subnets per step besides the largest and smallest
    distill_weight: float = 0.0  # 0 = no in-place distillation; 1 = smaller subnets learn only from the largest
    # Fine-tuning a supernet that exists (e.g. from import-diffusers): its weights start the run at step
    # 0 (same model section), and with teacher "frozen" every subnet, full size included, is distilled
    # (distill_weight) towards that model's own full-size outputs on the same inputs, as DDSM-style
    # fine-tuning of a pretrained model wants; "inplace" (default) distils from the largest subnet.
    init_from: str | None = None
    init_sha256: str | None = None  # the init supernet's hash (filled in by train; a resume must match it)
    teacher: str = "inplace"  # inplace | frozen (needs init_from)
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    sparsity: SparsityConfig | None = None  # None: dense (see SparsityConfig)


@dataclass
class SampleConfig:
    """Default sampler for sample grids and `ddsm-search sample`."""

    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    grid_size: int = 64  # images in each grid written after training
    batch_size: int = 500
    backend: str = "auto"  # how static subnets run: auto (the faster here, measured per subnet) | torch | fused


@dataclass
class SearchConfig:
    """The schedule search: space, objective measurement, algorithm and its size."""

    steps: int = 50  # the reference: full size under `sampler` over this many steps is 100% of the FLOPs
    sampler: str = "ddim"
    eta: float = 0.0
    # what the search chooses per schedule beside the subnets (empty: `sampler` with `eta`, at `steps`, on
    # the uniform grid): solvers by name and options ("ddim", "ddpm", "dpmsolver++", "dpmsolver++(order=3)",
    # "sde-dpmsolver++", "unipc", "euler"), numbers of steps, and timestep spacings (uniform: T-1 down to 0;
    # diffusers' linspace, leading, trailing)
    solvers: tuple[str, ...] = ()
    step_choices: tuple[int, ...] = ()
    spacings: tuple[str, ...] = ()
    axes: tuple[str, ...] | None = None  # the axes searched (default: every axis of the supernet); others stay full
    choices: dict[str, tuple[float, ...]] | None = None  # per axis, the choices searched (default: all)
    segments: int = 10  # consecutive steps that share one subnet; one gene per searched axis per segment
    # AdaDiff's dynamic exit (a DiT with exit heads): one more gene per segment, its certainty threshold,
    # "off" (static) or one of these; the depth gene is then the exit's cap. FLOPs are those executed.
    exit_thresholds: tuple[float, ...] | None = None
    # feature caching (DeepCache on a U-Net, block caching on a DiT): one more gene per segment, "off" or
    # a caching interval (a full step, then interval - 1 cached ones) with a branch (how much of the
    # network a cached step still runs: U-Net skip branches, DiT leading blocks); none: not searched
    cache_intervals: tuple[int, ...] = ()
    cache_branches: tuple[int, ...] = (1,)
    # Step-Adaptive Training's prior (step_groups.prior_schedule with K SNR groups) joins the first
    # generation beside the uniform schedules
    seed_prior: int | None = None
    budget: float | str | None = None  # max GFLOPs per image, or a share of full width such as "50%"
    algorithm: str = "nsga2"  # nsga2 | nevergrad | random
    population: int = 16
    generations: int = 8
    samples: int = 500  # images per evaluation, drawn from the "search" seed set
    screen_samples: int | None = None  # if set, screen every candidate on this many images first and
    screen_margin: float = 0.0  # fully evaluate it unless a cheaper evaluated schedule screened better by > margin
    metric: str = "fid"  # fid | kid | drift: the quality objective (drift: from full size on the same noise)
    drift_space: str = "auto"  # auto | features | pixels: where drift is measured (auto: features for digits)
    seed: int = 0
    workers: int = 2
    batch_size: int = 500
    backend: str = "auto"  # how the workers run subnets: auto | torch | fused (see sample.backend)
    # where evaluations run: pool (the search's own Ray actor pool) | tune (a Ray Tune experiment); not
    # "backend", which is taken by the kernel backend above
    executor: str = "pool"
    cost: str = "auto"  # FLOPs the search counts: dense | sparse (nonzero weights only) | auto (sparse for a sparse supernet)


@dataclass
class ExperimentConfig:
    """One experiment: data, supernet, diffusion process, training and sampling defaults."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig | DiTConfig | MultiStageConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def to_dict(self) -> dict:
        """Return the config as plain JSON-able data."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
