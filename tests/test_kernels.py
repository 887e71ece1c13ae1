"""The fused CPU kernel: equal to torch's layers within float rounding, and a clean fallback where it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddsm_search.config import config_from_dict
from ddsm_search.nn import kernels
from ddsm_search.nn.unet import SlimUNet
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


def _reference(conv, x, x2=None, *, upsample=False, norm=None, mod=None, res=None, skip=None, skip_in=None):
    """The same computation with torch's layers, as ResBlock's torch path does it."""
    h = x if x2 is None else torch.cat([x, x2], dim=1)
    if upsample:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    if norm is not None:
        h = norm(h)
        if mod is not None:
            scale, shift = mod[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
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
}


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_fused_conv_matches_torch_layers(name):
    n, c1, c2, k, size, opt = CASES[name]
    torch.manual_seed(1)
    c = c1 + c2
    conv = _conv(c, k, stride=opt.get("stride", 1))
    x, x2 = _nhwc(n, c1, size, size) * 2 + 0.5, _nhwc(n, c2, size, size) if c2 else None
    kwargs = {"upsample": opt.get("upsample", False)}
    if "norm" in opt:
        kwargs["norm"] = _norm(c, opt["norm"])
    if "mod" in opt:
        kwargs["mod"] = torch.randn(opt["mod"], 2 * c) * 0.5
    out_size = size * 2 if kwargs["upsample"] else size // opt.get("stride", 1)
    if opt.get("res"):
        kwargs["res"] = _nhwc(n, k, out_size, out_size)
    if opt.get("skip"):
        kwargs["skip"], kwargs["skip_in"] = _conv(c, k, size=1), (x, x2)
    with torch.inference_mode():
        want = _reference(conv, x, x2, **kwargs)
        got = kernels.conv3x3(conv, x, x2, **kwargs)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_unet_fused_path_matches_torch_path_at_every_width(monkeypatch):
    # channel counts that are multiples of 8 at every width, so every block takes the fused path
    cfg = config_from_dict(tiny_dict(model={"base_channels": 32, "channel_mults": [1, 2], "group_size": 8,
                                            "head_dim": 8, "widths": [1.0, 0.75, 0.5, 0.25]}))
    net = SlimUNet(cfg.model, (1, 8, 8)).eval()
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    calls = []
    real = kernels.conv3x3
    monkeypatch.setattr(kernels, "conv3x3", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 10, 40, 60, 80, 99])
    for width in net.widths:
        for model in (net.set_width(width), net.export(width).eval()):  # the supernet and its static export
            with torch.inference_mode():
                calls.clear()
                fused = model(x, t)
                assert len(calls) >= 5, "the residual blocks and resampling convolutions should be fused"
                with kernels.disabled():
                    plain = model(x, t)
            torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_packed_weights_follow_weight_updates():
    conv, x = _conv(8, 8), _nhwc(2, 8, 4, 4)
    with torch.no_grad():
        before = kernels.conv3x3(conv, x)
        conv.weight.mul_(2.0)  # an optimizer step or load_state_dict: the version counter moves
        conv.bias.zero_()
        after = kernels.conv3x3(conv, x)
    torch.testing.assert_close(after, conv(x), rtol=1e-5, atol=1e-5)  # the repacked weights, not the cached ones
    assert not torch.allclose(after, before)


@needs_kernel
def test_mismatched_inputs_are_errors():
    conv, x = _conv(16, 16), _nhwc(2, 16, 4, 4)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="takes 16 channels, the input has 8"):
            kernels.conv3x3(conv, x[:, :8])
        with pytest.raises(ValueError, match="scale/shift"):
            kernels.conv3x3(conv, x, norm=_norm(16, 2), mod=torch.randn(3, 32))
        with pytest.raises(ValueError, match="residual"):
            kernels.conv3x3(conv, x, res=_nhwc(2, 16, 2, 2))
        with pytest.raises(RuntimeError, match="refused"):  # the C side checks k % 8 itself
            kernels.conv3x3(_conv(16, 12), x)


def test_unsupported_shapes_keep_torch_layers():
    conv = _conv(8, 12)  # 12 output channels: not a multiple of 8
    with torch.inference_mode():
        assert not kernels.supports(_nhwc(2, 8, 4, 4), conv)
        assert not kernels.supports(_nhwc(2, 8, 5, 5), _conv(8, 8, stride=2))  # stride 2 on an odd size
    assert not kernels.supports(_nhwc(2, 8, 4, 4), _conv(8, 8)), "autograd on: training keeps torch's layers"


def test_generated_tiles_header_is_current():
    header = ROOT / "ddsm_search" / "nn" / "kernels" / "conv3x3_tiles.h"
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_conv_tiles.py")], capture_output=True,
                               text=True, check=True).stdout
    assert generated == header.read_text(), "run scripts/gen_conv_tiles.py > " + str(header.relative_to(ROOT))


def _fresh_process(env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a tiny supernet forward in a new process with `env_extra`; print the kernel's status."""
    code = ("import warnings, torch\n"
            "from ddsm_search.config import config_from_dict\n"
            "from ddsm_search.nn import kernels\n"
            "from ddsm_search.nn.unet import SlimUNet\n"
            "from tests.conftest import tiny_dict\n"
            "cfg = config_from_dict(tiny_dict(model={'base_channels': 32, 'group_size': 8, 'head_dim': 8}))\n"
            "net = SlimUNet(cfg.model, (1, 8, 8)).eval()\n"
            "with torch.inference_mode():\n"
            "    out = net(torch.randn(2, 1, 8, 8), torch.tensor([3, 50]))\n"
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
    assert first.parent.parent == tmp_path and first.name == "libddsm_conv3x3.so"
