"""Slicing is exact: per-segment slicing, fixed group size and head dim, export equals the supernet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddsm_search.backbones.slim import SlimConv2d, SlimGroupNorm, SlimLinear, slim_layers
from ddsm_search.backbones.unet import SlimUNet
from ddsm_search.backends import fused as kernels
from ddsm_search.config import config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.space.subnet import Subnet, SubnetSpace
from tests.conftest import tiny_dict


def test_concat_input_is_sliced_per_segment():
    conv = SlimConv2d((4, 6), 8, 3, padding=1)
    conv.width = 0.5  # active input: 2 channels of h, 3 of the skip; output 4
    h, skip = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5)
    got = conv(torch.cat([h, skip], 1))
    weight = torch.cat([conv.weight[:4, 0:2], conv.weight[:4, 4:7]], dim=1)
    want = F.conv2d(torch.cat([h, skip], 1), weight, conv.bias[:4], padding=1)
    torch.testing.assert_close(got, want)
    # slicing the concatenation as one tensor (the DDSM bug) would give something else
    wrong = F.conv2d(torch.cat([h, skip], 1), conv.weight[:4, :5], conv.bias[:4], padding=1)
    assert not torch.allclose(got, wrong)


def test_fused_output_segments_are_sliced_separately():
    qkv = SlimLinear(8, (8, 8, 8))
    qkv.width = 0.5
    x = torch.randn(3, 4)
    q, k, v = qkv(x).chunk(3, dim=1)
    for i, part in enumerate((q, k, v)):
        torch.testing.assert_close(part, F.linear(x, qkv.weight[8 * i: 8 * i + 4, :4], qkv.bias[8 * i: 8 * i + 4]))


def test_fixed_layers_keep_their_channels():
    conv = SlimConv2d(3, 16, 3, padding=1, slim_in=False)
    conv.width = 0.25
    assert conv(torch.randn(1, 3, 4, 4)).shape[1] == 4
    out = SlimConv2d(16, 3, 3, padding=1, slim_out=False)
    out.width = 0.25
    assert out(torch.randn(1, 4, 4, 4)).shape[1] == 3


def test_groupnorm_keeps_channels_per_group():
    norm = SlimGroupNorm(16, group_size=4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    norm.width = 0.5
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(norm(x), F.group_norm(x, 2, norm.weight[:8], norm.bias[:8], norm.eps))
    # with a fixed group count (4) it would normalise pairs of channels instead
    assert not torch.allclose(norm(x), F.group_norm(x, 4, norm.weight[:8], norm.bias[:8], norm.eps))


def _randomised(net: nn.Module) -> nn.Module:
    with torch.no_grad():  # zero-initialised layers would hide slicing mistakes
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5])
def test_exported_subnet_matches_supernet(width):
    cfg = config_from_dict(tiny_dict())
    net = _randomised(SlimUNet(cfg.model, (1, 8, 8))).eval()
    subnet = Subnet.of(width=width)
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0, 10, 50, 80, 99])
    with torch.no_grad():
        want = net.set_subnet(subnet)(x, t)
        assert net.subnet == subnet
        static = net.export(subnet).eval()
        got = static(x, t)
        # a key, a mapping and a bare width name the same subnet
        for same in (subnet.key, {"width": width}, width):
            torch.testing.assert_close(net.export(same).eval()(x, t), got, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not list(slim_layers(static)), "the export must hold plain torch layers only"
    n_static = sum(p.numel() for p in static.parameters())
    assert (n_static < sum(p.numel() for p in net.parameters())) == (width < 1.0)


def test_inference_path_matches_autograd_path():
    # without autograd torch's path overwrites activations in place; the result must not change, and
    # the input must not be touched (the fused kernel's path is compared in test_kernels.py)
    cfg = config_from_dict(tiny_dict())
    net = _randomised(SlimUNet(cfg.model, (1, 8, 8))).eval().set_subnet(Subnet.of(width=0.5))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 40, 99])
    x_before = x.clone()
    trained = net(x, t)
    with torch.inference_mode(), kernels.disabled():
        inferred = net(x, t)
    assert trained.requires_grad and not inferred.requires_grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)
    assert torch.equal(x, x_before)


def test_attention_heads_follow_fixed_head_dim():
    cfg = config_from_dict(tiny_dict())
    net = SlimUNet(cfg.model, (1, 8, 8))
    static = net.export(0.5)
    attn = static.mid[1]
    assert attn.qkv.out_channels == 3 * 8 and attn.head_dim == 4  # 16 channels * 0.5 = 8 = 2 heads of 4


def test_unknown_width_and_bad_head_dim_are_errors():
    cfg = config_from_dict(tiny_dict())
    net = SlimUNet(cfg.model, (1, 8, 8))
    assert net.space == SubnetSpace.of({"width": [1.0, 0.75, 0.5]}) and net.full == net.subnet == Subnet.of(width=1.0)
    for bad in (0.3, "width=0.3", {"width": 0.3}, Subnet.of(width=0.3)):
        with pytest.raises(DDSMError, match=r"width 0.3 is not in the supernet \(width choices: 1.0, 0.75, 0.5\)"):
            net.set_subnet(bad)
        with pytest.raises(DDSMError, match="width 0.3 is not in the supernet"):
            net.export(bad)
    with pytest.raises(DDSMError, match="this supernet has no axis 'depth'"):
        net.check_subnet({"width": 1.0, "depth": 2})
    assert net.subnet == Subnet.of(width=1.0), "a refused subnet changes nothing"
    bad = config_from_dict(tiny_dict(model={"head_dim": 16}))
    with pytest.raises(DDSMError, match="model.head_dim"):
        SlimUNet(bad.model, (1, 8, 8))
