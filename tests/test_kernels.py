"""The fused CPU kernel: equal to torch's layers within float rounding, and a clean fallback where it cannot run."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddsm_search.backbones.unet import SlimUNet
from ddsm_search.backends import fused as kernels
from ddsm_search.backends.fused import graph as graph_module
from ddsm_search.backends.fused.graph import Graph, Unsupported
from ddsm_search.backends.fused.unet_graph import FusedDenoiser, fused_program, unet_to_graph
from ddsm_search.config import config_from_dict
from ddsm_search.space.subnet import Subnet
from tests.conftest import tiny_dict

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"fused kernel unavailable: {kernels.why_unavailable()}")


def _nhwc(*shape) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def _conv(c: int, k: int, size: int = 3, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c, k, size, stride=stride, padding=size // 2)
    nn.init.normal_(conv.bias)
    return conv.to(memory_format=torch.channels_last)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, c)
    nn.init.normal_(norm.weight, 1.0, 0.5)
    nn.init.normal_(norm.bias)
    return norm


def _reference(conv, x, x2=None, *, upsample=False, norm=None, act=True, mod=None, res=None, skip=None, skip_in=None):
    """The same computation with torch's layers, as ResBlock's and AttnBlock's torch paths do it."""
    h = x if x2 is None else torch.cat([x, x2], dim=1)
    if upsample:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    if norm is not None:
        h = norm(h)
        if mod is not None:
            scale, shift = mod[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        if act:
            h = F.silu(h)
    out = conv(h)
    if res is not None:
        out = out + res
    if skip is not None:
        out = out + skip(torch.cat([t for t in skip_in if t is not None], dim=1))
    return out


CASES = {  # name: (n, c1, c2, k, size, options)
    "plain 16->16": (5, 16, 0, 16, 8, {}),
    "norm 16->16": (5, 16, 0, 16, 8, {"norm": 2}),
    "norm, scale/shift per image, residual": (5, 16, 0, 16, 8, {"norm": 2, "mod": 5, "res": True}),
    "scale/shift shared by every image": (3, 24, 0, 24, 4, {"norm": 3, "mod": 1}),
    "concatenated input, 1x1 skip of it": (4, 16, 8, 24, 4, {"norm": 3, "mod": 4, "skip": True}),
    "groups straddle the concatenation": (2, 12, 4, 8, 5, {"norm": 2}),
    "k = 40: tiles of 8, 16 and 24 channels": (3, 8, 0, 40, 6, {}),
    "channels not a multiple of 8": (2, 5, 0, 8, 7, {"norm": 5}),
    "upsampled input": (3, 16, 0, 16, 4, {"upsample": True}),
    "stride 2": (3, 16, 0, 16, 8, {"stride": 2}),
    "odd 2x3-sized batch of one": (1, 8, 0, 8, 3, {}),
    "1x1 of a normalised input, no SiLU (attention's qkv)": (3, 16, 0, 48, 4, {"norm": 2, "act": False, "size": 1}),
    "1x1 read in place, with a residual (attention's proj)": (3, 16, 0, 16, 4, {"size": 1, "res": True}),
    "one output channel, padded to 8 (the U-Net's last layer)": (2, 16, 0, 1, 8, {"norm": 2, "pad_out": True}),
    "three output channels, 24 inputs (an RGB U-Net's last layer)": (2, 24, 0, 3, 6, {"norm": 3, "pad_out": True}),
    "five output channels of a 1x1 read in place, 13 inputs": (2, 13, 0, 5, 4, {"size": 1, "pad_out": True}),
    "twelve output channels, padded to 16": (2, 8, 0, 12, 4, {"norm": 2, "pad_out": True}),
}


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_fused_layer_matches_torch_layers(name):
    n, c1, c2, k, size, opt = CASES[name]
    torch.manual_seed(1)
    c = c1 + c2
    conv = _conv(c, k, size=opt.get("size", 3), stride=opt.get("stride", 1))
    x, x2 = _nhwc(n, c1, size, size) * 2 + 0.5, _nhwc(n, c2, size, size) if c2 else None
    inputs = [x] + ([x2] if x2 is not None else [])
    ref = {"upsample": opt.get("upsample", False), "act": opt.get("act", True)}
    graph_kw = {"x2": x2, "upsample": ref["upsample"], "act": ref["act"], "pad_out": opt.get("pad_out", False)}
    emb = None
    if "norm" in opt:
        ref["norm"] = graph_kw["norm"] = _norm(c, opt["norm"])
    if "mod" in opt:
        linear = nn.Linear(6, 2 * c)
        emb = torch.randn(opt["mod"], 6)
        ref["mod"] = linear(emb).detach()
    out_size = size * 2 if ref["upsample"] else size // opt.get("stride", 1)
    if opt.get("res"):
        ref["res"] = graph_kw["res"] = _nhwc(n, k, out_size, out_size)
        inputs.append(ref["res"])
    if opt.get("skip"):
        ref["skip"], ref["skip_in"] = graph_kw["skip"], graph_kw["skip_in"] = _conv(c, k, size=1), (x, x2)
    with torch.inference_mode():
        want = _reference(conv, x, x2, **ref)
        g = Graph()
        slots = [g.input(t.shape[1], t.shape[2], t.shape[3]) for t in inputs]
        by_id = {id(t): s for t, s in zip(inputs, slots)}
        graph_kw["x2"] = None if x2 is None else by_id[id(x2)]
        if "res" in graph_kw:
            graph_kw["res"] = by_id[id(graph_kw["res"])]
        if "skip_in" in graph_kw:
            graph_kw["skip_in"] = (by_id[id(x)], None if x2 is None else by_id[id(x2)])
        if "mod" in opt:
            graph_kw["mod"] = g.mod(linear)
        program = g.compile(g.conv(conv, slots[0], **graph_kw), k)
        got = program.run(inputs, emb)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_fused_silu_is_accurate_over_a_wide_range():
    """silu(groupnorm(x)) read through an identity 1x1 convolution, against float64: the vectorised exp
    is clamped to [-80, 80], so normalised values out to +-200 check the clamp as well as the
    polynomial. The norm's own float32 rounding (its mean is off by about 5e-9, times gain / std) is
    allowed for per channel."""
    c, size = 8, 8
    gains = torch.tensor([0.5, 2.0, 8.0, 30.0, 60.0, 90.0, 120.0, 3.0])
    x = (torch.linspace(-1.0, 1.0, size * size) ** 3).repeat(1, c, 1).reshape(1, c, size, size)
    x = x.contiguous(memory_format=torch.channels_last)
    norm, conv = nn.GroupNorm(c, c), nn.Conv2d(c, c, 1)
    with torch.no_grad():
        norm.weight.copy_(gains)
        norm.bias.zero_()
        conv.weight.copy_(torch.eye(c)[:, :, None, None])
        conv.bias.zero_()
    with torch.inference_mode():
        g = Graph()
        got = g.compile(g.conv(conv, g.input(c, size, size), norm=norm)).run(x).double()
    xd = x.double()
    z = (xd - xd.mean(dim=(2, 3), keepdim=True)) / (xd.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    z = z * gains.double()[None, :, None, None]
    want = z * torch.sigmoid(z)
    assert z.min() < -200 and z.max() > 200  # both clamp regions are exercised
    allowed = 2e-6 * want.abs() + 5e-8 * gains.double()[None, :, None, None]
    err = (got - want).abs()
    assert (err <= allowed).all(), f"worst at z = {z.flatten()[(err / allowed).argmax()].item():.4g}: {(err / allowed).max().item():.3g}x the allowance"


@needs_kernel
@pytest.mark.parametrize("pixels, heads, head_dim", [(4, 2, 16), (9, 3, 8), (6, 1, 5)])
def test_fused_attention_matches_sdpa(pixels, heads, head_dim):
    n, c = 3, heads * head_dim
    qkv = torch.randn(n, 3 * c, 1, pixels)
    g = Graph()
    program = g.compile(g.attention(g.input(3 * c, 1, pixels), head_dim))
    with torch.inference_mode():
        got = program.run(qkv)
        q, k, v = qkv.reshape(n, 3, heads, head_dim, pixels).transpose(-1, -2).unbind(1)
        want = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(n, c, 1, pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _random_net(**model) -> SlimUNet:
    cfg = config_from_dict(tiny_dict(model={"base_channels": 32, "channel_mults": [1, 2], "group_size": 8,
                                            "head_dim": 8, "widths": [1.0, 0.75, 0.5, 0.25], **model}))
    net = SlimUNet(cfg.model, (1, 8, 8)).eval()
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    return net


@needs_kernel
@pytest.mark.parametrize("attention", [[], [4]])
def test_unet_program_matches_torch_layers_at_every_width(attention):
    # channel counts that are multiples of 8 at every width, so the whole network is one program
    net = _random_net(attention_resolutions=attention)
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 10, 40, 60, 80, 99])
    assert len(net.space) == 4
    for subnet in net.space:
        for model in (net.set_subnet(subnet), net.export(subnet).eval()):  # the supernet and its static export
            with torch.inference_mode():
                assert fused_program(model, x) is not None, "the whole network should run as one program"
                for xs, ts in ((x, t), (x[:1], t[3])):  # timesteps per image, and one for a batch of one
                    fused = FusedDenoiser(model)(xs, ts)
                    with kernels.disabled():
                        assert fused_program(model, xs) is None
                    plain = model(xs, ts)  # torch's layers: the U-Net's own forward
                    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_program_follows_weight_updates_and_copies():
    net, x, t = _random_net(), torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    run = FusedDenoiser(net)
    with torch.no_grad():
        before = run(x, t)
        first = fused_program(net, x)
        assert first is not None
        net.conv_out.bias.add_(1.0)  # an optimizer step or load_state_dict: the version counter moves
        after = run(x, t)
        assert fused_program(net, x) is not first, "a weight update builds a new program"
        torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(net)  # programs live outside the module: copying and pickling still work
        torch.testing.assert_close(FusedDenoiser(twin)(x, t), after, rtol=0, atol=0)
        assert pickle.loads(pickle.dumps(net)).training is False


@needs_kernel
def test_scale_shift_rows_kept_per_timestep_follow_the_weights():
    net, x = _random_net(), torch.randn(3, 1, 8, 8)
    run = FusedDenoiser(net)
    with torch.no_grad():
        for step in (5, 50, 5, 50.0):  # a sampler's timesteps, each repeated across runs
            want = net(x, torch.tensor(step))
            torch.testing.assert_close(run(x, torch.tensor(step)), want, rtol=1e-4, atol=1e-5)
        assert len(fused_program(net, x)._mods) == 2, "one set of rows per timestep"
        net.down[0][0].emb.bias.add_(0.5)  # the rows for t = 5 are stale now
        want = net(x, torch.tensor(5))
        torch.testing.assert_close(run(x, torch.tensor(5)), want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_arena_regions_are_reused_but_never_shared_while_live(monkeypatch):
    captured = {}
    layout = graph_module._layout

    def spy(graph, output):
        captured["graph"], captured["result"] = graph, layout(graph, output)
        return captured["result"]

    monkeypatch.setattr(graph_module, "_layout", spy)
    program = unet_to_graph(_random_net(attention_resolutions=[4]), 8, 8)
    graph, (offsets, arena) = captured["graph"], captured["result"]
    assert arena == program.arena
    first, last = {}, {}
    for i, op in enumerate(graph.ops):
        for key in ("x1", "x2", "res", "s1", "s2", "y"):
            if op[key] in offsets:
                first.setdefault(op[key], i)
                last[op[key]] = i
    sizes = {s: -(-graph.slots[s].size // 16) * 16 for s in offsets}
    for a in offsets:
        for b in offsets:
            if a < b and first[a] <= last[b] and first[b] <= last[a]:  # live at the same time
                assert offsets[a] + sizes[a] <= offsets[b] or offsets[b] + sizes[b] <= offsets[a], (a, b)
    assert arena < sum(sizes.values()), "regions of dead activations should be reused"


@needs_kernel
def test_bad_programs_and_inputs_are_errors():
    g = Graph()
    x = g.input(16, 4, 4)
    program = g.compile(g.conv(_conv(16, 16), x))
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"input 0 must be a float32 CPU tensor of shape \(2, 16, 4, 4\)"):
            program.run(torch.randn(2, 8, 4, 4))
        with pytest.raises(ValueError, match="takes 1 inputs, not 2"):
            program.run([torch.randn(2, 16, 4, 4)] * 2)
        program._ops[0].a.k = 12  # the C side checks its arguments itself: k % 8
        with pytest.raises(RuntimeError, match="refused"):
            program.run(torch.randn(2, 16, 4, 4))
        program._ops[0].a.k = 16
        assert program.run(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    g = Graph()
    x = g.input(16, 4, 4)
    program = g.compile(g.conv(_conv(16, 3), x, pad_out=True))  # k < 8: dot products, no residual or skip
    with torch.inference_mode():
        assert program.run(torch.randn(2, 16, 4, 4)).shape == (2, 3, 4, 4)
        program._ops[0].res = x.index
        with pytest.raises(RuntimeError, match="refused"):
            program.run(torch.randn(2, 16, 4, 4))
    with pytest.raises(Unsupported, match="takes 16 channels, its input has 8"):
        Graph().conv(_conv(16, 16), Graph().input(8, 4, 4))
    with pytest.raises(Unsupported, match="12 output channels"):
        Graph().conv(_conv(16, 12), Graph().input(16, 4, 4))
    with pytest.raises(Unsupported, match="stride 2 on a 5x5 input"):
        Graph().conv(_conv(8, 8, stride=2), Graph().input(8, 5, 5))
    with pytest.raises(Unsupported, match="3x3 layer of 128 output channels"):  # oneDNN is faster there
        Graph().conv(_conv(8, 128), Graph().input(8, 4, 4))


def test_networks_the_kernel_cannot_run_keep_torch_layers():
    net = _random_net()
    x = torch.randn(2, 1, 6, 6)  # 6 -> 3 -> a stride-2 layer on an odd size
    with torch.inference_mode():
        if kernels.available():
            assert fused_program(net, torch.randn(2, 1, 7, 7)) is None
        assert FusedDenoiser(net)(x, torch.tensor([1, 2])).shape == (2, 1, 6, 6)
    assert fused_program(net, x) is None, "autograd on: training keeps torch's layers"
    odd = SlimUNet(config_from_dict(tiny_dict(model={"base_channels": 12, "group_size": 3, "head_dim": 3,
                                                     "widths": [1.0, 0.5]})).model, (1, 8, 8)).eval()
    with torch.inference_mode():
        assert fused_program(odd, torch.randn(1, 1, 8, 8)) is None  # 12 and 6 channels: not multiples of 8
        assert FusedDenoiser(odd)(torch.randn(1, 1, 8, 8), torch.tensor(3)).shape == (1, 1, 8, 8)
    wide = _random_net(base_channels=64).set_subnet(Subnet.of(width=1.0))  # 128-channel 3x3 layers: torch's layers are faster
    with torch.inference_mode():
        assert fused_program(wide, torch.randn(1, 1, 8, 8)) is None
        if kernels.available():
            assert fused_program(wide.set_subnet(Subnet.of(width=0.5)), torch.randn(1, 1, 8, 8)) is not None


def test_generated_tiles_header_is_current():
    header = ROOT / "ddsm_search" / "backends" / "fused" / "conv3x3_tiles.h"
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_conv_tiles.py")], capture_output=True,
                               text=True, check=True).stdout
    assert generated == header.read_text(), "run scripts/gen_conv_tiles.py > " + str(header.relative_to(ROOT))


def _fresh_process(env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a tiny supernet forward in a new process with `env_extra`; print the kernel's status."""
    code = ("import warnings, torch\n"
            "from ddsm_search.config import config_from_dict\n"
            "from ddsm_search.backends import fused as kernels\n"
            "from ddsm_search.backbones.unet import SlimUNet\n"
            "from ddsm_search.backends.fused.unet_graph import FusedDenoiser\n"
            "from tests.conftest import tiny_dict\n"
            "cfg = config_from_dict(tiny_dict(model={'base_channels': 32, 'group_size': 8, 'head_dim': 8}))\n"
            "net = SlimUNet(cfg.model, (1, 8, 8)).eval()\n"
            "with torch.inference_mode():\n"
            "    out = FusedDenoiser(net)(torch.randn(2, 1, 8, 8), torch.tensor([3, 50]))\n"
            "print('available', kernels.available(), '|', kernels.why_unavailable(), '|', tuple(out.shape))\n")
    env = {**os.environ, "DDSM_SEARCH_CACHE": str(tmp_path / "cache"), **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_switched_off_by_environment(tmp_path):
    proc = _fresh_process({"DDSM_SEARCH_KERNELS": "0"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "available False | turned off by DDSM_SEARCH_KERNELS=0 | (2, 1, 8, 8)" in proc.stdout
    assert not (tmp_path / "cache").exists(), "nothing is built when switched off"


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    if kernels._cpu_ok():
        pytest.skip(kernels._cpu_ok())
    proc = _fresh_process({"CC": str(tmp_path / "no-such-cc")}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "available False | could not build the fused kernel" in proc.stdout
    assert proc.stderr.count("using torch's layers") == 1, proc.stderr
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not leftovers, f"a failed build leaves nothing behind: {leftovers}"


@needs_kernel
def test_build_is_cached_by_source_hash(tmp_path):
    first = kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp, "a second build reuses the library"
    assert first.parent.parent == tmp_path and first.name == "libddsm_fused.so"
