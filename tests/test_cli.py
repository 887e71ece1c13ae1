"""The command line: the train -> sample path works, and every bad input is one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ddsm_search.cli.main import main
from tests.conftest import tiny_dict


@pytest.fixture(scope="module")
def supernet_dir(tiny_supernet):
    """The session's tiny supernet, trained through the CLI."""
    return tiny_supernet


def _fails(capsys, argv, match):
    """Run the CLI, expect exit 2 and one stderr line containing `match`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddsm-search: error:"), err
    assert match in err[0], err[0]


def test_train_writes_checkpoint_and_grids(supernet_dir):
    meta = json.loads((supernet_dir / "meta.json").read_text())
    assert meta["step"] == 3 and meta["version"] == 2 and meta["axes"] == {"width": [1.0, 0.75, 0.5]}
    assert sorted(p.name for p in (supernet_dir / "samples").glob("*.png")) == [
        "width-0.5.png", "width-0.75.png", "width-1.0.png"]


def _images(npz):
    with np.load(npz) as data:
        return data["images"].copy(), list(data["subnets"])


def test_sample_width_png_and_npz(supernet_dir, tmp_path, capsys):
    png, npz = tmp_path / "grid.png", tmp_path / "imgs.npz"
    assert main(["sample", str(supernet_dir), "--width", "0.5", "--n", "6", "--out", str(png), "--quiet"]) == 0
    assert png.stat().st_size > 0 and "of full size" in capsys.readouterr().out
    assert main(["sample", str(supernet_dir), "--width", "0.5", "--n", "6", "--out", str(npz), "--quiet"]) == 0
    with np.load(npz) as data:
        assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
        first = data["images"].copy()
    assert main(["sample", str(supernet_dir), "--width", "0.5", "--n", "6", "--out", str(npz), "--quiet"]) == 0
    with np.load(npz) as data:
        assert np.array_equal(first, data["images"]), "the same seed must give the same images"


def test_subnet_flag_equals_the_width_shorthand(supernet_dir, tmp_path):
    by_width, by_subnet, full = tmp_path / "w.npz", tmp_path / "s.npz", tmp_path / "f.npz"
    assert main(["sample", str(supernet_dir), "--width", "0.5", "--n", "6", "--out", str(by_width), "--quiet"]) == 0
    assert main(["sample", str(supernet_dir), "--subnet", "width=0.5", "--n", "6", "--out", str(by_subnet),
                 "--quiet"]) == 0
    (images, subnets), (same, same_subnets) = _images(by_width), _images(by_subnet)
    assert np.array_equal(images, same) and subnets == same_subnets == ["width=0.5"] * 5
    assert main(["sample", str(supernet_dir), "--subnet", "width=1.0", "--n", "6", "--out", str(full), "--quiet"]) == 0
    assert not np.array_equal(images, _images(full)[0]), "a different subnet gives different images"


def test_sample_schedule_file(supernet_dir, tmp_path):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"widths": [0.5, 0.5, 0.75, 1.0, 1.0]}))  # version 1: one width per step
    out = tmp_path / "s.npz"
    assert main(["sample", str(supernet_dir), "--schedule", str(schedule), "--n", "3", "--out", str(out), "--quiet"]) == 0
    images, subnets = _images(out)
    assert subnets == ["width=0.5", "width=0.5", "width=0.75", "width=1.0", "width=1.0"]
    version2 = tmp_path / "s2.json"
    version2.write_text(json.dumps({"subnets": [{"width": w} for w in (0.5, 0.5, 0.75, 1.0, 1.0)]}))
    out2 = tmp_path / "s2.npz"
    assert main(["sample", str(supernet_dir), "--schedule", str(version2), "--n", "3", "--out", str(out2),
                 "--quiet"]) == 0
    same, same_subnets = _images(out2)
    assert np.array_equal(same, images) and same_subnets == subnets, "both formats sample the same images"


def test_bad_train_inputs(tmp_path, capsys):
    _fails(capsys, ["train", str(tmp_path / "nope.yaml")], "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    _fails(capsys, ["train", str(bad)], "malformed YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(tiny_dict(model={"channels": 3})))
    _fails(capsys, ["train", str(unknown)], "unknown key 'model.channels'")
    folder = tmp_path / "folder.yaml"
    folder.write_text(yaml.safe_dump(tiny_dict(data={"kind": "folder", "path": str(tmp_path / "no-images")})))
    out = tmp_path / "out"
    _fails(capsys, ["train", str(folder), "--out", str(out)], "no-images")
    assert not out.exists(), "nothing may be written when the input is bad"
    _fails(capsys, ["train", str(unknown), "--steps", "0"], "--steps")
    _fails(capsys, ["trian"], "invalid choice")


def test_bad_sample_inputs(supernet_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["sample", str(supernet_dir), "--out", str(out), "--quiet"]
    _fails(capsys, ["sample", str(tmp_path / "missing"), "--width", "1", "--out", str(out)], "supernet directory not found")
    _fails(capsys, ["sample", str(tmp_path), "--width", "1", "--out", str(out)], "not a supernet directory")
    _fails(capsys, base + ["--width", "0.3"], "width 0.3 is not in the supernet")
    _fails(capsys, base + ["--subnet", "width=0.3"], "width 0.3 is not in the supernet")
    _fails(capsys, ["sample", str(supernet_dir), "--width", "1", "--out", str(tmp_path / "x.jpg")], "--out must end in")
    _fails(capsys, base, "one of the arguments --subnet --width --schedule is required")
    _fails(capsys, base + ["--width", "1", "--subnet", "width=1"], "not allowed with argument")
    schedule = tmp_path / "s.json"
    # each schedule case in format version 2 ("subnets") and in version 1 ("widths")
    for steps in (lambda ws: {"subnets": [{"width": w} for w in ws]}, lambda ws: {"widths": ws}):
        schedule.write_text(json.dumps(steps([1.0, 0.3])))
        _fails(capsys, base + ["--schedule", str(schedule)], "width 0.3 is not in the supernet")
        schedule.write_text(json.dumps({**steps([1.0, 0.5]), "sampler": {"steps": 3}}))
        _fails(capsys, base + ["--schedule", str(schedule)], "2 subnets but its sampler runs 3 steps")
        schedule.write_text(json.dumps(steps([1.0, 0.5])))
        _fails(capsys, base + ["--schedule", str(schedule), "--sample-steps", "50"], "2 subnets but --sample-steps asks for 50")
        schedule.write_text(json.dumps({**steps([1.0]), "supernet": {"sha256": "0" * 64}}))
        _fails(capsys, base + ["--schedule", str(schedule)], "made for another supernet")
    schedule.write_text(json.dumps({"subnets": [{"width": 1.0}, {"depth": 2}]}))
    _fails(capsys, base + ["--schedule", str(schedule)], "step 1: this supernet has no axis 'depth'")
    schedule.write_text("{not json")
    _fails(capsys, base + ["--schedule", str(schedule)], "not valid JSON")
    assert not out.exists(), "nothing may be written when the input is bad"


def test_one_spelling_per_meaning_and_the_old_steps_still_work(supernet_dir, tmp_path, capsys):
    """--train-steps trains, --sample-steps samples; the old --steps works with a one-line note; argparse's
    errors name the program once; --version."""
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    base = ["sample", str(supernet_dir), "--width", "1", "--n", "2", "--quiet"]
    assert main(base + ["--sample-steps", "3", "--out", str(new)]) == 0 and capsys.readouterr().err == ""
    assert main(base + ["--steps", "3", "--out", str(old)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ddsm-search: note: --steps is deprecated here; use --sample-steps"]
    assert np.array_equal(_images(new)[0], _images(old)[0]) and len(_images(new)[1]) == 3
    assert main(["train", "digits", "--train-steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ddsm-search: error: train: argument --train-steps: must be at least 1, got 0", err
    assert main(["finetune-exit", str(supernet_dir), "--seed", "1", "--train-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the note, then the error of a U-Net given to finetune-exit
    assert err[0] == "ddsm-search: note: --seed is deprecated here; use --train-seed" and "DiT" in err[-1]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "ddsm-search 0.1.0"


@pytest.mark.parametrize("command", ["sample", "evaluate", "train", "finetune-exit", "finetune", "search", "report",
                                     "export", "quickstart", "stages", "import-diffusers", "export-onnx"])
def test_every_command_shares_the_options_it_needs(command):
    from ddsm_search.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    options = {s for a in sub._actions for s in a.option_strings if a.help != "==SUPPRESS=="}
    assert {"--device", "--quiet"} <= options, "a network runs and a bar shows in every one of these"
    assert "--steps" not in options, "training steps are --train-steps, sampling steps --sample-steps"
    seed = next((a for a in sub._actions if "--seed" in a.option_strings and a.help != "==SUPPRESS=="), None)
    assert seed is None or seed.help == "seed of the initial noise (default 0)"


def test_module_entry_point_and_help():
    done = subprocess.run([sys.executable, "-m", "ddsm_search", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout and "sample" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "ddsm_search", "sample"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
