"""The step-aware space end to end: every subnet of a U-Net and of a DiT supernet learns under the
sandwich rule, and the DiT goes through train -> search (width x depth) -> export -> sample."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.data import load_dataset
from ddsm_search.training import TrainingRun
from tests.conftest import tiny_dict

TINY_DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
            "widths": [1.0, 0.5, 0.25], "depths": [4, 3, 2]}


def _fixed_loss(model, subnet, x0: torch.Tensor, run: TrainingRun) -> float:
    """Return the noise-prediction loss of one subnet on a fixed batch, timesteps and noise."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(run.schedule.timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return F.mse_loss(model.set_subnet(subnet)(run.schedule.q_sample(x0, t, noise), t), noise).item()


@pytest.mark.parametrize("model", [None, TINY_DIT], ids=["unet", "dit"])
def test_every_subnet_loss_falls(model):
    sections = {"train": {"steps": 60, "batch_size": 32, "lr": 0.003, "warmup_steps": 5, "sandwich_random": 1}}
    data = tiny_dict(**sections)
    if model is not None:
        data["model"] = model
    cfg = config_from_dict(data)
    images = load_dataset("digits")
    run = TrainingRun(cfg, images, "cpu")
    x0 = images.to_float(torch.arange(64))
    before = {s: _fixed_loss(run.model, s, x0, run) for s in run.model.space}
    for _ in range(cfg.train.steps):
        run.train_step()
    after = {s: _fixed_loss(run.model, s, x0, run) for s in run.model.space}
    assert len(before) == (9 if model else 3)
    for subnet in before:
        assert after[subnet] < 0.8 * before[subnet], (subnet.key, before[subnet], after[subnet])


def test_dit_pipeline_width_by_depth(tmp_path):
    """A DiT supernet trains, searches width x depth per segment, exports and samples its schedule."""
    data = tiny_dict(search={"steps": 4, "segments": 2, "population": 6, "generations": 2,
                                             "samples": 40, "workers": 0, "metric": "drift", "batch_size": 100,
                                             "axes": ["width", "depth"]})
    data["model"] = TINY_DIT
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(data))
    net, run = tmp_path / "net", tmp_path / "run"
    assert main(["train", str(config), "--out", str(net), "--train-steps", "3", "--quiet", "--device", "cpu"]) == 0
    meta = json.loads((net / "meta.json").read_text())
    assert meta["axes"] == {"width": [1.0, 0.5, 0.25], "depth": [4, 3, 2]}
    assert len(meta["flops_per_image"]) == 9
    assert main(["search", str(config), "--supernet", str(net), "--out", str(run), "--quiet"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["axes"] == {"width": [1.0, 0.5, 0.25], "depth": [4, 3, 2]}
    import pandas as pd

    table = pd.read_csv(run / "evaluations.csv", dtype={"schedule": str, "genome": str})
    assert all(len(g.split()) == 4 for g in table["genome"]), "2 axes x 2 segments"
    keys = " ".join(table["schedule"])
    assert "depth=2" in keys and "width=0.25" in keys, "the first generation holds each axis's uniform schedules"
    assert main(["export", str(run), "--budget", "100%", "--n", "40", "--quiet", "--out", str(tmp_path / "s.json")]) == 0
    schedule = json.loads((tmp_path / "s.json").read_text())
    assert schedule["version"] == 3 and schedule["axes"] == ["width", "depth"]
    assert all(set(s["subnet"]) == {"width", "depth"} for s in schedule["steps"]) and len(schedule["steps"]) == 4
    out = tmp_path / "s.npz"
    assert main(["sample", str(net), "--schedule", str(tmp_path / "s.json"), "--n", "5", "--out", str(out),
                 "--quiet"]) == 0
    assert main(["sample", str(net), "--subnet", "width=0.5,depth=3", "--n", "5", "--out", str(tmp_path / "a.png"),
                 "--quiet"]) == 0
    assert main(["report", str(run), "--budget", "100%"]) == 0
    assert (run / "report" / "schedule.png").is_file()
