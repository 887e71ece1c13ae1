"""The evaluate stage and `ddsm-search evaluate`: common random numbers, the noise floor, the default path
never importing clean-fid, and bad inputs ending in one line and exit status 2 with no file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.errors import DDSMError
from ddsm_search.evaluation.quality import evaluate, noise_floor
from ddsm_search.evaluation.scoring import Scorer, scorer_for, training_reference
from ddsm_search.metrics import get_extractor, seed_for
from ddsm_search.sampling import PrefixCache, Runtime, generate
from ddsm_search.space.subnet import Subnet, schedule_key

W = {w: Subnet.of(width=w) for w in (1.0, 0.75, 0.5)}


@pytest.fixture(scope="module")
def supernet_dir(tiny_supernet):
    """The session's tiny supernet, trained through the CLI."""
    return tiny_supernet


@pytest.fixture(scope="module")
def scoring(supernet_dir, tmp_path_factory):
    """The loaded supernet, the digits extractor and the training reference in a fresh cache."""
    supernet = load_supernet(supernet_dir)
    extractor = get_extractor("digits-cnn")
    cache = tmp_path_factory.mktemp("cache")
    return supernet, extractor, training_reference(supernet.config.data, extractor, cache_dir=cache), cache


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    # the CLI uses the default cache: keep it out of the user's home
    monkeypatch.setenv("DDSM_SEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cli-cache"))


def _score(scoring, subnets, **kw):
    supernet, extractor, reference, _ = scoring
    plan = Runtime(supernet).plan(subnets)  # the config's sampler
    return evaluate(plan, Scorer(extractor, reference, extractor), **{"n": 40, **kw})


def test_evaluate_result(scoring):
    supernet = scoring[0]
    result = _score(scoring, [W[0.5]] * 5)
    assert result["gflops_per_image"] == pytest.approx(supernet.schedule_flops([W[0.5]] * 5) / 1e9)
    assert result["gflops_per_image"] == pytest.approx(5 * supernet.flops[W[0.5]] / 1e9)
    assert result["schedule"] == "width=0.5*5" and result["steps"] == 5 and "widths" not in result
    assert result["n"] == 40 and result["seed_set"] == "search" and result["extractor"] == "digits-cnn"
    assert result["fid"] > 0 and np.isfinite(result["kid"]) and result["kid_std"] >= 0
    assert result["seconds"] > 0 and result["eval_seconds"] > 0 and result["reference"].startswith("digits-train/train/")
    json.dumps(result)  # plain data, ready for --json


def test_common_random_numbers(scoring):
    subnets = [W[1.0], W[1.0], W[0.75], W[0.5], W[0.5]]
    first, again = _score(scoring, subnets), _score(scoring, subnets)
    assert (first["fid"], first["kid"]) == (again["fid"], again["kid"]), "the same seed set must give the same scores"
    assert first["schedule"] == schedule_key(subnets) == "width=1.0*2 width=0.75 width=0.5*2"
    as_widths = _score(scoring, [1.0, 1.0, 0.75, 0.5, 0.5])  # bare numbers are widths
    assert (as_widths["fid"], as_widths["schedule"]) == (first["fid"], first["schedule"])
    other = _score(scoring, subnets, seed_set="search/1")
    heldout = _score(scoring, subnets, seed_set="heldout")
    assert len({first["fid"], other["fid"], heldout["fid"]}) == 3
    # one generator draws all n images' noise: the first k images are the same at any n and batch size
    supernet = scoring[0]
    plan = Runtime(supernet).plan(subnets)
    small = generate(plan, n=3, seed=seed_for("search"))
    large = generate(plan, n=7, seed=seed_for("search"), batch_size=2)
    assert torch.allclose(small, large[:3], atol=1e-5)


def test_prefix_cache_passes_through(scoring):
    cache = PrefixCache(boundaries=[2])
    plain = _score(scoring, [W[1.0]] * 2 + [W[0.5]] * 3)
    _score(scoring, [W[1.0]] * 2 + [W[0.75]] * 3, cache=cache)
    resumed = _score(scoring, [W[1.0]] * 2 + [W[0.5]] * 3, cache=cache)
    assert cache.steps_saved == 2 and resumed["fid"] == pytest.approx(plain["fid"], rel=1e-6)


def test_evaluate_defaults_and_errors(scoring):
    supernet, _, _, cache = scoring
    result = evaluate(Runtime(supernet).plan([W[1.0]] * 5), scorer_for(supernet, cache_dir=cache), n=10,
                      cache_dir=cache)  # default extractor, cached reference
    assert result["extractor"] == "digits-cnn"
    for bad in (0.3, Subnet.of(width=0.3), "width=0.3"):
        with pytest.raises(DDSMError, match="width 0.3 is not in the supernet"):
            _score(scoring, [bad] * 5)
    with pytest.raises(DDSMError, match="this supernet has no axis 'depth'"):
        _score(scoring, [Subnet.of(width=1.0, depth=2)] * 5)
    with pytest.raises(DDSMError, match="at least 2 images"):
        _score(scoring, [W[1.0]] * 5, n=1)
    with pytest.raises(DDSMError, match="unknown seed set 'train'"):
        _score(scoring, [W[1.0]] * 5, seed_set="train")


