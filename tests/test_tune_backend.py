"""The search as a Ray Tune experiment (`--executor tune`): the pool's front with the same seed (with a
Tune worker killed once), an interrupted search resumed with Tuner.restore, and bad inputs refused
before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.search.runner import run_search
from tests.conftest import tiny_dict

pytest.importorskip("ray.tune")

SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 3, "samples": 40, "workers": 0, "batch_size": 40}
COMPARED = ["schedule", "genome", "gflops", "gflops_sd", "flops_share", "fid", "kid", "drift", "samples", "generation",
            "screen_score"]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the module's in-process searches (each search would otherwise start its own),
    whose workers (not this process) have the fault marker: the first evaluation on it kills its worker
    once. Yields the marker's path."""
    import ray

    from ddsm_search.search.worker import FAULT_ENV

    marker = tmp_path_factory.mktemp("fault") / "worker-killed"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {FAULT_ENV: str(marker)}})
    yield marker
    ray.shutdown()


def _cfg(**search):
    return config_from_dict(tiny_dict(search={**SEARCH, **search}))


def _search(supernet, out, cache, **search):
    return run_search(_cfg(**search), supernet, out, progress=False, cache_dir=str(cache))


def _table(run) -> pd.DataFrame:
    return pd.read_csv(run / "evaluations.csv", dtype={"schedule": str, "genome": str}).sort_values(
        "schedule")[COMPARED].reset_index(drop=True)


def _assert_same_run(tune_run, pool_run, resumed: bool = False) -> None:
    """The rows' scores, the front and every generation's summary (but its seconds; and, after a resume,
    which schedules the table answered) are equal."""
    pd.testing.assert_frame_equal(_table(tune_run), _table(pool_run))
    front = [pd.read_csv(r / "front.csv", dtype={"schedule": str, "genome": str})[COMPARED] for r in (tune_run, pool_run)]
    pd.testing.assert_frame_equal(*front)
    dropped = ["seconds"] + (["answered_from_table", "new"] if resumed else [])
    gens = [pd.read_csv(r / "generations.csv").drop(columns=dropped) for r in (tune_run, pool_run)]
    pd.testing.assert_frame_equal(*gens)


def test_tune_search_reaches_the_pool_front_with_the_same_seed(tiny_supernet, tmp_path, ray_local):
    # with screening, so that both kinds of batch (screens, then full evaluations) go through Tune
    extra = {"screen_samples": 20}
    cache = tmp_path / "cache"
    pool = _search(tiny_supernet, tmp_path / "pool", cache, **extra)
    tune = _search(tiny_supernet, tmp_path / "tune", cache, executor="tune", workers=2, **extra)
    assert ray_local.exists(), "a Tune worker should have died (and its trial been restarted by Tune)"
    _assert_same_run(tmp_path / "tune", tmp_path / "pool")
    assert set(tune.table()["worker"]) <= {-1, 0, 1, 2} and len(tune.rows) == len(pool.rows) > 6
    assert 0 < (tune.table()["samples"] == 20).sum() < len(tune.rows), "some candidates are screened out, not all"
    trials = [p for p in (tmp_path / "tune" / "tune").iterdir() if p.name.startswith("trial_")]
    # one trial per evaluation: every new schedule's screen, then the promising ones in full
    assert len(trials) == len(pool.rows) + int((pool.table()["samples"] == 40).sum())
    assert any((t / "result.json").is_file() for t in trials), "Tune's loggers write each trial's results"
    assert main(["report", str(tmp_path / "tune"), "--budget", "60%"]) == 0  # a Tune run reads as any run


