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
    subnets = table.apply(report.row_subnets, axis=1)
    assert (subnets.map(schedule_key) == table["schedule"]).all(), "keys are canonical schedule keys"
    assert (table["subnets"] == table["schedule"]).all(), "a static run's steps are its subnets"
    assert subnets.map(len).eq(6).all()
    points = table[["gflops", "fid"]].to_numpy()
    brute = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert table["on_front"].tolist() == brute
    front = report.front(table)
    assert front["gflops"].is_monotonic_increasing and len(front) == sum(brute)
    assert set(table["uniform"].dropna()) == {"full", "width=0.75", "width=0.5"}
    assert (table["uniform"].isna() == (subnets.map(lambda s: len(set(s))) > 1)).all()
    full = table.loc[table["uniform"] == "full"].iloc[0]
    assert full["schedule"] == "width=1.0*6" and full["flops_share"] == pytest.approx(1.0)
    assert report.hypervolume(table) > 0


def test_run_tables_have_plain_columns_and_round_trip_through_parquet(run, tmp_path):
    import ddsm_search as ds

    table = ds.load_run(run)
    genes = [c for c in table.columns if c.startswith("gene_")]
    assert genes == ["gene_0", "gene_1", "gene_2"] and all(table[c].dtype == "int64" for c in genes)
    assert "genome" not in table.columns and "steps" not in table.columns
    on_disk = pd.read_csv(run / "evaluations.csv", dtype={"genome": str})
    assert table[genes].astype(str).agg(" ".join, axis=1).tolist() == on_disk["genome"].tolist()
    assert table["generation"].min() == 1 and ds.generations(run)["generation"].tolist() == [1, 2], \
        "generations are numbered from 1, as the progress lines say"
    table.to_parquet(tmp_path / "run.parquet")
    back = pd.read_parquet(tmp_path / "run.parquet")
    pd.testing.assert_frame_equal(back, table)
    assert back.attrs == table.attrs == {"metric": "fid", "samples": 40, "cost": "dense"}
    row = table.iloc[0]
    assert [s.subnet for s in ds.row_steps(row)] == ds.row_subnets(row) and len(ds.row_subnets(row)) == 6

    per_step = ds.steps(table)
    assert list(per_step.columns) == ["schedule", "step", "width"] and len(per_step) == 6 * len(table)
    first = per_step[per_step["schedule"] == row["schedule"]]
    assert first["step"].tolist() == list(range(6))
    assert first["width"].tolist() == [s.get("width") for s in ds.row_subnets(row)]
    exits = ds.steps(pd.DataFrame({"schedule": ["width=1.0*2 | exit 0.8 off"]}))
    assert exits["exit"].iloc[0] == 0.8 and pd.isna(exits["exit"].iloc[1]), "a family's field, per step"
    per_step.to_parquet(tmp_path / "steps.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "steps.parquet"), per_step)


def test_a_run_written_before_generations_counted_from_1_reads_and_resumes(run, tmp_path, tiny_supernet):
    """run.json version 1 (generations from 0 in the files) reads numbered from 1; resumed, it is rewritten
    as version 2 with the same rows."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    info = json.loads((old / "run.json").read_text())
    assert info["version"] == 2
    (old / "run.json").write_text(json.dumps({**info, "version": 1}))
    for name in ("evaluations.csv", "generations.csv"):
        frame = pd.read_csv(old / name, dtype={"schedule": str, "genome": str, "seed_set": str})
        frame["generation"] -= 1
        frame.to_csv(old / name, index=False)
    pd.testing.assert_frame_equal(report.load_run(old), report.load_run(run))
    pd.testing.assert_frame_equal(report.generations(old), report.generations(run))
    cfg = config_from_dict(tiny_dict(search=SEARCH))
    run_search(cfg, tiny_supernet, old, resume=True, progress=False, cache_dir=str(tmp_path / "cache"))
    assert json.loads((old / "run.json").read_text())["version"] == 2
    for name in ("evaluations.csv", "generations.csv"):
        kept, made = (pd.read_csv(r / name) for r in (old, run))
        assert kept["generation"].tolist() == made["generation"].tolist(), name


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
    assert main(["report", str(run), "--heldout", "20"]) == 0
    for name in ("front.png", "hypervolume.png", "schedule.png", "samples.png", "heldout_front.png"):
        assert (run / "report" / name).stat().st_size > 1000, name
    said = capsys.readouterr()
    assert "on the front" in said.out
    for bar in ("schedule's grid", "full size's grid", "held-out front", "full size"):  # the slow parts show bars
        assert bar in said.err, bar
    assert main(["report", str(run), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "on the front" in said.out and said.err == "", "--quiet: the front, no bars"
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
    figures = quickstart(tmp_path / "qs", config=cfg, progress=False, budget="80%", heldout=40)
    assert (tmp_path / "qs" / "schedule.json").is_file()
    report = tmp_path / "qs" / "search" / "report"
    for name in ("front.png", "front_vs_baselines.png", "front_vs_baselines_seconds.png", "baselines.csv",
                 "front_vs_baselines.csv"):
        assert (report / name).is_file(), name
    assert figures["flops_share"] <= 0.8 + 1e-9 and figures["speedup"] > 0
    assert figures["loss"]["high"] <= 0.05 and figures["loss"]["samples"] == 40
    assert figures["solver"] == "ddim" and figures["steps"] == 6
    speed = figures["speed"]
    assert speed["seconds"]["default"] > 0 and np.isfinite(figures["full_size_heldout"])
    assert speed["against_default"] == pytest.approx(speed["seconds"]["default"] / speed["seconds"]["export"])
    assert "width=1.0" in speed["paths"] and set(speed["paths"]) <= {"width=1.0", "width=0.75", "width=0.5"}
    assert set(speed["paths"].values()) <= {"fused", "torch"}
    pd.read_csv(tmp_path / "qs" / "search" / "evaluations.csv")


def test_quickstart_names_the_searched_space():
    """The quickstart's search line names what is searched: solver, steps, spacing, axes, caching."""
    from ddsm_search.config import load_config
    from ddsm_search.pipeline import searched

    cfg = load_config("digits-dit")
    assert searched(cfg.search, cfg.model) == ("solver (ddim, dpmsolver++, unipc), steps (4-20), spacing (uniform, "
                                               "trailing), width, depth, caching (every 2, 3)")
    cfg = config_from_dict(tiny_dict(search=SEARCH))
    assert searched(cfg.search, cfg.model) == ", ".join(cfg.search.axes or cfg.model.axes()), "a fixed sampler"


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
    fig = plot_schedule(schedule, tmp_path / "s.png", "two axes", space)
    assert len(fig.axes) == 2 and (tmp_path / "s.png").stat().st_size > 1000
    assert len(plot_schedule([Subnet.of(width=0.5)] * 4).axes) == 1, "no path: the Figure alone, nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_plots_leave_the_matplotlib_backend_alone(run, tmp_path):
    """Every plot function draws on its own Figure and returns it (writing the PNG only when given a
    path); the user's backend (svg here) is the same after each, and pyplot holds no new figure."""
    import matplotlib
    from matplotlib.figure import Figure

    from ddsm_search.methods.multistage.stages import plot_similarity
    from ddsm_search.report import plots

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        table = report.load_run(run)
        held = pd.DataFrame({"schedule": ["a", "b", "c"], "gflops": [1.0, 2.0, 3.0], "flops_share": [0.3, 0.6, 1.0],
                             "search_fid": [3.0, 2.0, 1.0], "heldout_fid": [3.2, 1.9, 2.0]})
        held.attrs.update(metric="fid", samples=40)
        images = torch.zeros(4, 1, 8, 8)
        calls = {
            "front": lambda path: plots.plot_front(table, path, "fid", table.iloc[0]),
            "heldout_front": lambda path: plots.plot_heldout_front(held, path, 0.5),
            "schedule": lambda path: plots.plot_schedule([Subnet.of(width=0.5)] * 3, path, "title"),
            "hypervolume": lambda path: plots.plot_hypervolume(report.generations(run), path),
            "grids": lambda path: plots.plot_grids(images, images, path),
            "similarity": lambda path: plot_similarity(np.eye(4), [0, 1, 2, 3], [2], path),
        }
        for name, call in calls.items():
            figure = call(None)
            assert isinstance(figure, Figure) and matplotlib.get_backend() == "svg", name
            assert isinstance(call(tmp_path / f"{name}.png"), Figure) and matplotlib.get_backend() == "svg", name
            assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in calls), "no temporary left"
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == [], "pyplot never saw the figures"
        # the fronts are staircases: a front's quality holds until the next, costlier schedule improves on it
        lines = {ln.get_label(): ln for ln in plots.plot_front(table).axes[0].get_lines()}
        assert lines["Pareto front"].get_drawstyle() == "steps-post"
        lines = {ln.get_label(): ln for ln in plots.plot_heldout_front(held).axes[0].get_lines()}
        assert {lines["front, search noise"].get_drawstyle(), lines["held-out front"].get_drawstyle()} == {"steps-post"}
    finally:
        matplotlib.use(before)
