"""Sampling, the prefix cache and the search on the fused-kernel backend, and the per-machine choice
between it and torch's layers.

The shared tiny supernet has channel counts the kernel cannot run (6 at width 0.75), so it always
samples with torch's layers. This supernet's channels are whole multiples of 8 at every width, so its
exported subnets run on the kernel, and each test checks that they did.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from ddsm_search.backends import backend_of, choice, runs_fused
from ddsm_search.backends import fused as kernels
from ddsm_search.backends.fused import graph
from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import config_from_dict
from ddsm_search.sampling import PrefixCache, Runtime, generate
from ddsm_search.search.runner import run_search
from ddsm_search.space.steps import Step
from ddsm_search.space.subnet import Subnet
from ddsm_search.solvers.base import Solver
from tests.conftest import tiny_dict

FUSED = {"model": {"base_channels": 16, "channel_mults": [1, 2], "group_size": 8, "head_dim": 8, "widths": [1.0, 0.5],
                   "attention_resolutions": [4]}}
SEARCH = {"steps": 6, "segments": 3, "population": 6, "generations": 2, "samples": 40, "workers": 0, "batch_size": 40}
FULL, HALF = Subnet.of(width=1.0), Subnet.of(width=0.5)
MIXED = [HALF, HALF, FULL, FULL, HALF, FULL]


@pytest.fixture(scope="module")
def fused_supernet(tmp_path_factory):
    """A small supernet whose every width the fused kernel can run (it fails, not skips, if the kernel
    does not build on a CPU that can run it: the production path must not go untested silently)."""
    if kernels._cpu_ok():
        pytest.skip(f"this CPU cannot run the fused kernel: {kernels._cpu_ok()}")
    assert kernels.available(), kernels.why_unavailable()
    root = tmp_path_factory.mktemp("fused-supernet")
    config = root / "fused.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(**FUSED)))
    assert main(["train", str(config), "--out", str(root / "net"), "--train-steps", "3", "--quiet", "--device", "cpu"]) == 0
    return root / "net"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the forward passes that ran on the fused kernel."""
    calls = {"n": 0}
    real = graph.Program.run

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(graph.Program, "run", counting)
    return calls


def test_every_exported_subnet_runs_on_the_kernel(fused_supernet):
    supernet = load_supernet(fused_supernet)
    model = supernet.model
    x = torch.randn(3, *model.image_shape)
    with torch.inference_mode():
        runtime = Runtime(supernet, backend="fused")
        runtime.prepare(Step(s) for s in model.space)
        denoisers = runtime.denoisers
        assert list(denoisers) == [Step(FULL), Step(HALF)]
        for subnet, net in denoisers.items():
            assert runs_fused(net, x), f"subnet {subnet} fell back to torch's layers"


def test_sampling_on_the_kernel_matches_torch_layers(fused_supernet, kernel_calls):
    supernet = load_supernet(fused_supernet)
    kwargs = dict(n=12, seed=3, batch_size=5)
    fused = generate(Runtime(supernet, backend="fused").plan(MIXED), **kwargs)
    assert kernel_calls["n"] == len(MIXED) * 3, "every step of every chunk runs on the kernel"
    plain = generate(Runtime(supernet).plan(MIXED), **kwargs)  # torch's layers, the default
    assert kernel_calls["n"] == len(MIXED) * 3
    with kernels.disabled():  # where the kernel is not available, the fused backend runs torch's layers
        fallback = generate(Runtime(supernet, backend="fused").plan(MIXED), **kwargs)
    assert kernel_calls["n"] == len(MIXED) * 3
    torch.testing.assert_close(fallback, plain, rtol=0, atol=0)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)  # float rounding only, not bit for bit


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 1.0)])
def test_prefix_cache_is_bit_identical_on_the_kernel(fused_supernet, kernel_calls, sampler, eta):
    supernet = load_supernet(fused_supernet)
    second = MIXED[:4] + [FULL, HALF]  # shares the first 4 steps
    cache = PrefixCache(boundaries=[2, 4])
    runtime = Runtime(supernet, backend="fused")
    kwargs = dict(n=6, seed=7)
    generate(runtime.plan(MIXED, solver=Solver.of_sampler(sampler, eta)), cache=cache, **kwargs)
    cached = generate(runtime.plan(second, solver=Solver.of_sampler(sampler, eta)), cache=cache, **kwargs)
    fresh = generate(runtime.plan(second, solver=Solver.of_sampler(sampler, eta)), **kwargs)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    assert cache.steps_saved == 4 and kernel_calls["n"] == 6 + 2 + 6


