"""Sparse-to-sparse supernet training (train.sparsity): masks of the density asked, RigL and MagRan
regrowth, exact resume, slicing, the sparse FLOPs table, the search's cost and bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddsm_search.backbones.cost import active_slice, flops_tables
from ddsm_search.backbones.registry import build_supernet
from ddsm_search.backbones.slim import slim_layers
from ddsm_search.checkpoint import load_supernet, read_meta
from ddsm_search.cli.main import main
from ddsm_search.config import SparsityConfig, config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.methods.sparsity.masks import Sparsifier, layer_densities, maskable_layers
from ddsm_search.methods.sparsity.plugin import MASKS
from ddsm_search.space.subnet import Subnet
from ddsm_search.training import TrainingRun, train
from tests.conftest import tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")

DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 16, "blocks": 2, "head_dim": 4, "mlp_ratio": 2.0,
       "widths": [1.0, 0.5], "depths": [2, 1]}


def _cfg(method="rigl", density=0.5, model=None, **sparsity):
    sections = {"train": {"sparsity": {"method": method, "density": density, "update_every": 2, "stop_at": 1.0,
                                       **sparsity}}}
    if model is not None:
        sections["model"] = model
    data = tiny_dict(**sections)
    if model is not None:
        data["model"] = model  # replace, not merge: the U-Net's keys are no DiT's
    return config_from_dict(data)


@pytest.fixture(scope="module")
def sparse_net(tmp_path_factory):
    """A tiny RigL supernet (6 steps, masks updated every 2), trained once for the module."""
    out = tmp_path_factory.mktemp("sparse") / "net"
    return train(_cfg(), out, progress=False, grids=False)


# --- masks: density, which layers ----------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("density", [0.75, 0.5, 0.25])
def test_density_is_what_was_asked_per_layer_and_in_total(distribution, density):
    cfg = _cfg("static", density, distribution=distribution)
    model = build_supernet(cfg.model, (1, 8, 8))
    sparse = Sparsifier(cfg.train.sparsity, model, 10, seed=0)
    shapes = {n: tuple(m.weight.shape) for n, m in maskable_layers(model).items()}
    wanted = layer_densities(shapes, density, distribution)
    for name, mask in sparse.masks.items():
        assert mask.dtype == torch.bool and tuple(mask.shape) == shapes[name]
        assert int(mask.sum()) == max(1, round(wanted[name] * mask.numel())), name  # exact per layer
        if distribution == "uniform":
            assert abs(mask.float().mean() - density) <= 0.5 / mask.numel() + 1e-9
    total = sum(int(m.sum()) for m in sparse.masks.values()) / sum(m.numel() for m in sparse.masks.values())
    assert abs(total - density) < 0.5 * len(shapes) / sum(m.numel() for m in sparse.masks.values()) + 1e-9
    assert sparse.summary()["total"] == pytest.approx(total, abs=1e-6)


def test_erk_follows_evci_and_keeps_small_layers_denser():
    shapes = {"big": (64, 64, 3, 3), "small": (8, 4, 1, 1), "linear": (256, 128)}
    d = layer_densities(shapes, 0.3, "erk")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(0.3 * sum(numel.values()))
    assert d["small"] == 1.0 and d["linear"] < 1.0  # small would exceed 1: made dense, the rest rescaled
    ratio = d["big"] / d["linear"]
    assert ratio == pytest.approx((sum(shapes["big"]) / numel["big"]) / (sum(shapes["linear"]) / numel["linear"]))


@pytest.mark.parametrize("model, dense", [
    (None, {"conv_in", "conv_out"}),
    (DIT, {"patch_embed", "final_layer.linear"}),
    ({"kind": "multistage", "base_channels": 8, "channel_mults": [1, 2], "group_size": 2, "head_dim": 4,
      "widths": [1.0, 0.5], "decoders": [{"channels": 8}, {"channels": 4}]},
     {"encoder.conv_in", "decoders.0.conv_out", "decoders.1.conv_out"}),
])
def test_every_conv_and_linear_but_the_first_and_last_is_masked(model, dense):
    cfg = _cfg("static", model=model)
    net = build_supernet(cfg.model, (1, 8, 8))
    layers = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert dense <= layers
    assert set(maskable_layers(net)) == layers - dense


# --- RigL and MagRan on one small layer -------------------------------------------------------------------

class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(10, 4, bias=False)  # 40 weights


def _small(method, seed=0):
    torch.manual_seed(seed)
    model = _One()
    cfg = SparsityConfig(method=method, density=0.5, update_every=1, drop_fraction=0.2, stop_at=1.0)
    sparse = Sparsifier(cfg, model, total_steps=1000, seed=seed)
    sparse.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.layer.weight.grad = torch.randn(4, 10)
    opt.step()  # optimizer state everywhere
    sparse.apply(model)
    model.layer.weight.grad = torch.randn(4, 10)
    return model, sparse, opt


def _expected_drop(before: torch.Tensor, old: torch.Tensor, n: int) -> torch.Tensor:
    """The n active weights of smallest magnitude, computed here apart from the sparsifier."""
    scores = before.abs().masked_fill(~old, math.inf).flatten()
    drop = torch.zeros(old.numel(), dtype=torch.bool)
    drop[scores.topk(n, largest=False).indices] = True
    return drop.view(old.shape)


def test_rigl_drops_the_smallest_and_regrows_where_the_gradient_is_largest():
    model, sparse, opt = _small("rigl")
    w = model.layer.weight
    old, before, grad = sparse.masks["layer"].clone(), w.detach().clone(), w.grad.abs().clone()
    n = round(sparse.drop_fraction(1) * int(old.sum()))
    assert n == 4  # 0.2 / 2 * (1 + cos(pi / 1000)) of 20 active
    drop = _expected_drop(before, old, n)
    candidates = ~old | drop  # inactive once the drop is done (the dropped may regrow, as in RigL)
    grow = torch.zeros(old.numel(), dtype=torch.bool)
    grow[grad.masked_fill(~candidates, -1).flatten().topk(n).indices] = True
    grow = grow.view(old.shape)
    regrown = sparse.update(model, opt, 1)
    new = sparse.masks["layer"]
    assert torch.equal(new, (old & ~drop) | grow)
    assert int(new.sum()) == int(old.sum())  # the density stays
    assert regrown["layer"] == int((new & ~old).sum())
    assert (w[new & ~old] == 0).all() and (w[~new] == 0).all()  # regrown start at zero, dropped are zero
    assert torch.equal(w[old & new], before[old & new])  # the rest untouched
    state = opt.state[w]
    moved = new ^ old
    assert moved.any() and (state["exp_avg"][moved] == 0).all() and (state["exp_avg_sq"][moved] == 0).all()
    assert (state["exp_avg_sq"][old & new] != 0).all()


def test_magran_regrows_at_random_not_by_gradient():
    ranks = []
    for seed in range(60):
        model, sparse, opt = _small("magran", seed)
        w = model.layer.weight
        old, before, grad = sparse.masks["layer"].clone(), w.detach().clone(), w.grad.abs().clone()
        n = round(sparse.drop_fraction(1) * int(old.sum()))
        drop = _expected_drop(before, old, n)  # the same drop as RigL's: the smallest magnitudes
        sparse.update(model, opt, 1)
        new = sparse.masks["layer"]
        assert int(new.sum()) == int(old.sum()) and torch.equal(new & old & ~drop, old & ~drop)
        candidates = ~old | drop
        grown = new & candidates
        assert int(grown.sum()) == n
        # where the regrown weights' gradients rank among the candidates: uniform (mean 0.5), RigL's at the top
        rank = grad[candidates].argsort().argsort().float() / (int(candidates.sum()) - 1)
        ranks.append(float(rank[grown[candidates]].mean()))
    assert 0.4 < sum(ranks) / len(ranks) < 0.6
    a, b = _small("magran", 3), _small("magran", 3)  # reproducible: the same seed draws the same regrowth
    a[1].update(a[0], a[2], 1)
    b[1].update(b[0], b[2], 1)
    assert torch.equal(a[1].masks["layer"], b[1].masks["layer"])


def test_update_schedule_is_rigls_cosine_until_stop_at():
    cfg = SparsityConfig(method="rigl", density=0.5, update_every=10, drop_fraction=0.3, stop_at=0.5)
    sparse = Sparsifier(cfg, _One(), total_steps=100, seed=0)
    assert [s for s in range(1, 101) if sparse.is_update_step(s)] == [10, 20, 30, 40]
    assert sparse.drop_fraction(0) == pytest.approx(0.3) and sparse.drop_fraction(25) == pytest.approx(0.15)
    assert sparse.drop_fraction(50) == pytest.approx(0.0, abs=1e-12)
    static = Sparsifier(SparsityConfig(method="static"), _One(), total_steps=100, seed=0)
    assert not any(static.is_update_step(s) for s in range(1, 101))


# --- training, checkpoints, resume ---------------------------------------------------------------------

def test_masks_are_checkpointed_and_the_ema_weights_are_masked(sparse_net):
    meta = read_meta(sparse_net)
    assert meta["sparsity"]["masks"] == MASKS and len(meta["sparsity"]["masks_sha256"]) == 64
    assert meta["sparsity"]["total"] == pytest.approx(0.5, abs=0.01)
    net = load_supernet(sparse_net)
    assert net.sparse and set(net.masks) == set(maskable_layers(net.model))
    modules = dict(net.model.named_modules())
    for name, mask in net.masks.items():
        assert (modules[name].weight[~mask] == 0).all(), name
    state = load_file(str(sparse_net / "train_state.safetensors"))
    for name, mask in net.masks.items():  # the online weights too
        assert (state[f"model.{name}.weight"][~mask] == 0).all()


def test_masks_survive_resume_bit_exactly(tmp_path, monkeypatch):
    cfg = _cfg("rigl")  # 6 steps, a checkpoint every 3, masks updated at steps 2 and 4 (not at 6: stop_at)
    straight = train(cfg, tmp_path / "a", progress=False, grids=False)
    step = TrainingRun.train_step

    def killed_after_3(run, *args, **kwargs):
        if run.step == 3:
            raise KeyboardInterrupt  # the run dies after its checkpoint at step 3, its target still 6
        return step(run, *args, **kwargs)

    monkeypatch.setattr(TrainingRun, "train_step", killed_after_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=False, grids=False)
    assert read_meta(tmp_path / "b")["step"] == 3
    monkeypatch.setattr(TrainingRun, "train_step", step)
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False, grids=False)
    a, b = load_file(str(straight / MASKS)), load_file(str(resumed / MASKS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("supernet.safetensors", "train_state.safetensors"):
        x, y = load_file(str(straight / name)), load_file(str(resumed / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    first = load_file(str(tmp_path / "a" / MASKS))
    assert any(not torch.equal(first[k], Sparsifier(cfg.train.sparsity, build_supernet(cfg.model, (1, 8, 8)), 6, 0)
                               .mask_tensors()[k]) for k in first), "RigL moved the masks"


def test_a_sparse_run_sees_the_dense_runs_batches():
    from ddsm_search.data import load_data

    dense, sparse = config_from_dict(tiny_dict()), _cfg("static")
    runs = [TrainingRun(c, load_data(c.data), "cpu") for c in (dense, sparse)]
    assert all(torch.equal(p, q) for p, q in zip(runs[0].batch(), runs[1].batch()))


def test_a_tampered_mask_is_refused(sparse_net, tmp_path):
    net = tmp_path / "net"
    shutil.copytree(sparse_net, net)
    masks = load_file(str(net / MASKS))
    key = next(iter(masks))
    masks[key] = ~masks[key]
    save_file(masks, str(net / MASKS))
    with pytest.raises(DDSMError, match="masks.safetensors does not match the hash"):
        load_supernet(net)
    with pytest.raises(DDSMError, match="does not match the hash"):
        train(_cfg(), net, steps=8, resume=True, progress=False, grids=False)


def test_a_dense_checkpoint_is_as_before(tiny_supernet):
    meta = read_meta(tiny_supernet)
    assert "sparsity" not in meta and "sparse_flops_per_image" not in meta and not (tiny_supernet / MASKS).exists()
    net = load_supernet(tiny_supernet)
    assert not net.sparse and net.with_cost("auto").cost == "dense"
    assert net.with_cost("sparse").flops == net.flops  # every weight counts


# --- slicing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [None, DIT])
def test_a_sliced_subnet_of_a_sparse_supernet_equals_the_supernet_there(model, tmp_path):
    cfg = _cfg("magran", 0.5, model=model)
    out = train(cfg, tmp_path / "net", progress=False, grids=False)
    net = load_supernet(out)
    sup = net.model
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 90])
    for subnet in sup.space:
        static = sup.export(subnet).eval()
        sup.set_subnet(subnet)
        with torch.no_grad():
            assert torch.equal(static(x, t), sup(x, t)), subnet.key
        # the exported weights are the slices: zero exactly where the slice of the mask is
        modules = dict(sup.named_modules())
        exported = dict(static.named_modules())
        for name, mask in net.masks.items():
            if name not in exported:
                continue  # a block this depth does not run
            part = active_slice(modules[name], mask)
            w = exported[name].weight
            assert w.shape == part.shape and (w[~part] == 0).all(), (subnet.key, name)
    sup.set_subnet(sup.full)


# --- the FLOPs table -------------------------------------------------------------------------------

def test_active_slice_is_the_slice_the_layer_runs():
    cfg = _cfg("static", model=DIT)
    net = build_supernet(cfg.model, (1, 8, 8))
    for subnet in net.space:
        net.set_subnet(subnet)
        for _, layer in slim_layers(net):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                assert torch.equal(active_slice(layer, layer.weight), layer.sliced_weight())


@pytest.mark.parametrize("model", [None, DIT])
def test_sparse_flops_count_the_nonzero_weights_of_each_subnets_slice(model):
    cfg = _cfg("static", 0.5, model=model)
    net = build_supernet(cfg.model, (1, 8, 8))
    layers = maskable_layers(net)
    ones = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    dense, same = flops_tables(cfg.model, (1, 8, 8), ones)
    assert same == dense
    # one layer masked out entirely: its FLOPs (the counter's own, per module) come off, at every subnet
    name = next(n for n in layers if "mlp.fc1" in n or n.endswith("conv1"))
    zeros = {**ones, name: torch.zeros_like(ones[name])}
    _, sparse = flops_tables(cfg.model, (1, 8, 8), zeros)
    with torch.device("meta"):
        meta = build_supernet(cfg.model, (1, 8, 8))
        x, t = torch.empty(1, 1, 8, 8), torch.zeros(1)
    for subnet in meta.space:
        meta.set_subnet(subnet)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            meta(x, t)
        per_module = {k.split(".", 1)[-1]: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        assert dense[subnet] - sparse[subnet] == per_module.get(name, 0), subnet.key
    # random masks: sparse below dense, about the density over the masked layers' share
    sparse_net = Sparsifier(cfg.train.sparsity, net, 10, 0)
    _, half = flops_tables(cfg.model, (1, 8, 8), sparse_net.masks)
    assert all(half[s] < dense[s] for s in dense)


def test_a_sparse_supernet_is_searched_on_its_sparse_flops_and_says_so(sparse_net, tmp_path):
    from ddsm_search.report.tables import load_run, row_subnets
    from ddsm_search.search.runner import run_search

    net = load_supernet(sparse_net)
    search = {"steps": 4, "segments": 2, "population": 4, "generations": 1, "samples": 8, "workers": 0,
              "batch_size": 8}
    tables = {}
    for cost in ("auto", "dense"):
        cfg = config_from_dict(tiny_dict(search={**search, "cost": cost}))
        run_search(cfg, sparse_net, tmp_path / cost, progress=False, cache_dir=str(tmp_path / "cache"))
        assert json.loads((tmp_path / cost / "run.json").read_text())["cost"] == {"auto": "sparse"}.get(cost, cost)
        tables[cost] = load_run(tmp_path / cost)
    assert tables["auto"].attrs["cost"] == "sparse" and tables["dense"].attrs["cost"] == "dense"
    for cost, table in tables.items():
        counted = net.with_cost("sparse" if cost == "auto" else "dense")
        for _, row in table.iterrows():
            assert row["gflops"] * 1e9 == pytest.approx(counted.schedule_flops(row_subnets(row)))
    full = Subnet.of(width=1.0)
    assert net.flops_tables["sparse"][full] < net.flops_tables["dense"][full]


# --- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity, match", [
    ({"method": "prune"}, "train.sparsity.method"),
    ({"density": 0.0}, "train.sparsity.density"),
    ({"density": 1.5}, "train.sparsity.density"),
    ({"distribution": "normal"}, "train.sparsity.distribution"),
    ({"update_every": 0}, "train.sparsity.update_every"),
    ({"drop_fraction": 1.0}, "train.sparsity.drop_fraction"),
    ({"stop_at": 2.0}, "train.sparsity.stop_at"),
    ({"densty": 0.5}, "unknown key 'train.sparsity.densty'"),
    (0.5, "train.sparsity"),
])
def test_bad_sparsity_is_one_line_exit_2_and_writes_nothing(sparsity, match, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(train={"sparsity": sparsity})))
    assert main(["train", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o").exists()


def test_bad_search_cost_is_refused(sparse_net, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search={"cost": "cheap"})))
    assert main(["train", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.cost" in err[0] and not (tmp_path / "o").exists()
    with pytest.raises(DDSMError, match="search.cost"):  # the API refuses it too
        load_supernet(sparse_net).with_cost("cheap")


def test_resume_with_other_sparsity_is_refused(sparse_net, tmp_path, capsys):
    net = tmp_path / "net"
    shutil.copytree(sparse_net, net)
    with pytest.raises(DDSMError, match="train"):
        train(_cfg(density=0.25), net, steps=8, resume=True, progress=False, grids=False)
