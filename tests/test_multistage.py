"""The multi-stage U-Net (model.kind: multistage): one shared encoder, a slimmable decoder per timestep
stage; training draws one stage per batch; the stage of a step follows its timestep in search, export
and sampling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ddsm_search.backbones.cost import flops_table
from ddsm_search.backbones.registry import build_supernet
from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.data import load_data
from ddsm_search.diffusion import sampling_timesteps
from ddsm_search.errors import DDSMError
from ddsm_search.space.subnet import Subnet, parse_schedule
from ddsm_search.training import TrainingRun, train
from tests.conftest import tiny_dict

# three decoders, low noise first, of 12, 8 and 4 base channels; the middle one serves width 0.75 too
MODEL = {"kind": "multistage", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
         "attention_resolutions": [4], "group_size": 2, "head_dim": 4, "widths": [1.0, 0.5],
         "decoders": [{"channels": 12}, {"channels": 8, "widths": [1.0, 0.75, 0.5]}, {"channels": 4}]}
SEARCH = {"steps": 6, "segments": 3, "population": 4, "generations": 2, "samples": 16, "workers": 0,
          "batch_size": 16, "metric": "drift", "drift_space": "pixels"}


def ms_dict(**model) -> dict:
    """Return the tiny experiment with the multi-stage model (keys of `model` replacing its own)."""
    return {**tiny_dict(search=SEARCH, train={"batch_size": 8}), "model": {**MODEL, **model}}


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(ms_dict())


@pytest.fixture(scope="module")
def trained(cfg, tmp_path_factory):
    """A multi-stage supernet trained for 3 steps (grids written: one per width, stages by timestep)."""
    return train(cfg, tmp_path_factory.mktemp("ms") / "net", steps=3, device="cpu", progress=False)


def test_default_boundaries_are_equal_spans_and_the_space_has_each_decoders_widths(cfg):
    assert cfg.model.stage_boundaries == (33, 67)
    net = build_supernet(cfg.model, (1, 8, 8))
    assert net.num_stages == 3 and net.full == Subnet.of(width=1.0)
    assert [s.key for s in net.space.along("width")] == ["width=1.0", "width=0.5"]
    assert len(net.space) == 7 and Subnet.of(stage=1, width=0.75) in net.space.members
    assert [net.stage_timesteps(k, 100) for k in range(3)] == [(0, 33), (33, 67), (67, 100)]
    assert net.check_subnet("stage=1,width=0.75") == Subnet.of(stage=1, width=0.75)
    with pytest.raises(DDSMError, match="not served by every stage's decoder"):
        net.check_subnet("width=0.75")
    with pytest.raises(DDSMError, match="not in stage 0's decoder"):
        net.check_subnet("stage=0,width=0.75")


def test_every_training_batch_holds_one_stage_and_its_timesteps(cfg):
    run = TrainingRun(cfg, load_data(cfg.data), "cpu")
    seen = []
    run.model.register_forward_pre_hook(lambda m, args: seen.append((m.active, m.subnet, args[1].clone())))
    stages = set()
    for _ in range(5):
        seen.clear()
        losses = run.train_step()
        stage = {a for a, _, _ in seen}
        assert len(stage) == 1 and None not in stage, "one stage per batch, named by every subnet trained"
        stage = stage.pop()
        stages.add(stage)
        lo, hi = run.model.stage_timesteps(stage, cfg.diffusion.timesteps)
        for _, subnet, t in seen:
            assert subnet["stage"] == stage and ((t >= lo) & (t < hi)).all()
        widths = cfg.model.decoder_widths(stage)
        assert {s["stage"] for s in losses} == {stage}
        assert {Subnet.of(stage=stage, width=widths[0]), Subnet.of(stage=stage, width=widths[-1])} <= set(losses)
    assert len(stages) >= 2


def test_resume_continues_exactly(tmp_path):
    cfg = config_from_dict(ms_dict())
    whole = train(cfg, tmp_path / "whole", steps=3, device="cpu", progress=False, grids=False)
    train(cfg, tmp_path / "part", steps=2, device="cpu", progress=False, grids=False)
    part = train(cfg, tmp_path / "part", steps=3, device="cpu", progress=False, grids=False, resume=True)
    assert load_supernet(whole).sha256 == load_supernet(part).sha256


def test_static_exports_equal_the_supernet_at_every_stage_and_width(cfg):
    net = build_supernet(cfg.model, (1, 8, 8)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for subnet in net.space:
            lo, hi = net.stage_timesteps(subnet["stage"], 100)
            t = torch.tensor([lo, hi - 1, (lo + hi) // 2, lo + 1])
            static = net.export(subnet).eval()
            assert all(type(m).__module__.startswith("torch.nn") for m in static.modules()
                       if not list(m.children())), "an export holds plain torch layers"
            assert len(static.decoders) == 1
            torch.testing.assert_close(static(x, t), net.set_subnet(subnet)(x, t), rtol=0, atol=0)
            with pytest.raises(DDSMError, match=f"this network runs stage {subnet['stage']}"):
                static(x, torch.tensor((hi if hi < 100 else lo - 1)))
        t = torch.tensor([5, 40, 90, 99])  # one image per stage and more: routed by timestep
        for width in net.space.choices("width"):
            torch.testing.assert_close(net.export(Subnet.of(width=width)).eval()(x, t),
                                       net.set_subnet(Subnet.of(width=width))(x, t), rtol=0, atol=0)
            for i, ti in enumerate(t.tolist()):
                one = net.set_subnet(Subnet.of(stage=net.stage_of(ti), width=width))(x[i:i + 1], t[i:i + 1])
                torch.testing.assert_close(net.set_subnet(Subnet.of(width=width))(x, t)[i:i + 1], one,
                                           rtol=1e-5, atol=1e-5)
        with pytest.raises(DDSMError, match="timestep 5 is in stage 0"):
            net.set_subnet("stage=2,width=1.0")(x, torch.tensor(5))


def test_flops_follow_each_stage_decoder(cfg, trained):
    table = flops_table(cfg.model, (1, 8, 8))
    assert set(table) == set(build_supernet(cfg.model, (1, 8, 8)).space.members)
    full = [table[Subnet.of(stage=k, width=1.0)] for k in range(3)]
    assert full[0] > full[1] > full[2] > 0, "decoders of 12, 8 and 4 channels"
    middle = [table[Subnet.of(stage=1, width=w)] for w in (1.0, 0.75, 0.5)]
    assert middle == sorted(middle, reverse=True) and len(set(middle)) == 3
    supernet = load_supernet(trained)
    assert supernet.flops == table
    steps = sampling_timesteps(100, 6)
    expected = sum(table[Subnet.of(stage=supernet.model.stage_of(t), width=0.5)] for t in steps)
    assert supernet.schedule_flops([Subnet.of(width=0.5)] * 6) == expected
    assert supernet.full_schedule_flops(6) == sum(full[supernet.model.stage_of(t)] for t in steps)
    with pytest.raises(DDSMError, match="full_schedule_flops"):
        supernet.full_flops


def test_search_schedules_carry_the_stage_of_each_step_and_export_and_sample_them(trained, tmp_path, capsys):
    from ddsm_search.deploy.export import export_schedule
    from ddsm_search.report.tables import load_run
    from ddsm_search.search.runner import run_search

    supernet = load_supernet(trained)
    stages = [supernet.model.stage_of(t) for t in sampling_timesteps(100, SEARCH["steps"])]
    assert stages == [2, 2, 1, 1, 0, 0]
    run_search(config_from_dict(ms_dict()), trained, tmp_path / "run", progress=False, cache_dir=str(tmp_path / "c"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["base"] == "width=1.0" and info["axes"] == {"width": [1.0, 0.5]}
    assert info["step_values"] == {"stage": stages}
    table = pd.read_csv(tmp_path / "run" / "evaluations.csv")
    assert "stage=2,width=1.0*2 stage=1,width=1.0*2 stage=0,width=1.0*2" in set(table["schedule"])
    for key in table["schedule"]:
        assert [s["stage"] for s in parse_schedule(key)] == stages
    row = table[table["schedule"] == "stage=2,width=1.0*2 stage=1,width=1.0*2 stage=0,width=1.0*2"].iloc[0]
    assert row["drift"] == 0 and row["flops_share"] == pytest.approx(1.0)
    assert {"full", "width=0.5"} <= set(load_run(tmp_path / "run")["uniform"].dropna())

    path, data = export_schedule(tmp_path / "run", "100%", tmp_path / "s.json", heldout_samples=8, candidates=1,
                                 cache_dir=str(tmp_path / "c"))
    saved = json.loads(path.read_text())
    assert [s["subnet"]["stage"] for s in saved["steps"]] == stages
    assert main(["sample", str(trained), "--schedule", str(path), "--out", str(tmp_path / "a.npz"), "--n", "2",
                 "--quiet"]) == 0
    capsys.readouterr()


def test_sample_with_a_width_takes_each_steps_stage_from_its_timestep(trained, tmp_path, capsys):
    out = tmp_path / "w.npz"
    assert main(["sample", str(trained), "--subnet", "width=0.5", "--sample-steps", "5", "--n", "2", "--out", str(out),
                 "--quiet"]) == 0
    keys = list(np.load(out)["subnets"])
    assert keys == [f"stage={s},width=0.5" for s in (2, 2, 1, 0, 0)]
    assert "of full size" in capsys.readouterr().out
    assert main(["sample", str(trained), "--width", "0.5", "--sample-steps", "5", "--n", "2", "--out", str(tmp_path / "x.npz"),
                 "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out)["images"], np.load(tmp_path / "x.npz")["images"])
    for subnet, message in (("stage=0,width=0.5", "step 0 (t=99) is in stage 2"),
                            ("width=0.75", "not served by every stage's decoder")):
        capsys.readouterr()
        assert main(["sample", str(trained), "--subnet", subnet, "--sample-steps", "5", "--out", str(tmp_path / "y.png"),
                     "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert (trained / "samples" / "width-0.5.png").is_file()


@pytest.mark.parametrize("model, key", [
    ({"stage_boundaries": [60, 30]}, "model.stage_boundaries: must be strictly increasing"),
    ({"stage_boundaries": [30, 100]}, "model.stage_boundaries: every boundary must be a timestep between 1 and 99"),
    ({"stage_boundaries": [0, 50]}, "model.stage_boundaries: every boundary"),
    ({"stage_boundaries": [50]}, "model.stage_boundaries: 3 decoders need 2 boundaries"),
    ({"decoders": []}, "model.decoders: must list at least one decoder"),
    ({"decoders": [{"channels": 6, "widths": [1.0, 0.5]}]}, "model.decoders[0].widths: width 0.5 gives 3"),
    ({"decoders": [{"channels": 8, "widths": [0.5]}]}, "model.decoders[0].widths: must include 1.0"),
    ({"decoders": [{"channels": 0}]}, "model.decoders[0].channels"),
    ({"decoders": [{"width": 8}]}, "unknown key 'model.decoders[0].width'"),
])
def test_bad_configs_are_one_line_naming_the_key(model, key):
    with pytest.raises(DDSMError) as err:
        config_from_dict(ms_dict(**model))
    assert str(err.value).startswith(key) or key in str(err.value)
    assert "\n" not in str(err.value)


def test_the_stage_is_not_a_search_axis():
    with pytest.raises(DDSMError, match="search.axes: the stage of a multistage supernet follows"):
        config_from_dict({**ms_dict(), "search": {**SEARCH, "axes": ["stage", "width"]}})


def test_feature_caching_is_refused_on_a_backbone_without_cache_points(trained, tmp_path, capsys):
    """The multi-stage U-Net has no `deep_forward`: a cached schedule or a caching search is one line."""
    data = {"version": 3, "solver": {"name": "ddim"},
            "steps": [{"timestep": t, "subnet": {"width": 1.0}} for t in (99, 74, 49, 24, 0)],
            "settings": {"cache": {"steps": ["keep1", "reuse1", "keep1", "reuse1", "keep1"]}}}
    path = tmp_path / "cached.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "a.npz"
    assert main(["sample", str(trained), "--schedule", str(path), "--n", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a backbone with cache points" in err[0] and "has none" in err[0], err
    assert not out.exists()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(ms_dict() | {"search": {**SEARCH, "cache_intervals": [2]}}))
    assert main(["search", str(config), "--supernet", str(trained), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.cache_intervals: feature caching needs a backbone with cache points" in err[0]
    assert not (tmp_path / "run").exists()
