"""Drift from full size, offline RGB search, exports confirmed on held-out noise, the front checked there."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.deploy.export import export_schedule
from ddsm_search.evaluation.full_samples import FOLDER
from ddsm_search.evaluation.quality import evaluate
from ddsm_search.evaluation.scoring import scorer_for
from ddsm_search.report import tables as report
from ddsm_search.sampling import Runtime
from ddsm_search.search.runner import run_search
from ddsm_search.space.subnet import Subnet
from tests.conftest import tiny_dict

FULL, HALF = Subnet.of(width=1.0), Subnet.of(width=0.5)

SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 2, "samples": 40, "workers": 0, "batch_size": 40}


@pytest.fixture(scope="module")
def run(tiny_supernet, tmp_path_factory):
    """A finished tiny FID search on the session's tiny supernet."""
    root = tmp_path_factory.mktemp("drift")
    run_search(config_from_dict(tiny_dict(search=SEARCH)), tiny_supernet, root / "search", progress=False,
               cache_dir=str(root / "cache"))
    return root / "search"


def test_full_size_has_no_drift_and_its_samples_are_kept_beside_the_supernet(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    runtime, scorer = Runtime(supernet), scorer_for(supernet, cache_dir=str(tmp_path))
    kwargs = dict(n=12, seed_set="search/3", cache_dir=str(tmp_path), drift=True)
    full = evaluate(runtime.plan([FULL] * 5), scorer, **kwargs)
    assert full["drift"] == 0.0 and full["drift_space"] == "features"
    half = evaluate(runtime.plan([HALF] * 5), scorer, **kwargs)
    assert half["drift"] > 0
    kept = sorted((tiny_supernet / FOLDER).glob("search-3-n12-*"))
    assert [p.suffix for p in kept] == [".json", ".safetensors"]
    kept[1].write_bytes(kept[1].read_bytes()[:-8] + b"\0" * 8)  # damaged: made again, never used
    assert evaluate(runtime.plan([HALF] * 5), scorer, **kwargs)["drift"] == half["drift"]


def test_drift_search_ranks_by_drift_and_records_every_metric(tiny_supernet, tmp_path):
    cfg = config_from_dict(tiny_dict(search={**SEARCH, "metric": "drift", "generations": 1}))
    files = run_search(cfg, tiny_supernet, tmp_path / "run", progress=False, cache_dir=str(tmp_path / "c"))
    table = report.load_run(tmp_path / "run")
    assert table.attrs["metric"] == "drift" and np.isfinite(table[["fid", "kid", "drift"]].to_numpy()).all()
    assert table.loc[table["uniform"] == "full", "drift"].item() == 0.0, "full size is its own reference"
    assert report.pick(table, "100%")["uniform"] == "full"
    assert len(files.rows) == len(table)


def test_export_max_loss_is_the_cheapest_front_schedule_within_the_loss(run, tmp_path):
    table = report.load_run(run)
    front = report.front(table)
    for max_loss in (0.0, 0.5, 1e9):
        _, data = export_schedule(run, max_loss=max_loss, out=tmp_path / "s.json", heldout_samples=40)
        tried = data["quality"]["confirmed"]
        assert [c["schedule"] for c in tried] == front["schedule"].tolist()[:len(tried)], "the front, cheapest first"
        assert all(c["loss_high"] > max_loss for c in tried[:-1]) and tried[-1]["loss_high"] <= max_loss
        assert data["gflops_per_image"] == tried[-1]["gflops_per_image"]
        loss = data["quality"]["loss"]
        assert loss["high"] <= max_loss and loss["low"] <= loss["high"] and loss["samples"] == 40
    assert len(tried) == 1 and data["gflops_per_image"] == front["gflops"].min()
    heldout = pd.read_csv(run / "heldout.csv", dtype={"schedule": str})
    assert set(heldout["schedule"]) <= set(front["schedule"]), "confirmations are kept apart from the search"
    assert "heldout" not in pd.read_csv(run / "evaluations.csv")["seed_set"].tolist()


def test_full_size_is_within_zero_of_itself(run, tiny_supernet):
    from ddsm_search.evaluation.heldout import Confirmer

    search = report.run_info(run)["search"]
    for metric in ("fid", "drift"):
        confirmer = Confirmer(load_supernet(tiny_supernet), {**search, "metric": metric}, n=40)
        record = confirmer.confirm([FULL] * 6)
        loss = record["loss"]
        assert loss["value"] == loss["low"] == loss["high"] == 0.0, (metric, loss)
        assert record["schedule"] == "width=1.0*6"
        assert confirmer.confirm([HALF] * 6)["loss"]["high"] != 0.0


def test_a_budget_confirms_its_best_candidates_before_choosing(run, tmp_path):
    _, data = export_schedule(run, "100%", tmp_path / "b.json", heldout_samples=40)
    confirmed = data["quality"]["confirmed"]
    assert len(confirmed) == 3
    assert data["quality"]["heldout"]["fid"] == min(c["fid"] for c in confirmed), "the best on held-out noise"
    low, high = data["quality"]["loss"]["low"], data["quality"]["loss"]["high"]
    assert low <= data["quality"]["loss"]["value"] <= high or low <= high


def test_report_heldout_rescores_the_front_apart_from_the_search(run, capsys):
    before = (run / "evaluations.csv").read_bytes()
    assert main(["report", str(run), "--heldout", "40", "--budget", "100%"]) == 0
    out = capsys.readouterr().out
    assert "Spearman rank correlation" in out and (run / "report" / "heldout_front.png").stat().st_size > 1000
    assert (run / "evaluations.csv").read_bytes() == before, "held-out scores never enter the search's table"
    heldout = pd.read_csv(run / "heldout.csv", dtype={"schedule": str})
    assert set(report.front(report.load_run(run))["schedule"]) <= set(heldout.loc[heldout["samples"] == 40, "schedule"])


def test_export_cli_max_loss_and_its_bad_inputs(run, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["export", str(run), "--max-loss", "1000", "--n", "40", "--out", str(out), "--quiet"]) == 0
    assert "interval" in capsys.readouterr().out and json.loads(out.read_text())["max_loss"] == 1000
    for argv, match in [([], "--budget, --max-loss or both"), (["--max-loss", "-1"], "--max-loss"),
                        (["--max-loss", "nan"], "--max-loss"), (["--max-loss", "1", "--confidence", "1.5"], "--confidence")]:
        assert main(["export", str(run), "--out", str(tmp_path / "x.json"), "--n", "40", "--quiet"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not (tmp_path / "x.json").exists()


def test_runs_written_before_drift_still_load(run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    table = pd.read_csv(old / "evaluations.csv")
    table.drop(columns=["drift"]).to_csv(old / "evaluations.csv", index=False)
    info = json.loads((old / "run.json").read_text())
    del info["search"]["drift_space"]
    (old / "run.json").write_text(json.dumps(info))
    loaded = report.load_run(old)
    assert loaded["drift"].isna().all() and len(loaded) == len(table)


def _rgb_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(24):  # smooth colour blobs: structure that SSIM can see
        y, x = np.mgrid[0:8, 0:8]
        cy, cx = rng.uniform(1, 7, 2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / rng.uniform(2, 8))
        colour = rng.uniform(0.2, 1.0, 3)
        pixels = (255 * blob[..., None] * colour).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(root / f"img_{i:02d}.png")
    return root


def test_offline_rgb_folder_search_with_drift_and_export(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DDSM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("DDSM_SEARCH_CACHE", str(tmp_path / "cache"))
    folder = _rgb_folder(tmp_path / "images")
    config = tmp_path / "rgb.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(
        data={"kind": "folder", "path": str(folder), "image_size": 8, "channels": 3},
        search={**SEARCH, "metric": "drift", "samples": 16, "batch_size": 16, "generations": 1, "population": 4})))
    net, run = tmp_path / "net", tmp_path / "run"
    assert main(["train", str(config), "--out", str(net), "--train-steps", "2", "--quiet"]) == 0
    assert main(["search", str(config), "--supernet", str(net), "--out", str(run), "--quiet"]) == 0
    table = report.load_run(run)
    assert table["fid"].isna().all(), "no Inception weights here: FID is not measured"
    assert np.isfinite(table["drift"]).all() and (table["drift"] >= 0).all()
    out = tmp_path / "s.json"
    assert main(["export", str(run), "--max-loss", "0.5", "--n", "16", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["quality"]["metric"] == "drift" and data["quality"]["heldout"]["fid"] is None
    assert data["quality"]["loss"]["high"] <= 0.5
    assert main(["sample", str(net), "--schedule", str(out), "--n", "4", "--out", str(tmp_path / "g.png"),
                 "--quiet"]) == 0
    capsys.readouterr()


def test_evaluate_cli_reports_drift(tiny_supernet, capsys):
    assert main(["evaluate", str(tiny_supernet), "--width", "0.5", "--n", "8", "--drift", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "drift" in out and "from full size (features)" in out and "FID" in out
