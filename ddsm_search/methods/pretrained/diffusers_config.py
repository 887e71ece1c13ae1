"""Translate a diffusers UNet2DModel's config.json (and its scheduler's) into this toolkit's configs, or
refuse, in one line naming the block or key, what the slimmable U-Net cannot express.

Supported: the DDPM/ADM family of `UNet2DModel`, i.e. DownBlock2D / AttnDownBlock2D down, UpBlock2D /
AttnUpBlock2D up (attention at any levels of either side), a UNetMidBlock2D with or without its
attention, "positional" timestep features with any flip_sin_to_cos and freq_shift, SiLU, "default"
(additive) or "scale_shift" time conditioning, norm_num_groups and norm_eps, attention_head_dim (or
null: one head), downsample_padding 0 or 1, mid_block_scale_factor, center_input_sample, dropout, and
block_out_channels that are whole multiples of the first.
"""

from __future__ import annotations

import inspect

from ...config import DiffusionConfig, UNetConfig
from ...errors import DDSMError

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ATTENTION_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D")


def unet2d_class():
    """Return diffusers' UNet2DModel class, or raise DDSMError saying why diffusers does not import."""
    from ...solvers.schedulers import diffusers_failure

    try:
        from diffusers import UNet2DModel
    except (ImportError, RuntimeError) as exc:
        raise DDSMError(f"import-diffusers needs diffusers, but {diffusers_failure(exc)}") from None
    return UNet2DModel


