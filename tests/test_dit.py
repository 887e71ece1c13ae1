"""The slimmable DiT: static export, width and depth semantics, FLOPs, bad inputs, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddsm_search.backbones.cost import count_flops
from ddsm_search.backbones.dit import FREQ_SIZE, DiT
from ddsm_search.backbones.registry import build_supernet
from ddsm_search.backbones.slim import slim_layers
from ddsm_search.backbones.unet import timestep_embedding
from ddsm_search.config import DiffusionConfig, config_from_dict
from ddsm_search.diffusion import NoiseSchedule
from ddsm_search.errors import DDSMError
from ddsm_search.space.subnet import Subnet

TINY_DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 4.0,
            "widths": [1.0, 0.75, 0.5, 0.25], "depths": [4, 3, 2]}
SHAPES = [(1, 8, 8), (3, 8, 8)]


def dit_cfg(**model):
    """Return a validated experiment config with the tiny DiT, model keys updated from `model`."""
    return config_from_dict({"model": {**TINY_DIT, **model}, "diffusion": {"timesteps": 100}})


def randomised(net):
    """Return `net` with every parameter perturbed: the adaLN-Zero init would make every output zero."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # O(1) outputs: float error stays tiny
    return net.eval()


def reference(net, x, t, width: float, depth: int) -> torch.Tensor:
    """The supernet's output at (width, depth) from its full weight tensors and plain tensor ops only."""
    cfg, (c, hgt, wid) = net.cfg, net.image_shape
    p, d, hd = cfg.patch_size, cfg.hidden_size, cfg.head_dim
    inner, mlp = round(d * width), round(d * cfg.mlp_ratio * width)
    heads = inner // hd

    def mod(x, shift, scale):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    te = net.time_embed
    emb = timestep_embedding(torch.as_tensor(t).expand(x.shape[0]), FREQ_SIZE)
    cond = F.silu(F.linear(F.silu(F.linear(emb, te[0].weight, te[0].bias)), te[2].weight, te[2].bias))
    pe = net.patch_embed
    h = F.conv2d(x, pe.weight, pe.bias, stride=p).flatten(2).transpose(1, 2) + net.pos_embed
    for block in net.blocks[:depth]:
        s1, sc1, g1, s2, sc2, g2 = F.linear(cond, block.modulation.weight, block.modulation.bias).chunk(6, 1)
        a = mod(h, s1, sc1)
        wq, wk, wv = block.attn.qkv.weight.chunk(3, 0)  # leading `inner` rows of q, k, v: their first heads
        bq, bk, bv = block.attn.qkv.bias.chunk(3, 0)
        q, k, v = (F.linear(a, w[:inner], b[:inner]).reshape(x.shape[0], -1, heads, hd).transpose(1, 2)
                   for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(x.shape[0], -1, inner)
        h = h + g1[:, None] * F.linear(att, block.attn.proj.weight[:, :inner], block.attn.proj.bias)
        m = mod(h, s2, sc2)
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        m = F.gelu(F.linear(m, fc1.weight[:mlp], fc1.bias[:mlp]), approximate="tanh")
        h = h + g2[:, None] * F.linear(m, fc2.weight[:, :mlp], fc2.bias)
    fl = net.final_layer
    shift, scale = F.linear(cond, fl.modulation.weight, fl.modulation.bias).chunk(2, 1)
    out = F.linear(mod(h, shift, scale), fl.linear.weight, fl.linear.bias)
    out = out.reshape(x.shape[0], hgt // p, wid // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], c, hgt, wid)


@pytest.mark.parametrize("shape", SHAPES)
def test_export_equals_supernet_at_every_subnet(shape):
    net = randomised(build_supernet(dit_cfg().model, shape))
    x, t = torch.randn(6, *shape), torch.randint(0, 100, (6,))
    assert len(net.space) == 12
    outputs = []
    with torch.no_grad():
        for subnet in net.space:
            static = net.export(subnet)
            assert isinstance(static, DiT) and not list(slim_layers(static))
            assert len(static.blocks) == subnet["depth"] and not static.training
            want = net.set_subnet(subnet)(x, t)
            torch.testing.assert_close(static(x, t), want, rtol=1e-5, atol=1e-5)
            outputs.append(want)
    assert torch.isfinite(torch.stack(outputs)).all()
    for i in range(len(outputs)):  # every subnet computes something different: the test could fail
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-3)
    assert net.set_subnet(net.full).subnet == Subnet.of(width=1.0, depth=4)


def test_export_keeps_mode_and_drops_unused_blocks():
    net = build_supernet(dit_cfg().model, (1, 8, 8)).train()
    static = net.export("width=0.25,depth=2")
    assert static.training
    assert sum(p.numel() for p in static.parameters()) < sum(p.numel() for p in net.parameters())
    assert "pos_embed" not in net.state_dict()  # fixed, computed at construction
    assert not any(p is net.pos_embed for p in net.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_supernet_equals_hand_written_reference(shape):
    net = randomised(build_supernet(dit_cfg().model, shape))
    x, t = torch.randn(4, *shape), torch.randint(0, 100, (4,))
    with torch.no_grad():
        for subnet in net.space:
            got = net.set_subnet(subnet)(x, t)
            torch.testing.assert_close(got, reference(net, x, t, subnet["width"], subnet["depth"]),
                                       rtol=1e-4, atol=1e-5)


def test_scalar_timestep_serves_the_whole_batch():
    net = randomised(build_supernet(dit_cfg().model, (1, 8, 8))).set_subnet("width=0.5,depth=3")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(37)), net(x, torch.full((5,), 37)))