def test_search_on_the_kernel_scores_as_torch_layers_do(fused_supernet, kernel_calls, tmp_path):
    cfg = config_from_dict(tiny_dict(**FUSED, search={**SEARCH, "backend": "fused"}))
    fused = run_search(cfg, fused_supernet, tmp_path / "fused", progress=False, cache_dir=str(tmp_path / "c"))
    assert kernel_calls["n"] > 0, "the search's evaluations must run on the kernel"
    runs = kernel_calls["n"]
    plain = run_search(cfg, fused_supernet, tmp_path / "plain", progress=False, cache_dir=str(tmp_path / "c"),
                       generations=1, backend="torch")
    assert kernel_calls["n"] == runs
    first = fused.table().merge(plain.table(), on="schedule", suffixes=("_fused", "_plain"))
    assert len(first) == len(plain.rows) > 0  # the shared first generation
    torch.testing.assert_close(torch.tensor(first["fid_fused"].to_numpy()), torch.tensor(first["fid_plain"].to_numpy()),
                               rtol=1e-3, atol=1e-4)


def test_auto_keeps_each_subnet_on_the_backend_measured_faster(fused_supernet, kernel_calls, monkeypatch, tmp_path):
    model = load_supernet(fused_supernet).model
    nets = {s: model.export(s).eval() for s in model.space}
    # a machine where torch's layers win at full width and the kernel at 0.5 (as measured on AVX-512)
    fake = {(FULL, "fused"): 2.0, (FULL, "torch"): 1.0, (HALF, "fused"): 1.0, (HALF, "torch"): 3.0}
    by_net = {id(net): subnet for subnet, net in nets.items()}
    timed = []

    def seconds(denoiser, x, repeats):
        net = getattr(denoiser, "net", denoiser)
        timed.append((by_net[id(net)], backend_of(denoiser), x.shape[0]))
        return fake[timed[-1][:2]]

    monkeypatch.setattr(choice, "_seconds", seconds)
    cache = choice.ChoiceCache(tmp_path)
    chosen = choice.choose(nets, model.image_shape, 4, "auto", cache=cache)
    assert {s: backend_of(d) for s, d in chosen.items()} == {FULL: "torch", HALF: "fused"}
    assert sorted(timed) == sorted([(FULL, "fused", 4), (FULL, "torch", 4), (HALF, "fused", 4), (HALF, "torch", 4)])
    x = torch.randn(4, *model.image_shape)
    with torch.inference_mode():
        before = kernel_calls["n"]
        chosen[FULL](x, torch.tensor(3))
        assert kernel_calls["n"] == before, "a subnet kept on torch's layers never calls the kernel"
        chosen[HALF](x, torch.tensor(3))
        assert kernel_calls["n"] == before + 1
    # kept per machine: a second choice (another process, the same cache folder) measures nothing
    timed.clear()
    again = choice.choose(nets, model.image_shape, 4, "auto", cache=choice.ChoiceCache(tmp_path))
    assert timed == [] and {s: backend_of(d) for s, d in again.items()} == {FULL: "torch", HALF: "fused"}
    assert cache.path.parent == tmp_path / "backends" and cache.path.is_file()
    # another batch size is another measurement
    choice.choose(nets, model.image_shape, 8, "auto", cache=choice.ChoiceCache(tmp_path))
    assert {b for _, _, b in timed} == {8}
    # a damaged cache file is measured again, not trusted
    cache.path.write_text("{not json")
    timed.clear()
    choice.choose(nets, model.image_shape, 4, "auto", cache=choice.ChoiceCache(tmp_path))
    assert len(timed) == 4


def test_networks_the_kernel_cannot_run_stay_on_torch(tiny_supernet):
    """The shared tiny supernet (6 channels at width 0.75) and any DiT keep torch's layers under auto."""
    supernet = load_supernet(tiny_supernet)
    model = supernet.model
    runtime = Runtime(supernet, backend="auto", batch_size=4)
    runtime.prepare(Step(s) for s in model.space)
    x = torch.randn(4, *model.image_shape)
    assert not any(runs_fused(d, x) for s, d in runtime.denoisers.items() if s.subnet["width"] == 0.75)


def test_speed_comparison_reports_each_subnets_path(fused_supernet):
    from ddsm_search.sampling import time_against_full

    supernet = load_supernet(fused_supernet)
    plan = Runtime(supernet, backend="auto", batch_size=8).plan(MIXED)
    images, seconds, full_seconds, paths = time_against_full(plan, n=8, seed=0, batch_size=8)
    assert images.shape == (8, *supernet.model.image_shape) and seconds > 0 and full_seconds > 0
    assert set(paths) == {FULL.key, HALF.key} and set(paths.values()) <= {"fused", "torch"}
