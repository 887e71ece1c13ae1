"""Experiment YAML: shipped configs load, and every bad value is an error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddsm_search.config import config_from_dict, load_config
from ddsm_search.errors import DDSMError
from tests.conftest import tiny_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["digits.yaml", "cifar10.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "search_spaces" / name)
    assert max(cfg.model.widths) == 1.0


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from ddsm_search.cli.main import main
    from ddsm_search.config import config_path, shipped_configs

    monkeypatch.chdir(tmp_path)  # not a checkout: names and search_spaces/NAME.yaml still resolve
    shipped = shipped_configs()
    assert set(shipped) == {p.stem for p in (ROOT / "search_spaces").glob("*.yaml")}
    for given in ("digits", "digits.yaml", "search_spaces/digits.yaml"):
        assert config_path(given) == ROOT / "search_spaces" / "digits.yaml"
    assert load_config("digits-dit") == load_config(ROOT / "search_spaces" / "digits-dit.yaml")
    (tmp_path / "digits").write_text("name: mine\n")  # a file by that name wins over the shipped config
    assert config_path("digits") == Path("digits")
    with pytest.raises(DDSMError, match="config file not found: digitz .*shipped: cifar10, cifar10-dit, digits"):
        load_config("digitz")
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{name} " in "\n" + listed for name in shipped), listed
    assert main(["configs", "show", "digits-sparse"]) == 0
    assert capsys.readouterr().out == (ROOT / "search_spaces" / "digits-sparse.yaml").read_text()
    assert main(["configs", "show", "nope"]) == 2 and "no shipped config named 'nope'" in capsys.readouterr().err


def test_cifar10_is_ddsm_setup():
    m = load_config(ROOT / "search_spaces" / "cifar10.yaml").model
    assert (m.base_channels, m.channel_mults, m.num_res_blocks, m.attention_resolutions) == (128, (1, 2, 2, 2), 2, (16,))
    assert m.widths == (1.0, 0.75, 0.5, 0.25)


@pytest.mark.parametrize("data,match", [
    (tiny_dict(model={"widht": [1.0]}), "unknown key 'model.widht'"),
    (tiny_dict(trian={}), "unknown key 'trian'"),
    (tiny_dict(model={"base_channels": "32"}), "model.base_channels: expected int"),
    (tiny_dict(model={"widths": [1.0, "half"]}), r"model.widths\[1\]"),
    (tiny_dict(train={"steps": 1.5}), "train.steps: expected int"),
    (tiny_dict(model={"widths": [1.0, 0.3]}), "model.widths: width 0.3"),
    (tiny_dict(model={"widths": [0.5, 0.25]}), "must include 1.0"),
    (tiny_dict(sample={"sampler": "euler"}), "sample.sampler"),
    (tiny_dict(data={"kind": "imagenet"}), "data.kind"),
    (tiny_dict(model=[1, 2]), "model: expected a mapping"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(DDSMError, match=match):
        config_from_dict(data)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(DDSMError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base_channels: 32\n")
    with pytest.raises(DDSMError, match="malformed YAML in .*bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  colour: red\n")
    with pytest.raises(DDSMError, match=r"unknown.yaml: unknown key 'model.colour'"):
        load_config(unknown)


def test_round_trip_through_plain_data(tiny_cfg):
    assert config_from_dict(tiny_cfg.to_dict()) == tiny_cfg
