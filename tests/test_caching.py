"""Feature caching (methods/caching): DeepCache on the U-Net, block caching on the DiT.

The backbone's `deep_forward` is checked exactly: a cached pass run on the same input and timestep as
the full pass that kept its features gives the full network's output, at every branch (a wrong split
or a wrong feature would not). Then the plan: a schedule cached every step (interval 1: every step
keeps, none reuses) is the full network bit for bit, cached schedules resume from the prefix cache bit
for bit under every solver, their FLOPs are measured like a subnet's, files and keys round-trip, and
bad caching is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddsm_search.backbones.dit import SlimDiT
from ddsm_search.backbones.unet import SlimUNet
from ddsm_search.checkpoint import in_memory, load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.methods.caching.steps import check_values, pattern
from ddsm_search.sampling import PrefixCache, Runtime, generate
from ddsm_search.schedule import Schedule, load_schedule, save_schedule
from ddsm_search.space.steps import Step, parse_plan_key, plan_key
from ddsm_search.space.subnet import Subnet
from tests.conftest import tiny_dict

TINY_DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
            "widths": [1.0, 0.5], "depths": [4, 2]}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _random(model):
    """Weights drawn at random, so that every block changes its input (a fresh DiT's gates are zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    cfg = config_from_dict(tiny_dict())
    return in_memory(cfg, _random(SlimUNet(cfg.model, (1, 8, 8))))


@pytest.fixture(scope="module")
def dit():
    cfg = config_from_dict({**tiny_dict(), "model": TINY_DIT})
    return in_memory(cfg, _random(SlimDiT(cfg.model, (1, 8, 8))))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_a_cached_pass_from_its_own_full_pass_is_the_full_network(kind, unet, dit):
    supernet = unet if kind == "unet" else dit
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor(40)
    for subnet in supernet.model.space:
        net = supernet.model.export(subnet).eval()
        branches = supernet.model.cache_branches_at(subnet)
        assert branches == (len(net.down) + 1 if kind == "unet" else subnet["depth"] - 1) >= 1
        with torch.no_grad():
            full = net(x, t)
            eps, kept = net.deep_forward(x, t, record=range(1, branches + 1))
            assert torch.equal(eps, full)  # recording changes nothing
            for b in range(1, branches + 1):
                cached = net.deep_forward(x, t, branch=b, feature=kept[b])[0]
                torch.testing.assert_close(cached, full, rtol=0, atol=1e-5, msg=lambda m: f"{subnet} branch {b}: {m}")
                other = net.deep_forward(x, torch.tensor(90), record=(b,))[1][b]  # another step's features
                wrong = net.deep_forward(x, t, branch=b, feature=other)[0]
                assert (wrong - full).abs().max() > 1e-3, (subnet, b)
            # the supernet itself at this subnet, as the FLOPs are measured on it
            slim = supernet.model.set_subnet(subnet)
            torch.testing.assert_close(slim.deep_forward(x, t, branch=1, feature=kept[1])[0], full, rtol=0, atol=1e-5)
    supernet.model.set_subnet(supernet.model.full)


def _steps(subnets, values):
    return [Step.of(s, cache=v) for s, v in zip(subnets, values)]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_cached_every_step_is_the_full_network_and_caching_changes_the_images(kind, unet, dit):
    supernet = unet if kind == "unet" else dit
    runtime = Runtime(supernet, backend="torch")
    full = supernet.model.full
    plain = generate(runtime.plan([full] * 6), n=4, seed=3)
    interval_one = generate(runtime.plan(_steps([full] * 6, pattern(1, 1, 6))), n=4, seed=3)
    assert torch.equal(interval_one, plain)
    cached = generate(runtime.plan(_steps([full] * 6, pattern(3, 1, 6))), n=4, seed=3)
    assert not torch.equal(cached, plain) and cached.abs().max() <= 1.0


def test_cached_steps_cost_what_is_measured_and_less_than_full(unet, dit):
    for supernet in (unet, dit):
        full = supernet.model.full
        runtime = Runtime(supernet, backend="torch")
        branches = supernet.model.cache_branches_at(full)
        costs = [supernet.step_flops(Step.of(full, cache=f"reuse{b}")) for b in range(1, branches + 1)]
        assert costs == sorted(costs) and len(set(costs)) == len(costs), "a deeper branch runs more"
        assert 0 < costs[0] and costs[-1] < supernet.flops[full]
        assert supernet.step_flops(Step.of(full, cache="keep1")) == supernet.flops[full]
        plan = runtime.plan(_steps([full] * 6, pattern(3, 1, 6)))
        assert plan.flops() == 2 * supernet.flops[full] + 4 * costs[0]
        assert plan.static_flops()[1] == costs[0]


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "unipc", "dpmsolver++"])
def test_cached_schedules_resume_from_the_prefix_cache_bit_for_bit(unet, solver):
    runtime = Runtime(unet, backend="torch")
    w = {x: Subnet.of(width=x) for x in (1.0, 0.5)}
    first = _steps([w[1.0]] * 3 + [w[0.5]] * 3, pattern(3, 2, 3) + pattern(2, 1, 3))
    second = _steps([w[1.0]] * 3 + [w[1.0]] * 3, pattern(3, 2, 3) + pattern(3, 2, 3))  # shares 3 steps
    cache = PrefixCache(boundaries=[3])
    generate(runtime.plan(first, solver=solver), n=5, seed=7, cache=cache)
    cached = generate(runtime.plan(second, solver=solver), n=5, seed=7, cache=cache)
    fresh = generate(runtime.plan(second, solver=solver), n=5, seed=7)
    assert cache.steps_saved == 3
    assert torch.equal(cached, fresh)
    # in chunks of 2 images the features kept for image k are those reused for image k (convolutions
    # on another batch size may round differently: close, not equal)
    chunked = generate(runtime.plan(second, solver=solver), n=5, seed=7, batch_size=2)
    torch.testing.assert_close(chunked, fresh, rtol=0, atol=1e-5)


