"""The search where it used to break: exact subnet keys, small spaces, one-step schedules, screened resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.report import tables as report
from ddsm_search.search.executors import pool as pool_module
from ddsm_search.search.runner import run_search
from ddsm_search.space.subnet import parse_schedule
from tests.conftest import tiny_dict

SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 3, "samples": 40, "workers": 0, "batch_size": 40}
COMPARED = ["schedule", "genome", "gflops", "fid", "kid", "samples", "generation", "screen_score"]


def _cfg(**search):
    return config_from_dict(tiny_dict(search={**SEARCH, **search}))


def _search(supernet, out, cache, **search):
    return run_search(_cfg(**search), supernet, out, progress=False, cache_dir=str(cache))


def test_widths_of_any_precision_train_sample_search_and_export(tmp_path, capsys):
    # base 24, group size 8: thirds of the channels are whole groups, but ':g' keys (6 digits) lost them
    widths = [1.0, 0.6666666667, 0.3333333333]
    data = tiny_dict(model={"base_channels": 24, "group_size": 8, "head_dim": 8, "widths": widths,
                            "attention_resolutions": []},
                     search={**SEARCH, "generations": 1, "population": 4})
    config = tmp_path / "thirds.yaml"
    config.write_text(yaml.safe_dump(data))
    net, run = tmp_path / "net", tmp_path / "run"
    env = ["--quiet"]
    assert main(["train", str(config), "--out", str(net), "--train-steps", "2"] + env) == 0
    assert main(["sample", str(net), "--width", "0.6666666667", "--n", "4", "--out", str(tmp_path / "g.png")] + env) == 0
    assert main(["sample", str(net), "--subnet", "width=0.6666666667", "--n", "4", "--out", str(tmp_path / "g.png")]
                + env) == 0
    meta = json.loads((net / "meta.json").read_text())
    assert meta["axes"] == {"width": widths} and set(meta["flops_per_image"]) == {f"width={w!r}" for w in widths}
    assert main(["search", str(config), "--supernet", str(net), "--out", str(run)] + env) == 0
    table = report.load_run(run)
    widths_read = {s["width"] for _, row in table.iterrows() for s in report.row_subnets(row)}
    assert widths_read <= set(widths), "keys read back to the exact widths"
    assert any("width=0.6666666667" in key or "width=0.3333333333" in key for key in table["schedule"])
    assert main(["export", str(run), "--budget", "100%", "--out", str(tmp_path / "s.json"), "--n", "8"] + env) == 0
    assert main(["sample", str(net), "--schedule", str(tmp_path / "s.json"), "--n", "4",
                 "--out", str(tmp_path / "s.png")] + env) == 0
    capsys.readouterr()


@pytest.mark.parametrize("search", [
    {"steps": 2, "segments": 2, "population": 9, "generations": 3, "choices": {"width": [1.0, 0.75, 0.5]}},  # 9
    {"steps": 2, "segments": 2, "population": 9, "generations": 3, "axes": ["width"]},  # the same 9 schedules
    {"steps": 1, "segments": 1, "population": 2, "generations": 4},  # 3 schedules, one-step keys
])
def test_nsga2_ends_cleanly_when_the_space_is_exhausted(tiny_supernet, tmp_path, capsys, search):
    files = run_search(_cfg(**search), tiny_supernet, tmp_path / "run", progress=True, cache_dir=str(tmp_path / "c"))
    space = 3 ** search["segments"]
    assert len(files.rows) <= space and files.table()["schedule"].is_unique
    out = capsys.readouterr().out
    if len(files.rows) == space:
        assert "exhausted" in out
    generations = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert generations["generation"].tolist() == list(range(1, len(generations) + 1)), "numbered from 1"


def test_one_step_schedule_keys_stay_text_through_resume_and_report(tiny_supernet, tmp_path):
    search = {"steps": 1, "segments": 1, "population": 2, "generations": 1}
    first = _search(tiny_supernet, tmp_path / "run", tmp_path / "c", **search)
    keys = set(first.rows)
    assert keys <= {"width=1.0", "width=0.75", "width=0.5"}
    resumed = run_search(_cfg(**search), tiny_supernet, tmp_path / "run", resume=True, progress=False,
                         cache_dir=str(tmp_path / "c"))
    assert set(resumed.rows) == keys, "a resumed run reads its keys back as text and repeats nothing"
    table = report.load_run(tmp_path / "run")
    assert table["schedule"].map(type).eq(str).all() and table.apply(report.row_subnets, axis=1).map(len).eq(1).all()
    assert report.pick(table, "100%")["schedule"] in keys


class _Killed(Exception):
    """Stands in for kill -9 at a chosen moment."""


class _SyntheticEvaluator:
    """Scores a schedule by a fixed formula plus deterministic noise that shrinks with the image count:
    a landscape designed so that screening decides, fast, with nothing random between runs."""

    def __init__(self, *args, **kwargs):
        pass

    def evaluate(self, candidate, samples=None):
        import zlib

        widths = [s.subnet["width"] for s in candidate.steps]
        quality = sum((1 - w) * (i + 1) for i, w in enumerate(widths))  # late steps matter most
        jitter = (zlib.crc32(repr((widths, samples)).encode()) % 1000) / 1000 - 0.5
        fid = quality + 4 * jitter / samples ** 0.5
        return {"fid": fid, "kid": fid / 100, "drift": fid / 10, "samples": samples, "seed_set": "search", "seconds": 0.0,
                "steps_run": len(widths), "steps_saved": 0}


def test_screened_search_resumes_exactly_after_a_kill_among_full_evaluations(tiny_supernet, tmp_path, monkeypatch):
    from ddsm_search.search import worker as evaluator_module

    monkeypatch.setattr(evaluator_module, "Evaluator", _SyntheticEvaluator)
    screened = {"screen_samples": 10, "screen_margin": 0.3, "generations": 4, "population": 8}
    cache = tmp_path / "cache"
    straight = _search(tiny_supernet, tmp_path / "straight", cache, **screened).table()
    later = straight[straight["generation"] > 1]  # generations are numbered from 1
    assert (later["samples"] == 10).any() and (later["samples"] == 40).sum() >= 3, \
        "later generations must both screen out and fully evaluate candidates for this test to mean anything"

    real_run = pool_module.LocalPool.run
    calls = {"n": 0}

    def dying_run(self, jobs, samples):
        calls["n"] += 1
        for done, item in enumerate(real_run(self, jobs, samples)):
            # the second generation's full evaluations (4th call: screen, full, screen, full): one lands, then kill
            if calls["n"] == 4 and done == 1:
                raise _Killed
            yield item

    monkeypatch.setattr(pool_module.LocalPool, "run", dying_run)
    with pytest.raises(_Killed):
        _search(tiny_supernet, tmp_path / "killed", cache, **screened)
    monkeypatch.setattr(pool_module.LocalPool, "run", real_run)
    partial = pd.read_csv(tmp_path / "killed" / "evaluations.csv", dtype={"schedule": str, "genome": str})
    assert ((partial["generation"] == 2) & (partial["samples"] == 40)).sum() == 1, \
        "the kill lands inside generation 2's full evaluations"
    resumed = run_search(_cfg(**screened), tiny_supernet, tmp_path / "killed", resume=True, progress=False,
                         cache_dir=str(cache)).table()
    both = [t.sort_values("schedule").reset_index(drop=True)[COMPARED] for t in (straight, resumed)]
    pd.testing.assert_frame_equal(both[0], both[1])


def test_population_larger_than_the_space_is_refused_before_anything_is_written(tiny_supernet, tmp_path):
    with pytest.raises(DDSMError, match="search.population: 4 is more than the 3 schedules"):
        _search(tiny_supernet, tmp_path / "run", tmp_path / "c", steps=1, segments=1, population=4)
    assert not (tmp_path / "run").exists()


def test_a_worker_side_settings_error_leaves_no_run_behind(tiny_supernet, tmp_path):
    # the YAML allows 200 steps (T = 1000) but the supernet was trained with T = 100
    cfg = config_from_dict(tiny_dict(diffusion={"timesteps": 1000}, search={**SEARCH, "steps": 200, "segments": 2}))
    with pytest.raises(DDSMError, match="search.steps: must be between 1 and diffusion.timesteps=100"):
        run_search(cfg, tiny_supernet, tmp_path / "run", progress=False, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "run").exists()
    cfg = config_from_dict(tiny_dict(diffusion={"timesteps": 1000}, search={**SEARCH, "steps": 50, "segments": 2}))
    run_search(cfg, tiny_supernet, tmp_path / "run", progress=False, cache_dir=str(tmp_path / "c"),
               generations=1)  # a rerun is not refused: nothing was left behind


def test_a_moved_supernet_is_accepted_by_hash_for_report_export_and_resume(tiny_supernet, tmp_path, capsys):
    import json
    import shutil

    old = tmp_path / "old-net"
    shutil.copytree(tiny_supernet, old)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search={**SEARCH, "generations": 1})))
    run = tmp_path / "run"
    assert main(["search", str(config), "--supernet", str(old), "--out", str(run), "--quiet"]) == 0
    moved = tmp_path / "moved-net"
    old.rename(moved)
    assert main(["report", str(run), "--budget", "100%"]) == 2, "the recorded path is gone"
    assert "--supernet" in capsys.readouterr().err
    assert main(["report", str(run), "--budget", "100%", "--supernet", str(moved)]) == 0
    out = tmp_path / "s.json"
    assert main(["export", str(run), "--budget", "100%", "--out", str(out), "--n", "8", "--quiet",
                 "--supernet", str(moved)]) == 0
    assert json.loads(out.read_text())["supernet"]["path"] == str(moved)
    config.write_text(yaml.safe_dump(tiny_dict(search={**SEARCH, "generations": 2})))
    assert main(["search", str(config), "--supernet", str(moved), "--out", str(run), "--resume", "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["supernet"]["path"] == str(moved.resolve())
    capsys.readouterr()


def test_search_choices_restrict_the_space_and_run_json_records_them(tiny_supernet, tmp_path):
    search = {"steps": 2, "segments": 2, "population": 4, "generations": 1, "choices": {"width": [1.0, 0.5]}}
    files = _search(tiny_supernet, tmp_path / "run", tmp_path / "c", **search)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["axes"] == {"width": [1.0, 0.5]} and info["base"] == "width=1.0" and "widths" not in info
    table = report.load_run(tmp_path / "run")
    assert len(files.rows) == 4 and {s["width"] for _, r in table.iterrows() for s in report.row_subnets(r)} == {1.0, 0.5}
    with pytest.raises(DDSMError, match=r"search.choices.width: \[0.3\] not among the supernet's width choices"):
        _search(tiny_supernet, tmp_path / "bad", tmp_path / "c", choices={"width": [1.0, 0.3]})
    with pytest.raises(DDSMError, match="search.axes: 'depth' is not an axis of the unet"):
        _search(tiny_supernet, tmp_path / "bad", tmp_path / "c", axes=["depth"])
    with pytest.raises(DDSMError, match="search.choices: 'depth' is not an axis of the unet"):
        _search(tiny_supernet, tmp_path / "bad", tmp_path / "c", choices={"depth": [2]})
    assert not (tmp_path / "bad").exists()


def test_runs_with_version_1_width_keys_still_load(tiny_supernet, tmp_path):
    import shutil

    search = {"steps": 2, "segments": 2, "population": 4, "generations": 1}
    _search(tiny_supernet, tmp_path / "run", tmp_path / "c", **search)
    new = report.load_run(tmp_path / "run")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    for name in ("evaluations.csv", "front.csv"):  # keys as version 1 wrote them: ':g' widths, spaces between
        table = pd.read_csv(old / name, dtype={"schedule": str, "genome": str})
        table["schedule"] = table["schedule"].map(
            lambda key: " ".join(f"{s['width']:g}" for s in parse_schedule(key)))
        table.to_csv(old / name, index=False)
    info = json.loads((old / "run.json").read_text())
    info["widths"] = info.pop("axes")["width"]
    del info["base"]
    (old / "run.json").write_text(json.dumps(info))
    assert "1 1" in (old / "evaluations.csv").read_text()
    loaded = report.load_run(old)
    pd.testing.assert_frame_equal(loaded[["schedule", "uniform", "on_front", "gflops", "fid"]],
                                  new[["schedule", "uniform", "on_front", "gflops", "fid"]])
    assert loaded["subnets"].tolist() == new["subnets"].tolist()