def test_interrupted_tune_search_resumes_with_tuner_restore(tiny_supernet, tmp_path, ray_local, monkeypatch):
    from ray import tune

    cache = tmp_path / "cache"
    straight = _search(tiny_supernet, tmp_path / "pool", cache)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search={**SEARCH, "executor": "tune", "workers": 1})))
    out = tmp_path / "interrupted"
    env = {**os.environ, "DDSM_SEARCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ddsm_search", "search", str(config), "--supernet",
                             str(tiny_supernet), "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, ready = time.time() + 300, False  # Ray and Tune start slowly on a loaded machine
    while time.time() < deadline and proc.poll() is None:  # Ctrl-C once a few evaluations are on disk
        table = out / "evaluations.csv"
        if table.is_file() and len(table.read_text().splitlines()) > 3 and tune.Tuner.can_restore(str(out / "tune")):
            ready = True
            break
        time.sleep(0.05)
    assert ready, f"no evaluation on disk within 300 s (exit status {proc.poll()})"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    partial = pd.read_csv(out / "evaluations.csv", dtype={"schedule": str})
    assert 0 < len(partial) < len(straight.rows), "the interruption should land mid-run"

    restored = []
    original = tune.Tuner.restore.__func__
    monkeypatch.setattr(tune.Tuner, "restore", classmethod(lambda cls, *a, **k: restored.append(a[0]) or
                                                             original(cls, *a, **k)))
    resumed = run_search(_cfg(executor="tune", workers=1), tiny_supernet, out, resume=True, progress=False,
                         cache_dir=str(cache))
    assert restored == [str((out / "tune").resolve())], "--resume restores Tune's experiment"
    table = pd.read_csv(out / "evaluations.csv", dtype={"schedule": str})
    assert table["schedule"].is_unique
    kept = table.set_index("schedule").loc[partial["schedule"], "seconds"]
    assert list(kept) == list(partial["seconds"]), "finished evaluations must not be redone"
    assert set(resumed.rows) == set(straight.rows)
    _assert_same_run(out, tmp_path / "pool", resumed=True)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_a_relative_supernet_path_works_under_tune(tiny_supernet, tmp_path, ray_local, monkeypatch, capsys):
    """Tune runs each trial in a directory of its own: the search hands its workers absolute paths."""
    import shutil

    shutil.copytree(tiny_supernet, tmp_path / "nets" / "tiny")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_dict(search={
        **SEARCH, "steps": 4, "segments": 2, "population": 4, "generations": 1, "samples": 20, "batch_size": 20})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDSM_SEARCH_CACHE", "cache")  # a relative cache folder too
    assert main(["search", "s.yaml", "--supernet", "nets/tiny", "--out", "run", "--executor", "tune", "--workers",
                 "1", "--quiet"]) == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "run" / "evaluations.csv")
    assert len(table) == 4 and table["fid"].notna().all()
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "run" / "tune" / "cache").exists()


def test_a_failed_trial_ends_the_search_with_one_line_naming_what_happened(tmp_path):
    from types import SimpleNamespace

    from ddsm_search.search.executors.tune import RETRIES, ScheduleSearcher

    loop = SimpleNamespace(q=SimpleNamespace(metric="fid", generations=1), files=SimpleNamespace(dir=tmp_path))
    results = {"user error": ({"ddsm_error": "supernet directory not found: nets/tiny"}, False),
               "fault": ({"ddsm_fault": "ValueError: bad shape (traceback in t/fault.txt)"}, False),
               "death": (None, True)}
    said = {}
    for name, (result, error) in results.items():
        searcher = ScheduleSearcher(loop, algorithm=None, max_concurrent=1)
        searcher.live["trial"] = "width=1.0*4"
        searcher.on_trial_complete("trial", result, error=error)
        said[name] = searcher.error
        searcher.release()
    assert said["user error"] == "supernet directory not found: nets/tiny", "the user's error, as it was raised"
    assert said["fault"].startswith("evaluating schedule 'width=1.0*4' failed on a Tune worker: ValueError: bad "
                                    "shape (traceback in t/fault.txt)")
    assert f"failed {RETRIES + 1} times (its worker died each time)" in said["death"]
    assert all("\n" not in line and "--resume" in line for line in (said["fault"], said["death"]))


@pytest.mark.parametrize("args, yaml_search, words", [
    (["--executor", "ray"], {}, "invalid choice: 'ray'"),
    ([], {"executor": "ray"}, "search.executor: expected pool or tune"),
    (["--executor", "tune", "--workers", "0"], {}, "search.workers: the tune executor"),
    (["--executor", "tune", "--workers", "1", "--address", "ray://127.0.0.1:10001"], {}, "ray job submit"),
    (["--tune-logger", "mlflow"], {}, "--tune-logger needs --executor tune"),
    (["--executor", "tune", "--workers", "1", "--tune-logger", "neptune"], {}, "invalid choice: 'neptune'"),
])
def test_bad_executor_inputs_are_one_line_and_write_nothing(tiny_supernet, tmp_path, capsys, args, yaml_search, words):
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search={**SEARCH, **yaml_search})))
    out = tmp_path / "run"
    assert main(["search", str(config), "--supernet", str(tiny_supernet), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists(), "nothing may be half-written"


def test_a_missing_tune_logger_package_is_named(tiny_supernet, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search=SEARCH)))
    assert main(["search", str(config), "--supernet", str(tiny_supernet), "--out", str(tmp_path / "run"), "--quiet",
                 "--executor", "tune", "--workers", "1", "--tune-logger", "mlflow"]) == 2
    assert "pip install mlflow" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