def diffusers_defaults() -> dict:
    """Return UNet2DModel's constructor defaults: config.json may leave any key out."""
    params = inspect.signature(unet2d_class().__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def _refuse(cond: bool, message: str) -> None:
    if cond:
        raise DDSMError(f"cannot import this UNet2DModel: {message}")


def _block_type(name) -> str:
    name = str(name)
    return name[7:] if name.startswith("UNetRes") else name  # as diffusers' get_down_block / get_up_block


def _check_blocks(c: dict) -> tuple[list[str], list[str]]:
    """Return the down and up block types, or refuse the first that cannot be mapped."""
    down = [_block_type(b) for b in c["down_block_types"]]
    up = [_block_type(b) for b in c["up_block_types"]]
    for i, block in enumerate(down):
        _refuse(block not in DOWN_BLOCKS, f"down_block_types[{i}] is {block} (supported: {', '.join(DOWN_BLOCKS)})")
    for i, block in enumerate(up):
        _refuse(block not in UP_BLOCKS, f"up_block_types[{i}] is {block} (supported: {', '.join(UP_BLOCKS)})")
    _refuse(len(down) != len(up) or len(down) != len(c["block_out_channels"]),
            "down_block_types, up_block_types and block_out_channels differ in length")
    mid = c["mid_block_type"]
    _refuse(mid != "UNetMidBlock2D", f"mid_block_type is {mid} (supported: UNetMidBlock2D)")
    return down, up


def _check_options(c: dict) -> None:
    """Refuse the first global option that has no counterpart in the slimmable U-Net."""
    _refuse(c.get("_class_name", "UNet2DModel") != "UNet2DModel",
            f"config.json describes a {c.get('_class_name')}, not a UNet2DModel")
    _refuse(c["time_embedding_type"] != "positional",
            f"time_embedding_type is {c['time_embedding_type']!r} (supported: positional)")
    _refuse(c["class_embed_type"] is not None or c["num_class_embeds"] is not None,
            f"class embeddings (class_embed_type {c['class_embed_type']!r}, num_class_embeds "
            f"{c['num_class_embeds']!r}): class-conditional models are not supported")
    _refuse(c["act_fn"] not in ("silu", "swish"), f"act_fn is {c['act_fn']!r} (supported: silu)")
    _refuse(c["resnet_time_scale_shift"] not in ("default", "scale_shift"),
            f"resnet_time_scale_shift is {c['resnet_time_scale_shift']!r} (supported: default, scale_shift)")
    _refuse(c["downsample_type"] != "conv", f"downsample_type is {c['downsample_type']!r} (supported: conv)")
    _refuse(c["upsample_type"] != "conv", f"upsample_type is {c['upsample_type']!r} (supported: conv)")
    _refuse(c["downsample_padding"] not in (0, 1),
            f"downsample_padding is {c['downsample_padding']!r} (supported: 0, 1)")
    _refuse(c["in_channels"] != c["out_channels"],
            f"out_channels {c['out_channels']} differs from in_channels {c['in_channels']} (the U-Net predicts noise "
            "of the image's shape)")
    _refuse(not isinstance(c["norm_num_groups"], int) or c["norm_num_groups"] < 1,
            f"norm_num_groups is {c['norm_num_groups']!r} (expected a number of groups)")
    head = c["attention_head_dim"]
    _refuse(head is not None and (not isinstance(head, int) or head < 1),
            f"attention_head_dim is {head!r} (expected one number, or null for one head)")


def _image_shape(c: dict, image_size: int | None) -> tuple[int, int, int]:
    size = c["sample_size"] if image_size is None else image_size
    _refuse(size is None, "config.json has no sample_size (give the image size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(c["in_channels"]), int(h), int(w)


def unet_config(config: dict, widths: tuple[float, ...], image_size: int | None = None
                ) -> tuple[UNetConfig, tuple[int, int, int]]:
    """Return the UNetConfig that reproduces a UNet2DModel config and the image shape (C, H, W) it takes;
    raise DDSMError naming the first block or option that cannot be mapped."""
    c = {**diffusers_defaults(), **config}
    _check_options(c)
    down, up = _check_blocks(c)
    shape = _image_shape(c, image_size)
    channels = [int(v) for v in c["block_out_channels"]]
    base = channels[0]
    _refuse(any(v % base for v in channels),
            f"block_out_channels {channels} are not whole multiples of the first ({base})")
    _refuse(c["time_embedding_dim"] not in (None, 4 * base),
            f"time_embedding_dim is {c['time_embedding_dim']} (supported: 4 x block_out_channels[0] = {4 * base})")
    groups = c["norm_num_groups"]
    for v in channels:
        _refuse(v % groups, f"norm_num_groups {groups} does not divide {v} channels")
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    attn_groups = c["attn_norm_num_groups"]
    _refuse(attn_groups not in (None, groups),
            f"attn_norm_num_groups {attn_groups} differs from norm_num_groups {groups}")
    # diffusers' mid attention has a GroupNorm only with "default" or an explicit attn_norm_num_groups
    mid_norm = attn_groups is not None or not scale_shift
    attention = [level for level, block in enumerate(down) if block in ATTENTION_BLOCKS]
    up_attention = [len(up) - 1 - i for i, block in enumerate(up) if block in ATTENTION_BLOCKS]  # by level
    head = c["attention_head_dim"]
    if head is not None:
        levels = sorted(set(attention + up_attention))
        for v in [channels[level] for level in levels] + ([channels[-1]] if c["add_attention"] else []):
            _refuse(v % head, f"attention_head_dim {head} does not divide the {v} channels of an attention layer")
    cfg = UNetConfig(
        base_channels=base,
        channel_mults=tuple(v // base for v in channels),
        num_res_blocks=int(c["layers_per_block"]),
        attention_resolutions=tuple(shape[1] // 2**level for level in attention),
        up_attention_resolutions=(None if sorted(up_attention) == attention
                                  else tuple(shape[1] // 2**level for level in sorted(up_attention))),
        dropout=float(c["dropout"]),
        group_size=channels[0] // groups,  # unused with norm_groups; kept consistent
        head_dim=int(head) if head is not None else UNetConfig.head_dim,
        widths=tuple(widths),
        norm_groups=groups,
        norm_eps=float(c["norm_eps"]),
        attn_heads=1 if head is None else None,
        time_conditioning="scale_shift" if scale_shift else "additive",
        emb_act=True,
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]),
        mid_attention=bool(c["add_attention"]),
        mid_attn_norm=mid_norm,
        mid_scale=float(c["mid_block_scale_factor"]),
        downsample_padding=int(c["downsample_padding"]),
        center_input=bool(c["center_input_sample"]),
    )
    return cfg, shape


def diffusion_config(scheduler: dict | None) -> DiffusionConfig | None:
    """Return the noise process of a diffusers scheduler config (None without one), or raise DDSMError."""
    if scheduler is None:
        return None
    prediction = scheduler.get("prediction_type", "epsilon")
    _refuse(prediction != "epsilon", f"the scheduler predicts {prediction!r}; the samplers here take predicted noise "
                                     "(epsilon)")
    _refuse(scheduler.get("trained_betas") is not None, "the scheduler has trained_betas (supported: linear, "
                                                        "squaredcos_cap_v2)")
    kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = scheduler.get("beta_schedule", "linear")
    _refuse(kind not in kinds, f"the scheduler's beta_schedule is {kind!r} (supported: {', '.join(kinds)})")
    return DiffusionConfig(timesteps=int(scheduler.get("num_train_timesteps", 1000)), beta_schedule=kinds[kind],
                           beta_start=float(scheduler.get("beta_start", 1e-4)),
                           beta_end=float(scheduler.get("beta_end", 0.02)))
