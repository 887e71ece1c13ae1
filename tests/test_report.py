"""Report and export: the DataFrame front, budgets, the deployable schedule, plots, quickstart wiring."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ddsm_search import report
from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli import main
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.export import export_schedule
from ddsm_search.pipeline import quickstart
from ddsm_search.schedule import load_schedule
from ddsm_search.search.runner import run_search
from tests.conftest import tiny_dict

SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 2, "samples": 40, "workers": 0, "batch_size": 40}


@pytest.fixture(scope="module")
def run(tiny_supernet, tmp_path_factory):
    """A finished tiny search on the session's tiny supernet (module-scoped)."""
    root = tmp_path_factory.mktemp("report")
    cfg = config_from_dict(tiny_dict(search=SEARCH))
    run_search(cfg, tiny_supernet, root / "search", progress=False, cache_dir=str(root / "cache"))
    return root / "search"


def test_dataframe_front_matches_an_independent_check(run):
    table = report.load_run(run)
    assert table["schedule"].is_unique and {"widths", "uniform", "on_front"} <= set(table.columns)
    points = table[["gflops", "fid"]].to_numpy()
    brute = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert table["on_front"].tolist() == brute
    front = report.front(table)
    assert front["gflops"].is_monotonic_increasing and len(front) == sum(brute)
    assert set(table["uniform"].dropna()) == {1.0, 0.75, 0.5}
    assert report.hypervolume(table) > 0


def test_pick_is_the_lowest_fid_within_budget(run):
    table = report.load_run(run)
    for budget in ("60%", "100%", f"{table['gflops'].median():.6f}"):
        chosen = report.pick(table, budget)
        limit = report.budget_gflops(budget, float(table.loc[table["uniform"] == 1.0, "gflops"].iloc[0]))
        fits = table[table["gflops"] <= limit * (1 + 1e-9)]
        assert chosen["fid"] == fits["fid"].min() and chosen["gflops"] <= limit * (1 + 1e-9)
    with pytest.raises(DDSMError, match="below the cheapest evaluated schedule"):
        report.pick(table, "5%")
    with pytest.raises(DDSMError, match="--budget"):
        report.pick(table, "cheap")


def test_export_writes_a_self_describing_checked_schedule(run, tmp_path):
    path, data = export_schedule(run, "70%", tmp_path / "s.json", heldout_samples=40)
    assert data["format"] == "ddsm-search/schedule" and data["version"] == 1
    assert len(data["widths"]) == data["sampler"]["steps"] == len(data["sampler"]["timesteps"]) == 6
    assert data["flops_share"] <= 0.7 + 1e-9 and data["supernet"]["sha256"]
    q = data["quality"]
    assert q["search"]["seed_set"] == "search" and q["heldout"]["seed_set"] == "heldout"
    assert np.isfinite(q["heldout"]["fid"]) and np.isfinite(q["full_width_heldout"]["fid"])
    supernet = load_supernet(data["supernet"]["path"])
    schedule = load_schedule(path, supernet)
    assert schedule.widths == data["widths"] and schedule.extra["quality"] == q


def test_tampered_or_mismatched_schedules_are_refused(run, tmp_path):
    path, data = export_schedule(run, "100%", tmp_path / "s.json", heldout_samples=40)
    supernet = load_supernet(data["supernet"]["path"])
    edited = dict(data, widths=[0.5] * 6)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    if edited["widths"] != data["widths"]:
        with pytest.raises(DDSMError, match="does not match its widths"):
            load_schedule(tmp_path / "edited.json", supernet)
    other = dict(data, supernet={"path": "x", "sha256": "f" * 64})
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(DDSMError, match="made for another supernet"):
        load_schedule(tmp_path / "other.json", supernet)
    bad_width = dict(data, widths=[0.3] * 6)
    (tmp_path / "w.json").write_text(json.dumps(bad_width))
    with pytest.raises(DDSMError, match="width 0.3 is not in the supernet"):
        load_schedule(tmp_path / "w.json", supernet)


def test_cli_report_export_and_sample(run, tmp_path, capsys):
    assert main(["report", str(run)]) == 0
    for name in ("front.png", "hypervolume.png", "schedule.png", "samples.png"):
        assert (run / "report" / name).stat().st_size > 1000, name
    assert "on the front" in capsys.readouterr().out
    out = tmp_path / "s.json"
    assert main(["export", str(run), "--budget", "80%", "--out", str(out), "--n", "40", "--quiet"]) == 0
    assert "held-out noise" in capsys.readouterr().out
    net = json.loads(out.read_text())["supernet"]["path"]
    assert main(["sample", net, "--schedule", str(out), "--n", "20", "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert "faster" not in capsys.readouterr().out, "full width is timed only when asked"
    assert main(["sample", net, "--schedule", str(out), "--n", "20", "--out", str(tmp_path / "g.png"), "--quiet",
                 "--compare"]) == 0
    assert "faster" in capsys.readouterr().out
    low = tmp_path / "low.json"
    assert main(["export", str(run), "--budget", "5%", "--out", str(low)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the cheapest evaluated schedule" in err[0] and not low.exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a search run directory" in capsys.readouterr().err


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    cfg = config_from_dict(tiny_dict(train={"steps": 3}, search=SEARCH))
    figures = quickstart(tmp_path / "qs", config=cfg, progress=False, budget="80%", n_speed=20, heldout=40)
    assert (tmp_path / "qs" / "schedule.json").is_file()
    assert (tmp_path / "qs" / "search" / "report" / "front.png").is_file()
    assert figures["flops_share"] <= 0.8 + 1e-9 and figures["speedup"] > 0
    assert figures["loss"]["high"] <= 0.05 and figures["loss"]["samples"] == 40
    pd.read_csv(tmp_path / "qs" / "search" / "evaluations.csv")


def test_quickstart_refuses_a_bad_budget_before_any_work(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--budget", "half"]) == 2
    assert "--budget" in capsys.readouterr().err and not (tmp_path / "qs").exists()
