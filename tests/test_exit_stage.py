"""finetune-exit and sampling with AdaDiff's per-image dynamic exit on a DiT supernet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from ddsm_search.cli.main import main
from tests.conftest import tiny_dict

TINY_DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
            "widths": [1.0, 0.5], "depths": [4, 3, 2]}


@pytest.fixture(scope="module")
def dit_supernet(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-exit")
    data = tiny_dict()
    data["model"] = TINY_DIT
    (root / "dit.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(root / "dit.yaml"), "--out", str(root / "net"), "--train-steps", "3", "--quiet",
                 "--device", "cpu"]) == 0
    return root / "net"


def test_finetune_then_sample_with_dynamic_exit(dit_supernet, tmp_path, capsys):
    meta_before = (dit_supernet / "meta.json").read_bytes()
    assert main(["finetune-exit", str(dit_supernet), "--train-steps", "5", "--batch-size", "8", "--quiet",
                 "--device", "cpu"]) == 0
    info = json.loads((dit_supernet / "exit_heads.json").read_text())
    assert info["steps"] == 5 and set(info["last_losses"]) == {"final", "certainty", "layerwise", "total"}
    assert (dit_supernet / "meta.json").read_bytes() == meta_before, "the supernet itself is not changed"
    common = ["sample", str(dit_supernet), "--subnet", "width=0.5", "--n", "6", "--sample-steps", "4", "--quiet",
              "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "plain.npz")]) == 0
    assert main(common + ["--out", str(tmp_path / "never.npz"), "--exit-threshold", "2"]) == 0
    never = capsys.readouterr().out
    plain, stays = np.load(tmp_path / "plain.npz")["images"], np.load(tmp_path / "never.npz")["images"]
    assert np.array_equal(plain, stays), "a threshold no certainty reaches runs every block: the static subnet"
    assert "(100% of full size)" not in never and "GFLOPs executed per image" in never
    assert main(common + ["--out", str(tmp_path / "early.npz"), "--exit-threshold", "0"]) == 0
    early = capsys.readouterr().out
    executed = [float(line.split(" +/- ")[0].split()[-1]) for line in (never, early)]
    assert executed[1] < executed[0], "leaving at the smallest depth choice executes fewer FLOPs"
    assert not np.array_equal(np.load(tmp_path / "early.npz")["images"], plain)


def test_exit_refusals(dit_supernet, tiny_supernet, tmp_path, capsys):
    out = tmp_path / "x.png"
    cases = [
        (["sample", str(tiny_supernet), "--width", "1.0", "--exit-threshold", "0.9"], "needs a DiT supernet"),
        (["sample", str(dit_supernet), "--width", "1.0", "--exit-threshold", "nan"], "must be a finite number"),
        (["finetune-exit", str(tiny_supernet), "--train-steps", "1"], "needs a DiT supernet"),
        (["finetune-exit", str(dit_supernet), "--train-steps", "1", "--lr", "-1"], "--lr positive"),
    ]
    for argv, message in cases:
        assert main(argv + (["--out", str(out), "--quiet"] if argv[0] == "sample" else ["--quiet"])) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    heads = dit_supernet / "exit_heads.safetensors"
    if not heads.exists():
        assert main(["finetune-exit", str(dit_supernet), "--train-steps", "1", "--quiet"]) == 0
    heads.write_bytes(heads.read_bytes()[:-1] + b"x")
    assert main(["sample", str(dit_supernet), "--width", "1.0", "--exit-threshold", "0.5", "--out", str(out),
                 "--quiet"]) == 2
    assert "does not match its hash" in capsys.readouterr().err and not out.exists()
