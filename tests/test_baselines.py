"""Baselines (search.baselines), the front against them (report.baselines) and the export's speed
(deploy.speed): what every report and export compares a search with."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import SearchConfig, config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.report.baselines import compare
from ddsm_search.report.tables import load_run
from ddsm_search.search import baselines
from ddsm_search.search.runner import run_search
from ddsm_search.solvers.base import Solver
from tests.conftest import tiny_dict

SEARCH = {"steps": 6, "segments": 2, "population": 4, "generations": 1, "samples": 20, "workers": 0,
          "batch_size": 20, "solvers": ["ddim", "unipc"], "step_choices": [3, 6], "cache_intervals": [2]}


@pytest.fixture(scope="module")
def run(tiny_supernet, tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "run"
    run_search(config_from_dict(tiny_dict(search=SEARCH)), tiny_supernet, out, progress=False)
    return out


def test_baselines_are_full_size_per_solver_and_steps_and_uniform_caching(tiny_supernet):
    supernet = load_supernet(tiny_supernet)
    chosen = baselines.candidates(supernet, SearchConfig(**SEARCH))
    labels = [label for label, _, _ in chosen]
    assert labels == ["ddim 3", "ddim 6", "unipc 3", "unipc 6", "ddim 6 cache 2:1", "unipc 6 cache 2:1"]
    assert [kind for _, kind, _ in chosen] == ["full size"] * 4 + ["cache 2:1"] * 2
    full = supernet.model.full
    for _, _, c in chosen:
        assert all(s.subnet == full for s in c.steps) and len(c.timesteps) == len(c.steps)
    assert chosen[-1][2].key == "[unipc uniform] width=1.0*6 | cache keep1 reuse1 keep1 reuse1 keep1 reuse1"


def test_baselines_run_on_every_spacing(tiny_supernet):
    """With several spacings, full size runs on each (a user picks the better one per step count), labelled
    with its spacing; the uniform caching runs on the first."""
    supernet = load_supernet(tiny_supernet)
    chosen = baselines.candidates(supernet, SearchConfig(**{**SEARCH, "spacings": ["trailing", "uniform"]}))
    labels = [label for label, _, _ in chosen]
    assert labels == ["ddim trailing 3", "ddim trailing 6", "ddim uniform 3", "ddim uniform 6", "unipc trailing 3",
                      "unipc trailing 6", "unipc uniform 3", "unipc uniform 6", "ddim trailing 6 cache 2:1",
                      "unipc trailing 6 cache 2:1"]
    keys = [c.key for _, _, c in chosen]
    assert all(k.startswith("[ddim trailing] ") for k in keys[:2]) and all(k.startswith("[unipc trailing] ")
                                                                           for k in keys[4:6]), keys
    assert keys[2:4] == ["width=1.0*3", "width=1.0*6"], "DDIM on the uniform grid: the key without a head"
    assert len({c.key for _, _, c in chosen}) == len(chosen)


def test_measured_once_reusing_the_run_and_kept_beside_the_supernet(run, tiny_supernet, monkeypatch):
    info = json.loads((run / "run.json").read_text())
    table = load_run(run)
    first = baselines.measure(tiny_supernet, info["search"], known=table, timing=True)
    assert list(first["baseline"])[:4] == ["ddim 3", "ddim 6", "unipc 3", "unipc 6"]
    assert (first["seconds_per_image"] > 0).all() and first["fid"].notna().all()
    # the first generation evaluated full size under every solver and step count: the same figures
    for _, row in first[first["kind"] == "full size"].iterrows():
        same = table[table["schedule"] == row["schedule"]].iloc[0]
        assert row["fid"] == same["fid"] and row["gflops"] == same["gflops"]
    assert first.loc[first["baseline"] == "ddim 3", "flops_share"].item() == pytest.approx(0.5)
    cached = first[first["kind"] != "full size"]
    assert (cached["gflops"] < first.loc[first["baseline"] == "ddim 6", "gflops"].item()).all()
    stored = pd.read_csv(tiny_supernet / baselines.FILE)
    assert set(stored["schedule"]) == set(first["schedule"])

    def no_more(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("ddsm_search.search.worker.Evaluator", no_more)
    monkeypatch.setattr(baselines, "time_schedules", no_more)
    again = baselines.measure(tiny_supernet, info["search"], timing=True)
    pd.testing.assert_frame_equal(again, first)


def test_compare_finds_the_best_cheaper_and_the_cheapest_as_good():
    base = pd.DataFrame({"baseline": ["a 4", "a 8", "b 8"], "kind": ["full size"] * 3, "gflops": [1.0, 2.0, 2.0],
                         "fid": [5.0, 2.0, 1.5], "seconds_per_image": [0.1, 0.2, 0.25]})
    front = pd.DataFrame({"schedule": ["x", "y", "z"], "gflops": [0.5, 1.2, 1.6], "fid": [6.0, 2.0, 1.4],
                          "seconds_per_image": [0.05, 0.1, 0.2]})
    out = compare(front, base, "fid")
    assert list(out["best_baseline"]) == ["", "a 4", "a 4"]
    assert list(out["as_good"]) == ["a 4", "b 8", ""]  # of two as cheap, the better
    assert out["flops_ratio"].tolist()[:2] == pytest.approx([2.0, 2.0 / 1.2])
    assert out["seconds_ratio"].tolist()[:2] == pytest.approx([2.0, 2.5])
    assert np.isnan(out["flops_ratio"].iloc[2])


def test_report_and_export_state_the_baselines_and_the_speed(run, tmp_path, capsys):
    assert main(["report", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the front against 6 baselines" in out
    assert "cheapest as good" in out or "no baseline is as good" in out
    table = pd.read_csv(run / "report" / "front_vs_baselines.csv")
    assert len(table) == int(load_run(run)["on_front"].sum())
    path = tmp_path / "s.json"
    assert main(["export", str(run), "--budget", "100%", "--out", str(path), "--n", "30", "--quiet",
                 "--reference", "unipc:6"]) == 0
    printed = capsys.readouterr().out
    assert "faster than full size, ddim, 6 steps" in printed and "it runs" in printed
    data = json.loads(path.read_text())
    assert data["reference"]["solver"] == "unipc" and data["reference"]["steps"] == 6
    speed = data["speed"]
    assert speed["against_default"] == pytest.approx(speed["seconds"]["default"] / speed["seconds"]["export"])
    if speed["baseline"] is not None:
        assert speed["baseline"]["label"] in {"ddim 3", "ddim 6", "unipc 3", "unipc 6", "ddim 6 cache 2:1",
                                              "unipc 6 cache 2:1"}
        assert speed["against_baseline"] > 0


@pytest.mark.parametrize("text", ["unipc:0", "unipc:x", "heun:8", ":8"])
def test_bad_reference_is_one_line_and_writes_nothing(run, tmp_path, capsys, text):
    path = tmp_path / "s.json"
    assert main(["export", str(run), "--budget", "100%", "--out", str(path), "--n", "30", "--quiet",
                 "--reference", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("--reference" in err[0] or "unknown solver" in err[0]), err
    assert not path.exists()


def test_parse_reference():
    assert baselines.parse_reference("unipc(order=3):8") == (Solver("unipc", order=3), 8)
    assert baselines.parse_reference("ddim", 20) == (Solver(), 20)
    with pytest.raises(DDSMError, match="SOLVER:STEPS"):
        baselines.parse_reference("ddim:-2")
