"""Report and export: the DataFrame front, budgets, the deployable schedule, plots, quickstart wiring."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.deploy.export import export_schedule
from ddsm_search.diffusion import sampling_timesteps
from ddsm_search.errors import DDSMError
from ddsm_search.pipeline import quickstart
from ddsm_search.report import tables as report
from ddsm_search.schedule import load_schedule
from ddsm_search.search.runner import run_search
from ddsm_search.solvers.base import Solver
from ddsm_search.space.subnet import Subnet, SubnetSpace, schedule_key
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
    assert table["schedule"].is_unique and {"subnets", "uniform", "on_front"} <= set(table.columns)
    assert (table["subnets"].map(schedule_key) == table["schedule"]).all(), "keys are canonical schedule keys"
    assert table["subnets"].map(len).eq(6).all()
    points = table[["gflops", "fid"]].to_numpy()
    brute = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert table["on_front"].tolist() == brute
    front = report.front(table)
    assert front["gflops"].is_monotonic_increasing and len(front) == sum(brute)
    assert set(table["uniform"].dropna()) == {"full", "width=0.75", "width=0.5"}
    assert (table["uniform"].isna() == (table["subnets"].map(lambda s: len(set(s))) > 1)).all()
    full = table.loc[table["uniform"] == "full"].iloc[0]
    assert full["schedule"] == "width=1.0*6" and full["flops_share"] == pytest.approx(1.0)
    assert report.hypervolume(table) > 0


def test_pick_is_the_lowest_fid_within_budget(run):
    table = report.load_run(run)
    for budget in ("60%", "100%", f"{table['gflops'].median():.6f}"):
        chosen = report.pick(table, budget)
        limit = report.budget_gflops(budget, float(table.loc[table["uniform"] == "full", "gflops"].iloc[0]))
        fits = table[table["gflops"] <= limit * (1 + 1e-9)]
        assert chosen["fid"] == fits["fid"].min() and chosen["gflops"] <= limit * (1 + 1e-9)
    with pytest.raises(DDSMError, match="below the cheapest evaluated schedule"):
        report.pick(table, "5%")
    with pytest.raises(DDSMError, match="--budget"):
        report.pick(table, "cheap")


def test_export_writes_a_self_describing_checked_schedule(run, tmp_path):
    path, data = export_schedule(run, "70%", tmp_path / "s.json", heldout_samples=40)
    assert data["format"] == "ddsm-search/schedule" and data["version"] == 3
    assert data["axes"] == ["width"] and data["settings"] == {} and not {"widths", "subnets", "sampler"} & set(data)
    assert data["solver"] == {"name": "ddim", "eta": 0.0}
    assert all(set(s) == {"timestep", "subnet"} and set(s["subnet"]) == {"width"} for s in data["steps"])
    assert [s["timestep"] for s in data["steps"]] == data["timesteps"] == sampling_timesteps(100, 6)
    assert data["flops_share"] <= 0.7 + 1e-9 and data["supernet"]["sha256"]
    q = data["quality"]
    assert q["search"]["seed_set"] == "search" and q["heldout"]["seed_set"] == "heldout"
    assert np.isfinite(q["heldout"]["fid"]) and np.isfinite(q["full_size_heldout"]["fid"])
    supernet = load_supernet(data["supernet"]["path"])
    schedule = load_schedule(path, supernet)
    assert schedule.subnets == [Subnet.of(**s["subnet"]) for s in data["steps"]] and schedule.extra["quality"] == q
    assert data["flops_per_image"] == supernet.schedule_flops(schedule.subnets)


def test_tampered_or_mismatched_schedules_are_refused(run, tmp_path):
    path, data = export_schedule(run, "100%", tmp_path / "s.json", heldout_samples=40)
    supernet = load_supernet(data["supernet"]["path"])
    halved = [dict(s, subnet={"width": 0.5}) for s in data["steps"]]
    edited = dict(data, steps=halved)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    if edited["steps"] != data["steps"]:
        with pytest.raises(DDSMError, match="recorded flops_per_image does not match its steps"):
            load_schedule(tmp_path / "edited.json", supernet)
    moved = dict(data, steps=[dict(s, timestep=s["timestep"] + 1) for s in data["steps"][:-1]] + data["steps"][-1:])
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(DDSMError, match="not its 'timesteps'"):
        load_schedule(tmp_path / "moved.json", supernet)
    other = dict(data, supernet={"path": "x", "sha256": "f" * 64})
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(DDSMError, match="made for another supernet"):
        load_schedule(tmp_path / "other.json", supernet)
    bad_width = dict(data, steps=[dict(s, subnet={"width": 0.3}) for s in data["steps"]])
    (tmp_path / "w.json").write_text(json.dumps(bad_width))
    with pytest.raises(DDSMError, match="width 0.3 is not in the supernet"):
        load_schedule(tmp_path / "w.json", supernet)
    version_1 = {k: v for k, v in data.items() if k not in ("steps", "axes", "settings", "solver", "timesteps")}
    (tmp_path / "v1.json").write_text(json.dumps(dict(version_1, version=1, widths=[0.3] * 6)))
    with pytest.raises(DDSMError, match="width 0.3 is not in the supernet"):
        load_schedule(tmp_path / "v1.json", supernet)


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
    assert "faster" not in capsys.readouterr().out, "full size is timed only when asked"
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
    assert figures["full_size_seconds"] > 0 and np.isfinite(figures["full_size_heldout"])
    assert "width=1.0" in figures["paths"] and set(figures["paths"]) <= {"width=1.0", "width=0.75", "width=0.5"}
    assert set(figures["paths"].values()) <= {"fused", "torch"}
    pd.read_csv(tmp_path / "qs" / "search" / "evaluations.csv")


def test_quickstart_refuses_a_bad_budget_before_any_work(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--budget", "half"]) == 2
    assert "--budget" in capsys.readouterr().err and not (tmp_path / "qs").exists()


def test_version_1_and_2_schedules_load_and_sample_as_they_always_did(tiny_supernet, tmp_path):
    """Files written before solvers were searched ran DDIM / DDPM on the uniform grid: they still do, and
    saving one again writes version 3 with the same steps, solver and timesteps."""
    from ddsm_search.sampling import Runtime, generate
    from ddsm_search.schedule import FORMAT, save_schedule

    supernet = load_supernet(tiny_supernet)
    widths = [0.5, 0.5, 0.75, 1.0, 1.0]
    subnets = [Subnet.of(width=w) for w in widths]
    grid = sampling_timesteps(100, 5)
    flops = supernet.schedule_flops(subnets)
    ref = {"path": str(supernet.path), "sha256": supernet.sha256}
    v2 = tmp_path / "v2.json"  # as ddsm-search wrote them before version 3
    v2.write_text(json.dumps({"format": FORMAT, "version": 2, "supernet": ref,
                              "sampler": {"name": "ddim", "steps": 5, "eta": 0.5, "timesteps": grid},
                              "axes": ["width"], "subnets": [{"width": w} for w in widths], "settings": {},
                              "flops_per_image": flops}))
    bare = tmp_path / "bare.json"  # a hand-written version-1 schedule
    bare.write_text(json.dumps({"widths": widths, "sampler": {"eta": 0.5}}))
    full = tmp_path / "full.json"  # version 1 as ddsm-search wrote it: format, version 1, the supernet's hash
    full.write_text(json.dumps({"format": FORMAT, "version": 1, "supernet": ref,
                                "sampler": {"name": "ddim", "steps": 5, "eta": 0.5, "timesteps": grid},
                                "widths": widths, "flops_per_image": flops}))
    ddpm = tmp_path / "ddpm.json"
    ddpm.write_text(json.dumps({"version": 2, "sampler": {"name": "ddpm", "eta": 0.3},
                                "subnets": [{"width": w} for w in widths]}))
    loaded = {path.name: load_schedule(path, supernet) for path in (v2, bare, full, ddpm)}
    kwargs = dict(n=6, seed=3)
    runtime = Runtime(supernet)
    want = generate(runtime.plan(subnets, solver=Solver("ddim", eta=0.5)), **kwargs)
    for name, schedule in loaded.items():
        expected = Solver("ddpm") if name == "ddpm.json" else Solver("ddim", eta=0.5)  # ddpm ignored eta
        assert schedule.subnets == subnets and schedule.solver == expected and schedule.grid(100) == grid, name
        got = generate(runtime.plan_schedule(schedule), **kwargs)
        if name != "ddpm.json":
            assert torch.equal(got, want), name
        again = save_schedule(tmp_path / f"again-{name}", schedule, supernet)
        written = json.loads(again.read_text())
        assert written["version"] == 3 and written["timesteps"] == grid, name
        assert torch.equal(generate(runtime.plan_schedule(load_schedule(again, supernet)), **kwargs), got), name
    other = generate(runtime.plan(subnets[::-1], solver=Solver("ddim", eta=0.5)), **kwargs)
    assert not torch.equal(other, want)
    stale = json.loads(full.read_text())
    stale["flops_per_image"] += 1
    full.write_text(json.dumps(stale))
    with pytest.raises(DDSMError, match="recorded flops_per_image does not match its steps"):
        load_schedule(full, supernet)


def test_uniform_labels_and_a_two_axis_schedule_plot(tmp_path):
    from ddsm_search.report.plots import plot_schedule

    full = Subnet.of(width=1.0, depth=4)
    assert report.uniform_label([full] * 3, full) == "full"
    assert report.uniform_label([full.replace(width=0.5)] * 3, full) == "width=0.5"
    assert report.uniform_label([full.replace(depth=2)] * 3, full) == "depth=2"
    assert report.uniform_label([Subnet.of(width=0.5, depth=2)] * 3, full) == "width=0.5,depth=2"
    assert np.isnan(report.uniform_label([full, full.replace(depth=2)], full))
    space = SubnetSpace.of({"width": [1.0, 0.5], "depth": [4, 2]})
    schedule = [Subnet.of(width=0.5, depth=2)] * 3 + [full] * 3
    assert plot_schedule(schedule, tmp_path / "s.png", "two axes", space).stat().st_size > 1000
    assert plot_schedule([Subnet.of(width=0.5)] * 4, tmp_path / "w.png").stat().st_size > 1000
