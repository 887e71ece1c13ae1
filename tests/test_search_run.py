"""The search loop end to end on a tiny supernet: dedup, budget, resume after kill -9, Ray workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.search.pareto import front_of, pareto_mask
from ddsm_search.search.ray_cluster import check_address
from ddsm_search.search.runner import run_search
from tests.conftest import tiny_dict

SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 3, "samples": 40, "workers": 0, "batch_size": 40}


@pytest.fixture(scope="module")
def supernet(tiny_supernet):
    """The session's tiny supernet."""
    return tiny_supernet


def _cfg(**search):
    return config_from_dict(tiny_dict(search={**SEARCH, **search}))


def _search(supernet, out, cache, **kw):
    return run_search(_cfg(**kw.pop("search", {})), supernet, out, progress=False, cache_dir=str(cache), **kw)


def test_front_is_the_non_dominated_set_and_nothing_is_evaluated_twice(supernet, tmp_path):
    files = _search(supernet, tmp_path / "run", tmp_path / "cache")
    table = pd.read_csv(tmp_path / "run" / "evaluations.csv")
    assert table["schedule"].is_unique, "a schedule must never be evaluated twice"
    assert len(table) == len(files.rows) >= 6
    assert {"width=1.0*6", "width=0.75*6", "width=0.5*6"} <= set(table["schedule"])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["axes"] == {"width": [1.0, 0.75, 0.5]} and info["base"] == "width=1.0" and "widths" not in info
    assert info["segments"] == [[0, 2], [2, 4], [4, 6]]
    front = pd.read_csv(tmp_path / "run" / "front.csv")
    mask = pareto_mask(table[["gflops", "fid"]].to_numpy())
    assert set(front["schedule"]) == set(table.loc[mask, "schedule"])
    generations = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert list(generations["generation"]) == [1, 2, 3], "numbered from 1, as the progress lines"
    assert generations["hypervolume"].is_monotonic_increasing
    assert (table["steps_saved"] > 0).any(), "schedules sharing a prefix should reuse latents"


def test_budget_is_respected(supernet, tmp_path):
    _search(supernet, tmp_path / "run", tmp_path / "cache", budget="60%")
    table = pd.read_csv(tmp_path / "run" / "evaluations.csv")
    assert (table["flops_share"] <= 0.6 + 1e-9).all() and len(table) > 0
    with pytest.raises(DDSMError, match="below the cheapest schedule"):
        _search(supernet, tmp_path / "low", tmp_path / "cache", budget="10%")