def test_noise_floor(scoring):
    supernet, extractor, reference, _ = scoring
    data = supernet.config.data
    held = noise_floor(data, n=100, extractor=extractor, reference=reference)
    assert held["pool"] == 300 and not held["with_replacement"] and 0 < held["fid"] < 5
    bigger = noise_floor(data, n=400, extractor=extractor, reference=reference, seed=1)
    assert bigger["with_replacement"]
    inside = noise_floor(data, n=100, source="train", extractor=extractor, reference=reference)
    assert inside["pool"] == 1497 and inside["fid"] < held["fid"]
    with pytest.raises(DDSMError, match="source must be"):
        noise_floor(data, n=10, source="valid", extractor=extractor, reference=reference)


def test_default_path_never_imports_cleanfid(supernet_dir, tmp_path):
    out = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        import sys
        from ddsm_search.cli.main import main
        status = main(["evaluate", {str(supernet_dir)!r}, "--width", "1", "--n", "8", "--quiet", "--device", "cpu",
                       "--json", {str(out)!r}])
        print(status, "cleanfid" in sys.modules, any(m.startswith("cleanfid") for m in sys.modules))
    """)
    env = {**os.environ, "DDSM_SEARCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip().splitlines()[-1] == "0 False False", done.stdout + done.stderr
    assert json.loads(out.read_text())["n"] == 8


def test_cli_evaluate(supernet_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    base = ["evaluate", str(supernet_dir), "--n", "12", "--quiet", "--device", "cpu"]
    assert main(base + ["--width", "0.75", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "GFLOPs per image" in printed and "sampling" in printed
    result = json.loads(out.read_text())
    assert {"fid", "kid", "kid_std", "gflops_per_image", "seconds", "eval_seconds", "n", "seed_set", "schedule"} <= set(result)
    assert result["schedule"] == "width=0.75*5"
    same = tmp_path / "same.json"
    assert main(base + ["--subnet", "width=0.75", "--json", str(same)]) == 0
    capsys.readouterr()
    assert (json.loads(same.read_text())["fid"], json.loads(same.read_text())["schedule"]) == (result["fid"], result["schedule"])
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"widths": [0.5, 0.5, 0.75, 1.0, 1.0]}))
    assert main(base + ["--schedule", str(schedule), "--seeds", "heldout"]) == 0
    assert "seeds heldout" in capsys.readouterr().out
    schedule.write_text(json.dumps({"subnets": [{"width": w} for w in (0.5, 0.5, 0.75, 1.0, 1.0)]}))
    assert main(base + ["--schedule", str(schedule), "--seeds", "heldout"]) == 0
    assert "seeds heldout" in capsys.readouterr().out


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddsm-search: error:"), err
    assert match in err[0], err[0]


def test_cli_evaluate_bad_inputs(supernet_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    base = ["evaluate", str(supernet_dir), "--n", "8", "--quiet", "--json", str(out)]
    _fails(capsys, ["evaluate", str(tmp_path / "missing"), "--width", "1", "--json", str(out)], "supernet directory not found")
    _fails(capsys, base + ["--width", "0.3"], "width 0.3 is not in the supernet")
    _fails(capsys, base + ["--subnet", "width=0.3"], "width 0.3 is not in the supernet")
    _fails(capsys, base + ["--subnet", "width=half"], "is not a number")
    _fails(capsys, base + ["--subnet", "depth=2"], "this supernet has no axis 'depth'")
    _fails(capsys, base + ["--width", "1", "--seeds", "train"], "unknown seed set 'train'")
    _fails(capsys, base + ["--width", "1", "--n", "1"], "--n must be at least 2")
    _fails(capsys, base + ["--width", "1", "--n", "0"], "--n")
    _fails(capsys, base + ["--width", "1", "--extractor", "vgg"], "invalid choice: 'vgg'")
    _fails(capsys, base, "one of the arguments --subnet --width --schedule is required")
    _fails(capsys, ["evaluate", str(supernet_dir), "--width", "1", "--json", str(tmp_path / "r.txt")], "--json must end in .json")
    monkeypatch.setenv("DDSM_INCEPTION_WEIGHTS", str(tmp_path / "nowhere" / "inception-2015-12-05.pt"))
    _fails(capsys, base + ["--width", "1", "--extractor", "inception"], "Inception weights not found")
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"widths": [1.0, 0.5]}))
    _fails(capsys, base + ["--schedule", str(schedule), "--sample-steps", "5"], "2 subnets but --sample-steps asks for 5")
    schedule.write_text(json.dumps({"subnets": [{"width": 1.0}, {"width": 0.5}]}))
    _fails(capsys, base + ["--schedule", str(schedule), "--sample-steps", "5"], "2 subnets but --sample-steps asks for 5")
    assert not out.exists() and not list(tmp_path.glob(".r.json*")), "nothing may be written when the input is bad"
