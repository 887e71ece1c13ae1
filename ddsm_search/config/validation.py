"""Validating an experiment config: ranges and consistency, each error naming the key."""

from __future__ import annotations

import math

from ..errors import DDSMError
from .schema import BACKEND_CHOICES, DiTConfig, ExperimentConfig, MultiStageConfig, SparsityConfig, UNetConfig


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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_search(cfg: ExperimentConfig) -> None:
    """Raise DDSMError naming the key if the search section is out of range."""
    q = cfg.search
    _check(q.sampler in ("ddim", "ddpm"), f"search.sampler: expected ddim or ddpm, got {q.sampler!r}")
    _check(1 <= q.steps <= cfg.diffusion.timesteps, f"search.steps: must be between 1 and diffusion.timesteps={cfg.diffusion.timesteps}")
    _check(1 <= q.segments <= max([q.steps, *q.step_choices]),
           f"search.segments: must be between 1 and the most sampling steps ({max([q.steps, *q.step_choices])})")
    _check(all(1 <= n <= cfg.diffusion.timesteps for n in q.step_choices) and len(set(q.step_choices)) == len(q.step_choices),
           f"search.step_choices: distinct numbers of steps between 1 and diffusion.timesteps="
           f"{cfg.diffusion.timesteps}, got {list(q.step_choices)}")
    _check(all(s in ("uniform", "linspace", "leading", "trailing") for s in q.spacings)
           and len(set(q.spacings)) == len(q.spacings),
           f"search.spacings: distinct spacings among uniform, linspace, leading, trailing, got {list(q.spacings)}")
    _check(len(set(q.solvers)) == len(q.solvers), f"search.solvers: each solver once, got {list(q.solvers)}")
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
    _check(all(_whole(n) and n >= 2 for n in q.cache_intervals) and len(set(q.cache_intervals)) == len(q.cache_intervals),
           f"search.cache_intervals: distinct whole numbers of steps >= 2 (a full step, then interval - 1 cached "
           f"ones), got {list(q.cache_intervals)}")
    _check(len(q.cache_branches) > 0 and all(_whole(b) and b >= 1 for b in q.cache_branches)
           and len(set(q.cache_branches)) == len(q.cache_branches),
           f"search.cache_branches: distinct whole numbers >= 1, got {list(q.cache_branches)}")
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