def test_values_rules_and_keys():
    assert pattern(3, 2, 7) == ["keep2", "reuse2", "reuse2", "keep2", "reuse2", "reuse2", "keep2"]
    check_values([None, "keep1", "reuse1", None, "keep2", "reuse2"])
    for values, message in [(["reuse1", "keep1"], "step 0 reuses"),
                            (["keep1", None, "reuse1"], "no keep step comes before it"),
                            (["keep1", "reuse2"], "reuses branch 2, but the keep step before it kept branch 1"),
                            (["keep0"], "not a caching value"), (["cached"], "not a caching value")]:
        with pytest.raises(DDSMError, match=message):
            check_values(values)
    with pytest.raises(DDSMError, match="not what its keep step ran"):
        check_values(["keep1", "reuse1"], ["width=1.0", "width=0.5"])
    steps = _steps([Subnet.of(width=1.0)] * 4, ["keep1", "reuse1", "reuse1", None])
    key = plan_key(steps)
    assert key == "width=1.0*4 | cache keep1 reuse1*2 off"
    assert parse_plan_key(key) == steps


def test_schedule_files_carry_the_caching_and_are_checked(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    full = supernet.model.full
    steps = _steps([full] * 5, pattern(2, 2, 5))
    schedule = Schedule.from_steps(steps)
    path = save_schedule(tmp_path / "s.json", schedule, supernet)
    data = json.loads(path.read_text())
    assert data["settings"] == {"cache": {"steps": ["keep2", "reuse2", "keep2", "reuse2", "keep2"]}}
    assert data["flops_per_image"] == 3 * supernet.flops[full] + 2 * supernet.step_flops(steps[1])
    loaded = load_schedule(path, supernet)
    assert loaded.step_keys() == steps
    runtime = Runtime(supernet, backend="torch")
    assert torch.equal(generate(runtime.plan_schedule(loaded), n=3, seed=1), generate(runtime.plan(steps), n=3, seed=1))
    out = tmp_path / "a.npz"
    assert main(["sample", str(tiny_supernet), "--schedule", str(path), "--n", "3", "--out", str(out), "--quiet"]) == 0


def _bad_schedule(tmp_path, values, widths=None):
    widths = widths or [1.0] * len(values)
    ts = [99, 74, 49, 24, 0][: len(values)]
    data = {"version": 3, "solver": {"name": "ddim"},
            "steps": [{"timestep": t, "subnet": {"width": w}} for t, w in zip(ts, widths)],
            "settings": {"cache": {"steps": values}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("values,widths,message", [
    (["reuse1", "keep1", "reuse1", "keep1", "reuse1"], None, "step 0 reuses cached features"),
    (["keep1", "reuse1", "reuse1", "keep1", "reuse1"], [1.0, 0.5, 0.5, 1.0, 1.0], "not what its keep step ran"),
    (["keep9", "reuse9", "keep9", "reuse9", "keep9"], None, "branches 1 .. 4"),
    (["keep1", "reuse1"], None, "2 values for 5 steps"),
    (["keep1", "skip", None, None, None], None, "'skip' is not a caching value"),
])
def test_bad_caching_is_one_line_exit_2_and_writes_nothing(tiny_supernet, tmp_path, capsys, values, widths, message):
    path = _bad_schedule(tmp_path, values + [None] * 0, widths)
    if len(values) == 2:  # the count mismatch: five steps, two values
        data = json.loads(open(path).read())
        data["steps"] = [{"timestep": t, "subnet": {"width": 1.0}} for t in (99, 74, 49, 24, 0)]
        open(path, "w").write(json.dumps(data))
    out = tmp_path / "out.png"
    assert main(["sample", str(tiny_supernet), "--schedule", path, "--n", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_search_cache_settings_are_checked_against_the_backbone(tiny_supernet, tmp_path, capsys):
    import yaml

    search = {"steps": 4, "segments": 2, "population": 4, "generations": 1, "samples": 10, "workers": 0,
              "batch_size": 10, "cache_intervals": [2], "cache_branches": [7]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(search=search)))
    assert main(["search", str(config), "--supernet", str(tiny_supernet), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.cache_branches: [7] beyond the 4 branches" in err[0], err
    assert not (tmp_path / "run").exists()
    config.write_text(yaml.safe_dump(tiny_dict(search={**search, "cache_intervals": [1]})))
    assert main(["search", str(config), "--supernet", str(tiny_supernet), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    assert "search.cache_intervals" in capsys.readouterr().err


def test_a_search_with_caching_evaluates_cached_schedules_and_exports_one(tiny_supernet, tmp_path):
    from ddsm_search.report.tables import load_run
    from ddsm_search.search.runner import run_search

    search = {"steps": 6, "segments": 2, "population": 6, "generations": 2, "samples": 20, "workers": 0,
              "batch_size": 20, "cache_intervals": [2, 3], "cache_branches": [1, 2]}
    run_search(config_from_dict(tiny_dict(search=search)), tiny_supernet, tmp_path / "run", progress=False,
               cache_dir=str(tmp_path / "cache"))
    table = load_run(tmp_path / "run")
    cached = table[table["schedule"].str.contains("| cache", regex=False)]
    assert len(cached) >= 4, "the first generation holds full size under each caching option"
    full = table.loc[table["schedule"] == "width=1.0*6", "gflops"].iloc[0]
    assert (cached["gflops"] < full).all()
    uniform = cached[cached["schedule"] == "width=1.0*6 | cache keep1 reuse1 keep1 reuse1*2 keep1"]
    assert len(uniform) == 0 or uniform["fid"].notna().all()


def test_sample_cache_option_is_uniform_caching(tiny_supernet, tmp_path, capsys):
    import numpy as np

    supernet = load_supernet(tiny_supernet)
    full = supernet.model.full
    path = save_schedule(tmp_path / "s.json", Schedule.from_steps(_steps([full] * 5, pattern(2, 3, 5))), supernet)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", str(tiny_supernet), "--width", "1", "--cache", "2:3", "--n", "3", "--out", str(a),
                 "--quiet", "--backend", "torch"]) == 0
    assert main(["sample", str(tiny_supernet), "--schedule", str(path), "--n", "3", "--out", str(b), "--quiet",
                 "--backend", "torch"]) == 0
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"])
    assert "GFLOPs" in capsys.readouterr().out
    for bad, message in (("x", "INTERVAL[:BRANCH]"), ("2:0", ">= 1"), ("2:9", "branches 1 .. 4")):
        assert main(["sample", str(tiny_supernet), "--width", "1", "--cache", bad, "--n", "2",
                     "--out", str(tmp_path / "c.png"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c.png").exists()


def test_uniform_caching_restarts_where_the_network_changes():
    from ddsm_search.methods.caching.steps import uniform

    assert uniform(["a"] * 5 + ["b"] * 3, 3, 2) == ["keep2", "reuse2", "reuse2", "keep2", "reuse2", "keep2", "reuse2",
                                                    "reuse2"]
    check_values(uniform(["a", "a", "b", "b", "b"], 2, 1), ["a", "a", "b", "b", "b"])
