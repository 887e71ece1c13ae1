"""Typed experiment configs loaded from YAML; every error names the offending key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import DDSMError

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
MODEL_KINDS: dict[str, type] = {"unet": UNetConfig, "dit": DiTConfig, "multistage": MultiStageConfig}


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

    steps: int = 50  # sampling steps of every candidate schedule
    sampler: str = "ddim"
    eta: float = 0.0
    axes: tuple[str, ...] | None = None  # the axes searched (default: every axis of the supernet); others stay full
    choices: dict[str, tuple[float, ...]] | None = None  # per axis, the choices searched (default: all)
    segments: int = 10  # consecutive steps that share one subnet; one gene per searched axis per segment
    # AdaDiff's dynamic exit (a DiT with exit heads): one more gene per segment, its certainty threshold,
    # "off" (static) or one of these; the depth gene is then the exit's cap. FLOPs are those executed.
    exit_thresholds: tuple[float, ...] | None = None
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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp` and return it in that type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == set(MODEL_KINDS.values()):
        kind = value.get("kind", "unet") if isinstance(value, dict) else "unet"  # not a mapping: _build says so
        if kind not in MODEL_KINDS:
            raise DDSMError(f"{key}.kind: expected {' or '.join(MODEL_KINDS)}, got {kind!r}")
        return _build(MODEL_KINDS[kind], value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        section = None  # a mapping for an optional section (train.sparsity): its own error names the key
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DDSMError as exc:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    section = section or exc
        if section is not None:
            raise section
        raise DDSMError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DDSMError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise DDSMError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DDSMError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise DDSMError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DDSMError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise DDSMError(f"unknown key '{full}' (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Return a validated ExperimentConfig built from plain data."""
    cfg = _build(ExperimentConfig, data, "")
    m = cfg.model
    T = cfg.diffusion.timesteps
    if isinstance(m, MultiStageConfig) and m.stage_boundaries is None and 1 <= len(m.decoders) <= T:
        cfg.model = dataclasses.replace(m, stage_boundaries=equal_stage_boundaries(len(m.decoders), T))
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Return the validated experiment config stored in a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise DDSMError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise DDSMError(f"{path} is not a text file (expected a YAML experiment)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DDSMError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise DDSMError(f"{path} is empty (expected a YAML experiment: see search_spaces/digits.yaml)")
    try:
        return config_from_dict(data)
    except DDSMError as exc:
        raise DDSMError(f"{path}: {exc}") from None


def channels_at(full: int, width: float) -> int:
    """Return the active channel count of a layer with `full` channels at `width`."""
    return max(1, int(round(full * width)))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise DDSMError(message)


def _validate_widths(m) -> None:
    _check(len(m.widths) > 0, "model.widths: must list at least one width")
    _check(len(set(m.widths)) == len(m.widths), "model.widths: widths must be distinct")
    _check(all(0.0 < w <= 1.0 for w in m.widths), "model.widths: every width must be in (0, 1]")
    _check(max(m.widths) == 1.0, "model.widths: must include 1.0 (the full network)")
    _check(0.0 <= m.dropout < 1.0, "model.dropout: must be in [0, 1)")


def validate_unet(m: UNetConfig) -> None:
    """Raise DDSMError naming the key if a U-Net config is out of range."""
    _check(m.base_channels > 0 and m.base_channels % 2 == 0,
           "model.base_channels: must be a positive even number (the time embedding has sine and cosine halves)")
    _check(m.group_size >= 1, "model.group_size: must be at least 1 (channels per GroupNorm group)")
    _check(m.head_dim >= 1, "model.head_dim: must be at least 1 (channels per attention head)")
    _check(len(m.channel_mults) > 0 and all(c > 0 for c in m.channel_mults), "model.channel_mults: must be a non-empty list of positive ints")
    _check(m.num_res_blocks >= 1, "model.num_res_blocks: must be at least 1")
    _check(m.norm_groups is None or m.norm_groups >= 1, "model.norm_groups: must be at least 1 (or null)")
    _check(m.norm_eps > 0, "model.norm_eps: must be positive")
    _check(m.attn_heads is None or m.attn_heads >= 1, "model.attn_heads: must be at least 1 (or null)")
    _check(m.time_conditioning in ("scale_shift", "additive"),
           f"model.time_conditioning: expected scale_shift or additive, got {m.time_conditioning!r}")
    _check(m.freq_shift < m.base_channels // 2, "model.freq_shift: must be below model.base_channels / 2")
    _check(m.mid_scale > 0, "model.mid_scale: must be positive")
    _check(m.downsample_padding in (0, 1), f"model.downsample_padding: expected 0 or 1, got {m.downsample_padding}")
    _validate_widths(m)
    for w in m.widths:
        for mult in m.channel_mults:
            full = m.base_channels * mult
            c = channels_at(full, w)
            if m.norm_groups is None:
                group, key = m.group_size, f"model.group_size={m.group_size}"
            else:
                _check(full % m.norm_groups == 0, f"model.norm_groups: {m.norm_groups} groups do not divide the "
                                                  f"{full} channels of a level")
                group, key = full // m.norm_groups, f"its {full // m.norm_groups} channels per group (model.norm_groups)"
            _check(
                abs(c - full * w) < 1e-6 and c % group == 0,
                f"model.widths: width {w} gives {full * w:g} channels at a level with {full}; it must be a whole "
                f"multiple of {key}",
            )


def validate_dit(m: DiTConfig) -> None:
    """Raise DDSMError naming the key if a DiT config is out of range."""
    _check(m.patch_size >= 1, "model.patch_size: must be at least 1")
    _check(m.head_dim >= 1, "model.head_dim: must be at least 1 (channels per attention head)")
    _check(m.hidden_size >= 2 and m.hidden_size % 2 == 0,
           "model.hidden_size: must be a positive even number (the position and time embeddings have sine and "
           "cosine halves)")
    _check(m.hidden_size % m.head_dim == 0,
           f"model.head_dim: {m.head_dim} does not divide model.hidden_size={m.hidden_size}")
    _check(m.blocks >= 1, "model.blocks: must be at least 1")
    _check(m.mlp_ratio > 0, "model.mlp_ratio: must be positive")
    _validate_widths(m)
    mlp = int(round(m.hidden_size * m.mlp_ratio))
    for w in m.widths:
        inner = m.hidden_size * w
        _check(abs(inner - round(inner)) < 1e-6 and int(round(inner)) % m.head_dim == 0,
               f"model.widths: width {w} gives {inner:g} attention channels of {m.hidden_size}; it must be a whole "
               f"number of heads of model.head_dim={m.head_dim}")
        _check(abs(mlp * w - round(mlp * w)) < 1e-6,
               f"model.widths: width {w} gives {mlp * w:g} of the {mlp} MLP channels; it must be a whole number")
    depths = m.depth_choices
    _check(len(depths) > 0 and all(1 <= d <= m.blocks for d in depths),
           f"model.depths: every depth must be between 1 and model.blocks={m.blocks}")
    _check(max(depths) == m.blocks, f"model.depths: must include model.blocks={m.blocks} (the full network)")


def _validate_width_list(widths, key: str) -> None:
    _check(len(widths) > 0, f"{key}: must list at least one width")
    _check(len(set(widths)) == len(widths), f"{key}: widths must be distinct")
    _check(all(0.0 < w <= 1.0 for w in widths), f"{key}: every width must be in (0, 1]")
    _check(max(widths) == 1.0, f"{key}: must include 1.0 (the full network)")


def validate_multistage(m: MultiStageConfig, timesteps: int) -> None:
    """Raise DDSMError naming the key if a multi-stage U-Net config is out of range or inconsistent."""
    _check(m.base_channels > 0 and m.base_channels % 2 == 0,
           "model.base_channels: must be a positive even number (the time embedding has sine and cosine halves)")
    _check(m.group_size >= 1, "model.group_size: must be at least 1 (channels per GroupNorm group)")
    _check(m.head_dim >= 1, "model.head_dim: must be at least 1 (channels per attention head)")
    _check(len(m.channel_mults) > 0 and all(c > 0 for c in m.channel_mults),
           "model.channel_mults: must be a non-empty list of positive ints")
    _check(m.num_res_blocks >= 1, "model.num_res_blocks: must be at least 1")
    _check(0.0 <= m.dropout < 1.0, "model.dropout: must be in [0, 1)")
    _validate_width_list(m.widths, "model.widths")
    for mult in m.channel_mults:  # the encoder runs at full width only
        _check(m.base_channels * mult % m.group_size == 0,
               f"model.base_channels: the encoder's level of {m.base_channels * mult} channels is not a whole "
               f"multiple of model.group_size={m.group_size}")
    k = len(m.decoders)
    _check(k >= 1, "model.decoders: must list at least one decoder (one per stage, low noise first)")
    _check(k <= timesteps, f"model.decoders: {k} stages need at least {k} diffusion.timesteps, not {timesteps}")
    for i, dec in enumerate(m.decoders):
        key = f"model.decoders[{i}]"
        _check(dec.channels >= 1, f"{key}.channels: must be at least 1")
        if dec.widths is not None:
            _validate_width_list(dec.widths, f"{key}.widths")
        for w in m.decoder_widths(i):
            for mult in m.channel_mults:
                full = dec.channels * mult
                c = channels_at(full, w)
                _check(abs(c - full * w) < 1e-6 and c % m.group_size == 0,
                       f"{key}.widths: width {w} gives {full * w:g} channels at a level with {full}; it must be a "
                       f"whole multiple of model.group_size={m.group_size}")
    b = m.stage_boundaries
    if b is None:  # filled in by config_from_dict; a config built in code may leave it to the backbone
        return
    _check(len(b) == k - 1, f"model.stage_boundaries: {k} decoders need {k - 1} boundaries (the timesteps where "
                            f"stages change), got {len(b)}")
    _check(all(x < y for x, y in zip(b, b[1:])), f"model.stage_boundaries: must be strictly increasing, got {list(b)}")
    _check(all(1 <= x <= timesteps - 1 for x in b),
           f"model.stage_boundaries: every boundary must be a timestep between 1 and {timesteps - 1} "
           f"(diffusion.timesteps={timesteps}), got {list(b)}")


def validate(cfg: ExperimentConfig) -> None:
    """Raise DDSMError naming the key if values are out of range or inconsistent."""
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    _check(cfg.data.kind in ("digits", "cifar10", "folder"), f"data.kind: expected digits, cifar10 or folder, got {cfg.data.kind!r}")
    _check(cfg.data.limit is None or cfg.data.limit >= 1, "data.limit: must be at least 1")
    if m.kind == "multistage":
        validate_multistage(m, d.timesteps)
    else:
        (validate_dit if m.kind == "dit" else validate_unet)(m)
    _check(d.timesteps >= 2, "diffusion.timesteps: must be at least 2")
    _check(d.beta_schedule in ("linear", "cosine"), f"diffusion.beta_schedule: expected linear or cosine, got {d.beta_schedule!r}")
    _check(0.0 < d.beta_start < d.beta_end < 1.0, "diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1")
    _check(t.steps >= 1, "train.steps: must be at least 1")
    _check(t.batch_size >= 1, "train.batch_size: must be at least 1")
    _check(t.lr > 0, "train.lr: must be positive")
    _check(t.grad_clip > 0, "train.grad_clip: must be positive (the largest gradient norm kept)")
    _check(t.weight_decay >= 0, "train.weight_decay: must be >= 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay: must be in [0, 1)")
    _check(t.sandwich_random >= 0, "train.sandwich_random: must be >= 0")
    _check(0.0 <= t.distill_weight <= 1.0, "train.distill_weight: must be in [0, 1]")
    _check(t.teacher in ("inplace", "frozen"), f"train.teacher: expected inplace or frozen, got {t.teacher!r}")
    _check(t.teacher != "frozen" or t.init_from is not None,
           "train.teacher: frozen distils from the model given by train.init_from; set it")
    _check(t.checkpoint_every >= 1 and t.log_every >= 1, "train.checkpoint_every/log_every: must be at least 1")
    if t.sparsity is not None:
        validate_sparsity(t.sparsity)
    # search.cost is checked here, beside the sparsity it is about (validate_search is the search's own)
    _check(cfg.search.cost in COST_CHOICES, f"search.cost: expected {', '.join(COST_CHOICES)}, got {cfg.search.cost!r}")
    _check(s.sampler in ("ddim", "ddpm"), f"sample.sampler: expected ddim or ddpm, got {s.sampler!r}")
    _check(1 <= s.steps <= d.timesteps, f"sample.steps: must be between 1 and diffusion.timesteps={d.timesteps}")
    _check(s.eta >= 0.0, "sample.eta: must be >= 0")
    _check(s.backend in BACKEND_CHOICES, f"sample.backend: expected {', '.join(BACKEND_CHOICES)}, got {s.backend!r}")
    validate_search(cfg)


COST_CHOICES = ("auto", "dense", "sparse")


def validate_sparsity(p: SparsityConfig) -> None:
    """Raise DDSMError naming the key if train.sparsity is out of range."""
    _check(p.method in ("static", "rigl", "magran"),
           f"train.sparsity.method: expected static, rigl or magran, got {p.method!r}")
    _check(0.0 < p.density <= 1.0, f"train.sparsity.density: must be in (0, 1] (the share of weights kept), got {p.density}")
    _check(p.distribution in ("uniform", "erk"),
           f"train.sparsity.distribution: expected uniform or erk, got {p.distribution!r}")
    _check(p.update_every >= 1, f"train.sparsity.update_every: must be at least 1, got {p.update_every}")
    _check(0.0 <= p.drop_fraction < 1.0, f"train.sparsity.drop_fraction: must be in [0, 1), got {p.drop_fraction}")
    _check(0.0 <= p.stop_at <= 1.0, f"train.sparsity.stop_at: must be in [0, 1] (a share of train.steps), got {p.stop_at}")


def validate_search(cfg: ExperimentConfig) -> None:
    """Raise DDSMError naming the key if the search section is out of range."""
    q = cfg.search
    _check(q.sampler in ("ddim", "ddpm"), f"search.sampler: expected ddim or ddpm, got {q.sampler!r}")
    _check(1 <= q.steps <= cfg.diffusion.timesteps, f"search.steps: must be between 1 and diffusion.timesteps={cfg.diffusion.timesteps}")
    _check(1 <= q.segments <= q.steps, f"search.segments: must be between 1 and search.steps={q.steps}")
    _check(q.eta >= 0.0, "search.eta: must be >= 0")
    axes = cfg.model.axes()
    for axis in q.axes or ():
        _check(axis in axes, f"search.axes: {axis!r} is not an axis of the {cfg.model.kind} (axes: {', '.join(axes)})")
    _check(q.axes is None or len(q.axes) > 0, "search.axes: must name at least one axis")
    for axis, values in (q.choices or {}).items():
        _check(axis in axes, f"search.choices: {axis!r} is not an axis of the {cfg.model.kind} (axes: {', '.join(axes)})")
        missing = [v for v in values if not any(abs(v - c) < 1e-9 for c in axes[axis])]
        _check(not missing and len(values) > 0,
               f"search.choices.{axis}: {missing or '[]'} not among the supernet's {axis} choices {list(axes[axis])}")
    _check("stage" not in (q.axes or ()) and "stage" not in (q.choices or {}),
           f"search.{'axes' if 'stage' in (q.axes or ()) else 'choices'}: the stage of a multistage supernet "
           "follows each step's timestep (model.stage_boundaries); it is not searched")
    _check(q.seed_prior is None or q.seed_prior >= 1, "search.seed_prior: must be at least 1 (SNR groups) or null")
    if q.exit_thresholds is not None:
        _check(cfg.model.kind == "dit", f"search.exit_thresholds: early exit needs a DiT (model.kind: dit), "
                                        f"not a {cfg.model.kind}")
        _check(len(q.exit_thresholds) > 0 and all(math.isfinite(t) and 0 <= t <= 1 for t in q.exit_thresholds)
               and len(set(q.exit_thresholds)) == len(q.exit_thresholds),
               f"search.exit_thresholds: expected distinct certainties in [0, 1], got {list(q.exit_thresholds)}")
    _check(q.algorithm in ("nsga2", "nevergrad", "random"), f"search.algorithm: expected nsga2, nevergrad or random, got {q.algorithm!r}")
    _check(q.population >= 2, "search.population: must be at least 2")
    _check(q.generations >= 1, "search.generations: must be at least 1")
    _check(q.samples >= 2, "search.samples: must be at least 2")
    _check(q.screen_samples is None or 2 <= q.screen_samples < q.samples,
           "search.screen_samples: must be at least 2 and below search.samples")
    _check(q.screen_margin >= 0, "search.screen_margin: must be >= 0")
    _check(q.metric in ("fid", "kid", "drift"), f"search.metric: expected fid, kid or drift, got {q.metric!r}")
    _check(q.drift_space in ("auto", "features", "pixels"),
           f"search.drift_space: expected auto, features or pixels, got {q.drift_space!r}")
    _check(q.workers >= 0, "search.workers: must be >= 0 (0 = evaluate in this process, without Ray)")
    _check(q.batch_size >= 1, "search.batch_size: must be at least 1")
    _check(q.backend in BACKEND_CHOICES, f"search.backend: expected {', '.join(BACKEND_CHOICES)}, got {q.backend!r}")
    _check(q.executor in ("pool", "tune"), f"search.executor: expected pool or tune, got {q.executor!r}")
    _check(q.executor != "tune" or q.workers >= 1, "search.workers: the tune executor runs every evaluation on "
           "Ray: needs at least 1 worker (0 evaluates in this process, with the pool executor only)")
    if q.budget is not None:
        parse_budget(q.budget, "search.budget")


def parse_budget(budget: float | str, key: str = "--budget") -> tuple[float, bool]:
    """Return (value, is_percent) for a budget given as GFLOPs per image or as a percentage like "50%"."""
    text = str(budget).strip()
    is_percent = text.endswith("%")
    try:
        value = float(text[:-1] if is_percent else text)
    except ValueError:
        raise DDSMError(f"{key}: expected GFLOPs per image (e.g. 1.2) or a percentage (e.g. 50%), got {budget!r}") from None
    _check(value > 0 and (not is_percent or value <= 100), f"{key}: must be positive (and at most 100%), got {budget!r}")
    return value, is_percent


def budget_gflops(budget: float | str, full_gflops: float) -> float:
    """Return a budget given as GFLOPs per image or as "NN%" of full width, in GFLOPs per image."""
    value, is_percent = parse_budget(budget)
    return full_gflops * value / 100 if is_percent else value