def test_position_embedding_is_dits_on_a_non_square_grid():
    net = build_supernet(dit_cfg().model, (1, 8, 12))
    assert net(torch.randn(2, 1, 8, 12), torch.zeros(2)).shape == (2, 1, 8, 12)

    def sincos(dim, pos):  # MAE / DiT's numpy formula
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(6.0), np.arange(4.0))  # w first, as DiT
    want = np.concatenate([sincos(16, cols), sincos(16, rows)], axis=1)
    torch.testing.assert_close(net.pos_embed[0], torch.from_numpy(want).float())


def test_flops_grow_along_each_axis():
    cfg = dit_cfg().model
    with torch.device("meta"):
        net = build_supernet(cfg, (3, 8, 8))
        x, t = torch.empty(1, 3, 8, 8), torch.zeros(1)
    flops = {s: count_flops(net.set_subnet(s), x, t) for s in net.space}
    for depth in net.space.choices("depth"):
        row = [flops[Subnet.of(width=w, depth=depth)] for w in net.space.choices("width")]
        assert all(a > b for a, b in zip(row, row[1:])), row
    for width in net.space.choices("width"):
        col = [flops[Subnet.of(width=width, depth=d)] for d in net.space.choices("depth")]
        assert all(a > b for a, b in zip(col, col[1:])), col


def test_wrong_patch_size_is_refused():
    with pytest.raises(DDSMError) as err:
        build_supernet(dit_cfg(patch_size=3).model, (1, 8, 8))
    assert "model.patch_size" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("widths", [[1.0, 0.3], [1.0, 0.375]])  # 9.6 channels; 12 channels: 1.5 heads of 8
def test_fractional_heads_are_refused(widths):
    with pytest.raises(DDSMError, match="model.widths"):
        dit_cfg(widths=widths)


def test_training_lowers_the_loss_at_full_and_smallest_subnet():
    torch.manual_seed(0)
    net = build_supernet(dit_cfg().model, (1, 8, 8))
    schedule = NoiseSchedule(DiffusionConfig(timesteps=100))
    pattern = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)

    def batch(n):
        x0 = pattern * torch.sign(torch.randn(n, 1, 1, 1))  # two images: a ramp and its negative
        t, noise = torch.randint(0, 100, (n,)), torch.randn(n, 1, 8, 8)
        return schedule.q_sample(x0, t, noise), t, noise

    held = batch(256)
    subnets = [net.space.full, net.space.smallest]

    def losses():
        with torch.no_grad():
            return [F.mse_loss(net.set_subnet(s)(held[0], held[1]), held[2]).item() for s in subnets]

    before = losses()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(30):
        xt, t, noise = batch(32)
        opt.zero_grad()
        for s in subnets:  # sandwich: the largest and the smallest subnet every step
            F.mse_loss(net.set_subnet(s)(xt, t), noise).backward()
        opt.step()
    after = losses()
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