def test_rerun_and_resume_guards(supernet, tmp_path):
    _search(supernet, tmp_path / "run", tmp_path / "cache", search={"generations": 1})
    with pytest.raises(DDSMError, match="already holds a search run"):
        _search(supernet, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(DDSMError, match="other settings"):
        _search(supernet, tmp_path / "run", tmp_path / "cache", search={"samples": 30}, resume=True)
    with pytest.raises(DDSMError, match="no search run"):
        _search(supernet, tmp_path / "none", tmp_path / "cache", resume=True)


def test_killed_search_resumes_with_every_evaluation_once(supernet, tmp_path):
    cache = tmp_path / "cache"
    straight = _search(supernet, tmp_path / "straight", cache)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search=SEARCH)))
    out = tmp_path / "killed"
    env = {**os.environ, "DDSM_SEARCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ddsm_search", "search", str(config), "--supernet", str(supernet),
                             "--out", str(out), "--quiet"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a few evaluations are on disk
        table = out / "evaluations.csv"
        if table.is_file() and len(table.read_text().splitlines()) > 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(out / "evaluations.csv")
    assert 0 < len(partial) < len(straight.rows), "the kill should land mid-run"
    resumed = run_search(_cfg(), supernet, out, resume=True, progress=False, cache_dir=str(cache))
    table = pd.read_csv(out / "evaluations.csv")
    assert table["schedule"].is_unique
    assert set(partial["schedule"]) <= set(table["schedule"]), "no finished evaluation may be lost"
    kept = table.set_index("schedule").loc[partial["schedule"], "seconds"]
    assert list(kept) == list(partial["seconds"]), "finished evaluations must not be redone"
    assert set(table["schedule"]) == set(straight.rows), "the resumed run reaches the same evaluations"
    assert front_of(resumed.table(), "fid", 40)["schedule"].tolist() == front_of(straight.table(), "fid", 40)["schedule"].tolist()
    leftovers = [p.name for p in Path(out).iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_ray_two_workers_give_the_same_front_as_one_even_when_a_worker_dies(supernet, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ddsm_search.search.worker import FAULT_ENV

    marker = tmp_path / "worker-killed"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv(FAULT_ENV, str(marker))  # Ray's workers inherit it: one of them dies mid-search
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # one start for both
    try:
        two = _search(supernet, tmp_path / "two", tmp_path / "cache", search={"workers": 2, "generations": 2})
        assert marker.exists(), "a worker should have been killed"
        one = _search(supernet, tmp_path / "one", tmp_path / "cache", search={"workers": 1, "generations": 2})
    finally:
        ray.shutdown()
    assert two.table()["schedule"].is_unique and set(two.rows) == set(one.rows), "the dead worker's candidate is retried"
    f1, f2 = front_of(one.table(), "fid", 40), front_of(two.table(), "fid", 40)
    assert f1["schedule"].tolist() == f2["schedule"].tolist()
    pd.testing.assert_series_equal(f1["fid"], f2["fid"], rtol=1e-9)
    assert set(two.table()["worker"]) == {0, 1}


def test_search_on_a_ray_cluster_started_apart(supernet, tmp_path, monkeypatch):
    # `ray start --head` stands in for a cluster: --address sends the evaluations there, and a local
    # search (no --address) started while it runs still gets a Ray of its own
    pytest.importorskip("ray")
    from ddsm_search.search.worker import FAULT_ENV

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_cli, port = str(Path(sys.executable).with_name("ray")), _closed_port()
    marker = tmp_path / "cluster-worker-killed"  # only the cluster's workers inherit the fault: proof they ran
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180,
                   env={**os.environ, FAULT_ENV: str(marker)})
    try:
        cluster = _search(supernet, tmp_path / "cluster", tmp_path / "cache", search={"workers": 2, "generations": 1},
                          address=f"127.0.0.1:{port}")
        local = _search(supernet, tmp_path / "local", tmp_path / "cache", search={"workers": 1, "generations": 1})
    finally:
        subprocess.run([ray_cli, "stop"], capture_output=True, timeout=180)
    assert marker.exists(), "the evaluations should have run on the cluster's workers"
    assert set(cluster.table()["worker"]) == {0, 1}
    assert set(cluster.rows) == set(local.rows) and len(local.rows) > 0
    both = cluster.table().merge(local.table(), on="schedule", suffixes=("_cluster", "_local"))
    pd.testing.assert_series_equal(both["fid_cluster"], both["fid_local"], check_names=False, rtol=1e-9)


def test_screening_evaluates_only_promising_candidates_in_full(supernet, tmp_path):
    files = _search(supernet, tmp_path / "run", tmp_path / "cache", search={"screen_samples": 20, "generations": 3})
    table = files.table()
    full, screened_out = table[table["samples"] == 40], table[table["samples"] == 20]
    assert len(full) > 0 and table["screen_score"].notna().all(), "every candidate is screened first"
    for _, row in screened_out.iterrows():  # each was beaten on the screen by a cheaper full evaluation
        beaten = full[(full["gflops"] <= row["gflops"]) & (full["screen_score"] < row["screen_score"])]
        assert len(beaten) > 0
    front = pd.read_csv(tmp_path / "run" / "front.csv")
    assert (front["samples"] == 40).all(), "the front holds fully evaluated schedules only"
    gens = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert gens["screened_out"].sum() == len(screened_out)


def _closed_port() -> int:
    """Return a local TCP port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["host", ":6379", "127.0.0.1:port", "ray://127.0.0.1"])
def test_malformed_address_is_refused(address):
    with pytest.raises(DDSMError, match="expected HOST:PORT"):
        check_address(address)


def test_address_where_nothing_listens_is_refused_at_once():
    port = _closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        with pytest.raises(DDSMError, match="no Ray cluster answers there"):
            check_address(address, timeout=5)
        assert time.monotonic() - started < 5
    check_address("auto")  # left to Ray, which knows $RAY_ADDRESS and `ray start`


def test_search_cli_bad_inputs(supernet, tmp_path, capsys):
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search=SEARCH)))
    out = tmp_path / "run"
    cases = [
        (["--supernet", str(tmp_path / "missing")], "supernet directory not found"),
        (["--supernet", str(supernet), "--budget", "1%"], "below the cheapest schedule"),
        (["--supernet", str(supernet), "--budget", "lots"], "expected GFLOPs per image"),
        (["--supernet", str(supernet), "--algorithm", "cmaes"], "invalid choice"),
        (["--supernet", str(supernet), "--resume"], "no search run"),
        (["--supernet", str(supernet), "--workers", "1", "--address", "nonsense"], "expected HOST:PORT"),
        (["--supernet", str(supernet), "--workers", "1", "--address", f"127.0.0.1:{_closed_port()}"],
         "no Ray cluster answers there"),
    ]
    for extra, match in cases:
        assert main(["search", str(config), "--out", str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (extra, err)
        assert not out.exists(), "nothing may be written when the input is bad"


def test_joint_search_over_solvers_and_step_counts_exports_and_samples_its_pick(supernet, tmp_path, capsys):
    """solvers x step counts x widths: the baselines are evaluated in the first generation, the tables
    name each row's solver and steps, and the export runs the solver and timesteps it chose."""
    from ddsm_search.report.tables import load_run
    from ddsm_search.schedule import load_schedule
    from ddsm_search.solvers.base import head_of, spacing_of
    from ddsm_search.space.steps import plan_key

    search = {"solvers": ["ddim", "unipc"], "step_choices": [3, 6], "generations": 2}
    _search(supernet, tmp_path / "run", tmp_path / "cache", search=search)
    table = load_run(tmp_path / "run")
    full = table[table["schedule"].str.fullmatch(r"(\[\S+ uniform\] )?width=1\.0\*\d")]
    assert {(r.solver, r.sampling_steps) for r in full.itertuples()} == {("ddim", 3), ("ddim", 6), ("unipc", 3),
                                                                        ("unipc", 6)}
    assert set(table["solver"]) <= {"ddim", "unipc"} and set(table["sampling_steps"]) <= {3, 6}
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["search"]["solvers"] == ["ddim", "unipc"] and info["search"]["step_choices"] == [3, 6]
    # full size at 3 steps costs half of the reference (6 steps)
    assert full.loc[full["sampling_steps"] == 3, "flops_share"].tolist() == pytest.approx([0.5, 0.5])
    out = tmp_path / "s.json"
    assert main(["export", str(tmp_path / "run"), "--budget", "55%", "--out", str(out), "--n", "40", "--quiet"]) == 0
    data = json.loads(out.read_text())
    schedule = load_schedule(out)
    spacing = spacing_of(schedule.timesteps, 100)
    key = plan_key(schedule.step_keys(), head_of(schedule.solver, schedule.timesteps, spacing))
    row = table[table["schedule"] == key].iloc[0]  # the export is a searched row, solver and steps included
    assert (row["solver"], row["sampling_steps"]) == (schedule.solver.key, len(data["steps"]))
    assert data["flops_share"] <= 0.55 + 1e-9 and data["quality"]["confirmed"][0]["schedule"] in set(table["schedule"])
    capsys.readouterr()
    assert main(["sample", str(supernet), "--schedule", str(out), "--n", "4", "--out", str(tmp_path / "a.npz"),
                 "--quiet"]) == 0
