"""Supernet training: every subnet learns, resume is exact, checkpoints are verified and atomic."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ddsm_search.checkpoint import load_supernet
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.space.subnet import Subnet, SubnetSpace
from ddsm_search.training import sandwich_subnets, train
from tests.conftest import tiny_dict


def _losses(out) -> dict[Subnet, list[float]]:
    by_subnet: dict[Subnet, list[float]] = {}
    with open(out / "loss_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["step", "subnet", "loss"]
    for row in rows:
        by_subnet.setdefault(Subnet.parse(row["subnet"]), []).append(float(row["loss"]))
    return by_subnet


def _old_sandwich_widths(widths, n_random, generator):
    """The width-only rule sandwich_subnets replaced (as it was): largest, smallest, then uniformly the middle."""
    ordered = sorted(widths, reverse=True)
    chosen = ordered[:1] + ordered[-1:] if len(ordered) > 1 else ordered[:1]
    middle = ordered[1:-1]
    if middle:
        picks = torch.randint(len(middle), (n_random,), generator=generator).tolist()
        chosen += [middle[i] for i in picks]
    return chosen


def test_sandwich_always_has_largest_and_smallest():
    g = torch.Generator().manual_seed(0)
    seen = set()
    space = SubnetSpace.of({"width": [1.0, 0.75, 0.5, 0.25]})
    for _ in range(30):
        subnets = sandwich_subnets(space, 2, g)
        assert subnets[:2] == [Subnet.of(width=1.0), Subnet.of(width=0.25)] and len(subnets) == 4
        seen.update(subnets[2:])
    assert seen == {Subnet.of(width=0.75), Subnet.of(width=0.5)}


def test_sandwich_on_one_axis_is_the_old_width_rule():
    widths = (1.0, 0.75, 0.5, 0.25)
    space = SubnetSpace.of({"width": widths})
    for n_random in (0, 1, 3):
        new, old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for _ in range(20):
            assert [s["width"] for s in sandwich_subnets(space, n_random, new)] == _old_sandwich_widths(widths, n_random, old)
    one = SubnetSpace.of({"width": [1.0]})
    assert sandwich_subnets(one, 2, torch.Generator()) == [Subnet.of(width=1.0)] == \
        [Subnet.of(width=w) for w in _old_sandwich_widths((1.0,), 2, torch.Generator())]
    two = SubnetSpace.of({"width": [1.0, 0.5]})
    assert sandwich_subnets(two, 2, torch.Generator()) == [Subnet.of(width=1.0), Subnet.of(width=0.5)]


def test_sandwich_over_two_axes():
    space = SubnetSpace.of({"width": [1.0, 0.5, 0.25], "depth": [4, 3, 2]})
    largest, smallest = Subnet.of(width=1.0, depth=4), Subnet.of(width=0.25, depth=2)
    rest = set(space) - {largest, smallest}

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sandwich_subnets(space, 3, g) for _ in range(200)]

    first = draws(0)
    assert first == draws(0), "deterministic under a seeded generator"
    assert first != draws(1)
    seen = []
    for subnets in first:
        assert subnets[:2] == [largest, smallest] and len(subnets) == 5
        assert set(subnets[2:]) <= rest
        seen += subnets[2:]
    assert set(seen) == rest, "every other subnet (a random width with a random depth) gets drawn"
    counts = [seen.count(s) for s in rest]
    assert min(counts) > 0.5 * len(seen) / len(rest), "drawn uniformly from the rest"


def test_every_width_loss_falls(tmp_path):
    cfg = config_from_dict(tiny_dict(train={"steps": 60, "batch_size": 32, "log_every": 10, "checkpoint_every": 60,
                                            "sandwich_random": 1, "lr": 0.003}))
    out = train(cfg, tmp_path / "run", progress=False, grids=False)
    losses = _losses(out)
    assert set(losses) == {Subnet.of(width=w) for w in (0.5, 0.75, 1.0)}
    for subnet, series in losses.items():
        assert len(series) == 6
        assert series[-1] < 0.7 * series[0], f"subnet {subnet} did not learn: {series}"


def test_distillation_trains_too(tmp_path):
    cfg = config_from_dict(tiny_dict(train={"steps": 30, "batch_size": 32, "log_every": 10, "checkpoint_every": 30,
                                            "distill_weight": 0.5, "lr": 0.003}))
    losses = _losses(train(cfg, tmp_path / "run", progress=False, grids=False))
    assert all(series[-1] < series[0] for series in losses.values())


def _state(out):
    return load_file(str(out / "supernet.safetensors")), load_file(str(out / "train_state.safetensors"))


def test_resume_continues_exactly(tmp_path):
    cfg = config_from_dict(tiny_dict(model={"dropout": 0.1}))  # dropout: the global RNG must be restored too
    straight = train(cfg, tmp_path / "straight", steps=6, progress=False, grids=False)
    split = train(cfg, tmp_path / "split", steps=3, progress=False, grids=False)
    assert json.loads((split / "meta.json").read_text())["step"] == 3
    train(cfg, split, steps=6, resume=True, progress=False, grids=False)
    (ema_a, state_a), (ema_b, state_b) = _state(straight), _state(split)
    assert ema_a.keys() == ema_b.keys() and state_a.keys() == state_b.keys()
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert (straight / "loss_log.csv").read_text() == (split / "loss_log.csv").read_text()
    assert load_supernet(split).step == 6


def test_resume_and_overwrite_guards(tmp_path, tiny_cfg):
    with pytest.raises(DDSMError, match="no checkpoint"):
        train(tiny_cfg, tmp_path / "none", resume=True, progress=False, grids=False)
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False, grids=False)
    with pytest.raises(DDSMError, match="already holds a checkpoint at step 2"):
        train(tiny_cfg, out, steps=4, progress=False, grids=False)
    other = replace(tiny_cfg, model=replace(tiny_cfg.model, base_channels=16))
    with pytest.raises(DDSMError, match="differs from the checkpoint's in: model"):
        train(other, out, steps=4, resume=True, progress=False, grids=False)


def test_checkpoint_is_verified_and_leaves_no_temporaries(tmp_path, tiny_cfg):
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss_log.csv", "meta.json", "samples", "supernet.safetensors", "train_state.safetensors"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["width-0.5.png", "width-0.75.png", "width-1.0.png"]
    supernet = load_supernet(out)
    assert supernet.flops[Subnet.of(width=0.5)] < supernet.flops[Subnet.of(width=1.0)] and supernet.step == 2
    assert supernet.full_flops == supernet.flops[Subnet.of(width=1.0)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["version"] == 2 and meta["axes"] == {"width": [1.0, 0.75, 0.5]} and "widths" not in meta
    assert meta["flops_per_image"] == {s.key: f for s, f in supernet.flops.items()}
    _check_version_1_meta_loads(out, tmp_path / "v1", supernet)
    weights = out / "supernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DDSMError, match="does not match the hash"):
        load_supernet(out)


def _check_version_1_meta_loads(out, copy, supernet):
    """A meta.json of format version 1 (widths, FLOPs keyed by ':g' widths) still loads, to the same supernet."""
    import shutil

    from ddsm_search.checkpoint import meta_digest

    shutil.copytree(out, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["version"] = 1
    meta["widths"] = meta.pop("axes")["width"]
    meta["flops_per_image"] = {f"{Subnet.parse(k)['width']:g}": f for k, f in meta["flops_per_image"].items()}
    meta["meta_sha256"] = meta_digest(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    old = load_supernet(copy)
    assert old.flops == supernet.flops and old.sha256 == supernet.sha256 and old.model.space == supernet.model.space


def test_resume_refuses_corrupt_weights(tmp_path, tiny_cfg):
    out = train(tiny_cfg, tmp_path / "run", steps=2, progress=False, grids=False)
    weights = out / "supernet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DDSMError, match="does not match the hash"):
        train(tiny_cfg, out, steps=4, resume=True, progress=False, grids=False)


def test_library_ema_and_warmup_are_bit_identical_to_the_hand_written_ones():
    """The EMA (torch's AveragedModel) and the warm-up (LambdaLR) give, bit for bit, the weights and
    learning rates of the foreach lerp with the ramped decay and the warm-up formula they replaced."""
    from ddsm_search.data import load_data
    from ddsm_search.training import TrainingRun

    cfg = config_from_dict(tiny_dict(train={"steps": 6, "warmup_steps": 4, "ema_decay": 0.3}))
    run = TrainingRun(cfg, load_data(cfg.data), "cpu")
    ema = [p.detach().clone() for p in run.model.parameters()]  # the EMA starts at the initial weights
    for step in range(cfg.train.steps):
        lr = run.opt.param_groups[0]["lr"]
        assert lr == cfg.train.lr * min(1.0, (step + 1) / cfg.train.warmup_steps), step
        run.train_step()
        with torch.no_grad():  # the hand-written update, on the weights the step left
            torch._foreach_lerp_(ema, [p.detach() for p in run.model.parameters()],
                                 1 - min(cfg.train.ema_decay, (1 + step) / (10 + step)))
        assert all(torch.equal(a, b) for a, b in zip(ema, run.ema.parameters())), step
    assert not any(p.requires_grad for p in run.ema.parameters())
