"""Import a diffusers UNet2DModel (saved with `save_pretrained`) as a slimmable U-Net supernet.

    import_diffusers("ddpm-cifar10-32/unet", "results/ddpm-cifar10")   # or the pipeline folder
    ddsm-search import-diffusers MODEL_DIR --out DIR [--widths 1,0.75,0.5,0.25] [--importance N]

The supernet is written as `train` writes one (supernet.safetensors, train_state.safetensors, meta.json
of version 2, hashes included), so `load_supernet`, search, sample and export take it as they take a
trained one. At full width it is the diffusers model: before anything is written the importer runs both
on the same noise at several timesteps and refuses a difference above 1e-4 (relative). Smaller widths
keep the leading channels of every layer; `--importance N` first orders channels by Taylor importance
on N training images (`imports.importance`) so that they keep the ones that matter most. The slimmed
subnets are untrained as such: fine-tune them with the sandwich rule before trusting their samples.

Which configs map, and which are refused with a one-line DDSMError, is in `diffusers_config`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ...config import DataConfig, ExperimentConfig, UNetConfig, config_from_dict, load_config
from ...errors import DDSMError
from ...io import read_json, write_json_atomic
from .diffusers_config import diffusion_config, unet2d_class, unet_config

__all__ = ["DEFAULT_WIDTHS", "IMPORT_FILE", "copy_weights", "differences", "import_diffusers", "locate"]

DEFAULT_WIDTHS = (1.0, 0.75, 0.5, 0.25)
IMPORT_FILE = "import.json"  # where the supernet came from and how closely it matched
TOLERANCE = 1e-4  # relative to the largest output: float32 sums in another order stay far below it


def locate(model_dir: str | Path) -> tuple[Path, Path | None]:
    """Return (the folder holding the UNet's config.json, its scheduler_config.json or None) for a UNet
    folder or a pipeline folder with unet/ and scheduler/; raise DDSMError if there is neither."""
    path = Path(model_dir)
    if not path.is_dir():
        raise DDSMError(f"MODEL_DIR not found or not a directory: {path}")
    if (path / "config.json").is_file():
        unet, pipeline = path, path.parent if (path.parent / "model_index.json").is_file() else None
    elif (path / "unet" / "config.json").is_file():
        unet, pipeline = path / "unet", path
    else:
        raise DDSMError(f"{path} has no config.json (expected a UNet2DModel saved with save_pretrained, or a "
                        "pipeline folder with unet/)")
    scheduler = pipeline / "scheduler" / "scheduler_config.json" if pipeline is not None else None
    return unet, scheduler if scheduler is not None and scheduler.is_file() else None


def load_diffusers(unet_dir: Path) -> nn.Module:
    """Return the UNet2DModel in `unet_dir` (eval mode, float32), or raise DDSMError if diffusers cannot."""
    from diffusers.utils import logging

    UNet2DModel = unet2d_class()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its advice (attention_head_dim=None, accelerate) is not for our users
    try:
        model = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; the user needs its message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DDSMError(f"diffusers could not load the UNet2DModel in {unet_dir}: {first}") from None
    finally:
        logging.set_verbosity(verbosity)
    return model.float().eval()


# --- weights ------------------------------------------------------------------------------------------

def _copy(dst: nn.Module, src: nn.Module, where: str, weight: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> None:
    """Copy a layer's weight (a linear's into a 1x1 convolution) and bias (zeros where it has none)."""
    w = (src.weight if weight is None else weight).detach()
    if dst.weight.dim() == 4 and w.dim() == 2:
        w = w[:, :, None, None]
    if tuple(w.shape) != tuple(dst.weight.shape):
        raise DDSMError(f"cannot import this UNet2DModel: {where} has shape {tuple(w.shape)} where the supernet's "
                        f"layer has {tuple(dst.weight.shape)}")
    dst.weight.copy_(w)
    if dst.bias is not None:
        b = bias if bias is not None else getattr(src, "bias", None)
        dst.bias.copy_(b.detach() if b is not None else torch.zeros_like(dst.bias))


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DDSMError(f"cannot import this UNet2DModel: {where} {what}")


def _resnet(ours, theirs, where: str) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    _check(type(theirs) is ResnetBlock2D, where, f"is a {type(theirs).__name__}, not a ResnetBlock2D")
    _check((theirs.time_embedding_norm == "default") == ours.additive, where,
           f"has time_embedding_norm {theirs.time_embedding_norm!r}")
    _check(not theirs.skip_time_act and theirs.time_emb_proj is not None, where, "has no SiLU time projection")
    _check(float(theirs.output_scale_factor) == ours.out_scale, where,
           f"has output_scale_factor {theirs.output_scale_factor}")
    _check(theirs.upsample is None and theirs.downsample is None, where, "resamples inside the block")
    _check(isinstance(theirs.nonlinearity, nn.SiLU), where, f"uses {type(theirs.nonlinearity).__name__}")
    for name in ("norm1", "norm2"):
        a, b = getattr(ours, name), getattr(theirs, name)
        _check(a.num_groups == b.num_groups and a.eps == b.eps, f"{where}.{name}",
               f"has {b.num_groups} groups, eps {b.eps}")
    _copy(ours.norm1, theirs.norm1, f"{where}.norm1")
    _copy(ours.conv1, theirs.conv1, f"{where}.conv1")
    _copy(ours.emb, theirs.time_emb_proj, f"{where}.time_emb_proj")
    _copy(ours.norm2, theirs.norm2, f"{where}.norm2")
    _copy(ours.conv2, theirs.conv2, f"{where}.conv2")
    if theirs.conv_shortcut is not None:
        _check(isinstance(ours.skip, nn.Conv2d), where, "has a shortcut convolution where the U-Net adds its input")
        _copy(ours.skip, theirs.conv_shortcut, f"{where}.conv_shortcut")
    elif isinstance(ours.skip, nn.Conv2d):  # a concatenated input of the output's size: diffusers adds it
        eye = torch.eye(ours.skip.weight.shape[0], ours.skip.weight.shape[1])
        _copy(ours.skip, ours.skip, f"{where}.shortcut", weight=eye, bias=torch.zeros(eye.shape[0]))


def _attention(ours, theirs, where: str) -> None:
    from diffusers.models.attention_processor import Attention

    _check(type(theirs) is Attention and not theirs.is_cross_attention, where, "is not self-attention")
    _check(theirs.residual_connection and theirs.spatial_norm is None and theirs.norm_q is None, where,
           "is not a plain residual self-attention")
    _check(float(theirs.rescale_output_factor) == ours.out_scale, where,
           f"has rescale_output_factor {theirs.rescale_output_factor}")
    c = ours.proj.weight.shape[0]
    heads = ours.heads or c // ours.head_dim
    _check(theirs.heads == heads and theirs.to_q.weight.shape[0] == c, where, f"has {theirs.heads} heads")
    _check((theirs.group_norm is None) == isinstance(ours.norm, nn.Identity), where, "differs in its GroupNorm")
    if theirs.group_norm is not None:
        _check(theirs.group_norm.num_groups == ours.norm.num_groups and theirs.group_norm.eps == ours.norm.eps,
               f"{where}.group_norm", f"has {theirs.group_norm.num_groups} groups, eps {theirs.group_norm.eps}")
        _copy(ours.norm, theirs.group_norm, f"{where}.group_norm")
    layers = (theirs.to_q, theirs.to_k, theirs.to_v)
    bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.weight.shape[0]) for p in layers])
    _copy(ours.qkv, theirs.to_q, f"{where}.to_q/to_k/to_v", weight=torch.cat([p.weight for p in layers]), bias=bias)
    _copy(ours.proj, theirs.to_out[0], f"{where}.to_out.0")


def _stages(ours, blocks, prefix: str, resample: str) -> None:
    """Copy diffusers' down or up blocks into the U-Net's stages (ResBlock + attention, then resampling)."""
    stages = iter(ours)
    for level, block in enumerate(blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            stage = next(stages, None)
            where = f"{prefix}.{level}"
            _check(isinstance(stage, nn.ModuleList) and len(stage) == 1 + (attentions is not None), where,
                   "does not match the U-Net's layout")
            _resnet(stage[0], resnet, f"{where}.resnets.{j}")
            if attentions is not None:
                _attention(stage[1], attentions[j], f"{where}.attentions.{j}")
        samplers = getattr(block, resample)
        if samplers is not None:
            stage = next(stages, None)
            _check(hasattr(stage, "conv") and len(samplers) == 1, f"{prefix}.{level}.{resample}", "do not match")
            _copy(stage.conv, samplers[0].conv, f"{prefix}.{level}.{resample}.0.conv")
    _check(next(stages, None) is None, prefix, "has fewer blocks than the U-Net")


def copy_weights(theirs: nn.Module, ours: nn.Module) -> None:
    """Copy every weight of the diffusers model into the supernet of the same shape; raise DDSMError
    where a layer does not correspond."""
    with torch.no_grad():
        _copy(ours.time_mlp[0], theirs.time_embedding.linear_1, "time_embedding.linear_1")
        _copy(ours.time_mlp[2], theirs.time_embedding.linear_2, "time_embedding.linear_2")
        _check(isinstance(theirs.time_embedding.act, nn.SiLU), "time_embedding", "does not use SiLU")
        _copy(ours.conv_in, theirs.conv_in, "conv_in")
        _stages(ours.down, theirs.down_blocks, "down_blocks", "downsamplers")
        mid = theirs.mid_block
        _check(len(mid.resnets) == 2 and len(ours.mid) == 2 + (mid.attentions[0] is not None), "mid_block",
               "does not match the U-Net's middle block")
        _resnet(ours.mid[0], mid.resnets[0], "mid_block.resnets.0")
        if mid.attentions[0] is not None:
            _attention(ours.mid[1], mid.attentions[0], "mid_block.attentions.0")
        _resnet(ours.mid[-1], mid.resnets[1], "mid_block.resnets.1")
        _stages(ours.up, theirs.up_blocks, "up_blocks", "upsamplers")
        _copy(ours.norm_out, theirs.conv_norm_out, "conv_norm_out")
        _copy(ours.conv_out, theirs.conv_out, "conv_out")


def differences(theirs: nn.Module, ours: nn.Module, image_shape, timesteps, seed: int = 0, batch: int = 2
                ) -> dict[int, float]:
    """Return, per timestep, the largest difference of the supernet's output (at its current width) from
    the diffusers model's on the same noise, relative to the largest output."""
    device = next(ours.parameters()).device
    x = torch.randn((batch, *image_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            tt = torch.full((batch,), int(t), dtype=torch.long, device=device)
            ref = theirs(x, tt).sample
            out[int(t)] = float((ours(x, tt) - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    return out


# --- the supernet directory -----------------------------------------------------------------------------

def _data_for(image_shape: tuple[int, int, int], given: DataConfig | None) -> DataConfig:
    """Return the training data of the experiment: the given config's, or a guess from the image shape."""
    known = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}
    if given is not None:
        if given.kind in known and known[given.kind] != tuple(image_shape):
            raise DDSMError(f"data.kind: {given.kind} images are {'x'.join(map(str, known[given.kind]))}, the model "
                            f"takes {'x'.join(map(str, image_shape))}")
        return given
    for kind, shape in known.items():
        if shape == tuple(image_shape):
            return DataConfig(kind=kind)
    c, h, w = image_shape
    return DataConfig(kind="folder", image_size=h if h == w else None, channels=c)


def experiment(model: UNetConfig, image_shape, diffusion, name: str, base: ExperimentConfig | None
               ) -> ExperimentConfig:
    """Return the validated experiment of an imported supernet: the base config's sections (defaults
    without one) with this model, the scheduler's noise process if known, and data that fits the images."""
    cfg = base or ExperimentConfig()
    cfg = replace(cfg, name=name, model=model, data=_data_for(image_shape, base.data if base else None),
                  diffusion=diffusion or cfg.diffusion)
    try:
        return config_from_dict(cfg.to_dict())
    except DDSMError as exc:
        text = str(exc)
        raise DDSMError(f"--widths{text[len('model.widths'):]}" if text.startswith("model.widths") else text) from None


def _train_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Return a train state from which `train --resume` fine-tunes the imported weights from step 0."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    rng = torch.Generator().manual_seed(seed).get_state()
    return {**state, "rng.generator": rng, "rng.torch": rng.clone()}


def _target(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DDSMError(f"--out {out} already exists and is not an empty directory")
    return out


def _write(out: Path, cfg: ExperimentConfig, model, flops, record: dict) -> Path:
    """Write the supernet into a temporary folder beside `out` and rename it into place."""
    from ...checkpoint import save_supernet
    from ...data import data_key

    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / IMPORT_FILE, record)
        d = cfg.data
        save_supernet(tmp, config=cfg, ema=model, train_state=_train_state(model, cfg.train.seed), step=0,
                      flops=flops, dataset=data_key(d))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def import_diffusers(model_dir: str | Path, out_dir: str | Path, *, widths=DEFAULT_WIDTHS,
                     config: ExperimentConfig | str | Path | None = None, name: str | None = None,
                     image_size: int | None = None, importance: int = 0, device: str = "cpu",
                     progress: bool = False) -> Path:
    """Import the UNet2DModel in `model_dir` as a supernet serving `widths` into `out_dir` (new or empty);
    with `importance` > 0, order its channels by Taylor importance on that many training images first.
    The experiment's other sections come from `config` (a YAML path or config), the noise process from
    the pipeline's scheduler where there is one. Both networks run on `device` (the importance's
    gradients, the check that the import equals the model); the supernet is written from the CPU.
    Return the supernet directory."""
    from ...backbones.cost import flops_table
    from ...backbones.registry import build_supernet

    out = _target(out_dir)
    unet_dir, scheduler = locate(model_dir)
    model_cfg, shape = unet_config(read_json(unet_dir / "config.json", "UNet2DModel config"), tuple(widths),
                                   image_size)
    diffusion = diffusion_config(read_json(scheduler, "scheduler config") if scheduler else None)
    base = load_config(config) if isinstance(config, (str, Path)) else config
    cfg = experiment(model_cfg, shape, diffusion, name or out.name or "imported", base)
    theirs = load_diffusers(unet_dir)
    with torch.random.fork_rng():  # the supernet's random init is overwritten: leave the caller's RNG alone
        torch.manual_seed(0)
        ours = build_supernet(cfg.model, shape).eval()
    copy_weights(theirs, ours)
    theirs, ours = theirs.to(device), ours.to(device)
    steps = sorted({0, cfg.diffusion.timesteps // 2, cfg.diffusion.timesteps - 1})
    record = {"source": str(Path(model_dir).resolve()), "diffusers_config": read_json(unet_dir / "config.json"),
              "scheduler": str(scheduler) if scheduler else None}
    if importance > 0:
        from ...data import load_data
        from .importance import reorder_by_importance

        data = load_data(cfg.data)
        record["importance"] = reorder_by_importance(ours, data, cfg.diffusion, images=importance,
                                                     seed=cfg.train.seed, progress=progress)
        if progress:
            print(f"ordered channels by Taylor importance on {importance} images: "
                  f"{record['importance']['sets_permuted']} channel sets reordered")
    diff = differences(theirs, ours, shape, steps)
    worst = max(diff.values())
    if not worst <= TOLERANCE:
        raise DDSMError(f"the imported supernet differs from the diffusers model by {worst:.3g} (relative) at full "
                        f"width; nothing written")
    record["max_relative_difference"] = {str(t): v for t, v in diff.items()}
    flops = flops_table(cfg.model, shape)
    path = _write(out, cfg, ours.cpu(), flops, record)
    if progress:
        print(f"imported {unet_dir} -> {path}: widths {', '.join(map(str, cfg.model.axes()['width']))}, "
              f"{flops[ours.full] / 1e9:.4f} GFLOPs per image at full size, largest difference from diffusers "
              f"{worst:.2g}")
    return path
