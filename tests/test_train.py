"""Supernet training: every width learns, resume is exact, checkpoints are verified and atomic."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ddsm_search.checkpoint import load_supernet
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.training import sandwich_widths, train
from tests.conftest import tiny_dict


def _losses(out) -> dict[float, list[float]]:
    by_width: dict[float, list[float]] = {}
    with open(out / "loss_log.csv") as fh:
        for row in csv.DictReader(fh):
            by_width.setdefault(float(row["width"]), []).append(float(row["loss"]))
    return by_width


def test_sandwich_always_has_largest_and_smallest():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        widths = sandwich_widths((1.0, 0.75, 0.5, 0.25), 2, g)
        assert widths[:2] == [1.0, 0.25] and len(widths) == 4
        seen.update(widths[2:])
    assert seen == {0.75, 0.5}


def test_every_width_loss_falls(tmp_path):
    cfg = config_from_dict(tiny_dict(train={"steps": 60, "batch_size": 32, "log_every": 10, "checkpoint_every": 60,
                                            "sandwich_random": 1, "lr": 0.003}))
    out = train(cfg, tmp_path / "run", progress=False, grids=False)
    losses = _losses(out)
    assert sorted(losses) == [0.5, 0.75, 1.0]
    for width, series in losses.items():
        assert len(series) == 6
        assert series[-1] < 0.7 * series[0], f"width {width} did not learn: {series}"


def test_distillation_trains_too(tmp_path):
    cfg = config_from_dict(tiny_dict(train={"steps": 30, "batch_size": 32, "log_every": 10, "checkpoint_every": 30,
                                            "distill_weight": 0.5, "lr": 0.003}))
    losses = _losses(train(cfg, tmp_path / "run", progress=False, grids=False))
    assert all(series[-1] < series[0] for series in losses.values())


def _state(out):
    return load_file(str(out / "supernet.safetensors")), load_file(str(out / "train_state.safetensors"))


def test_resume_continues_exactly(tmp_path):
    cfg = config_from_dict(tiny_dict(model={"dropout": 0.1}))  # dropout: the global RNG must be restored too
    straight = train(cfg, tmp_path / "straight", steps=6, progress=False, grids=False)
    split = train(cfg, tmp_path / "split", steps=3, progress=False, grids=False)
    assert json.loads((split / "meta.json").read_text())["step"] == 3
    train(cfg, split, steps=6, resume=True, progress=False, grids=False)
    (ema_a, state_a), (ema_b, state_b) = _state(straight), _state(split)
    assert ema_a.keys() == ema_b.keys() and state_a.keys() == state_b.keys()
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert (straight / "loss_log.csv").read_text() == (split / "loss_log.csv").read_text()
    assert load_supernet(split).step == 6


def test_resume_and_overwrite_guards(tmp_path, tiny_cfg):
    with pytest.raises(DDSMError, match="no checkpoint"):
        train(tiny_cfg, tmp_path / "none", resume=True, progress=False, grids=False)
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False, grids=False)
    with pytest.raises(DDSMError, match="already holds a checkpoint at step 2"):
        train(tiny_cfg, out, steps=4, progress=False, grids=False)
    other = replace(tiny_cfg, model=replace(tiny_cfg.model, base_channels=16))
    with pytest.raises(DDSMError, match="differs from the checkpoint's in: model"):
        train(other, out, steps=4, resume=True, progress=False, grids=False)


def test_checkpoint_is_verified_and_leaves_no_temporaries(tmp_path, tiny_cfg):
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss_log.csv", "meta.json", "samples", "supernet.safetensors", "train_state.safetensors"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["width_0.50.png", "width_0.75.png", "width_1.00.png"]
    supernet = load_supernet(out)
    assert supernet.flops[0.5] < supernet.flops[1.0] and supernet.step == 2
    weights = out / "supernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DDSMError, match="does not match the hash"):
        load_supernet(out)


def test_resume_refuses_corrupt_weights(tmp_path, tiny_cfg):
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False, grids=False)
    weights = out / "supernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DDSMError, match="does not match the hash"):
        train(tiny_cfg, out, steps=4, resume=True, progress=False, grids=False)
