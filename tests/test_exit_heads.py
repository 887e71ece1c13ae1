"""AdaDiff-style exit heads on the DiT: shared-final-layer exits, the loss, per-image dynamic exit, training."""

from __future__ import annotations

import pytest
import torch

from ddsm_search.backbones.cost import flops_table
from ddsm_search.backbones.registry import build_supernet
from ddsm_search.config import config_from_dict
from ddsm_search.data import load_dataset
from ddsm_search.diffusion import NoiseSchedule
from ddsm_search.methods.early_exit.heads import (
    CertaintyHeads,
    DynamicExitDenoiser,
    adadiff_loss,
    exit_outputs,
    pseudo_labels,
)

MODEL = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
         "widths": [1.0, 0.5], "depths": [4, 2]}
SHAPE = (1, 8, 8)


def tiny(**model):
    """Return (config, supernet) of the tiny DiT with every parameter perturbed (adaLN-Zero outputs zero)."""
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {**MODEL, **model}, "diffusion": {"timesteps": 100}})
    net = build_supernet(cfg.model, SHAPE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, net.eval()


def batch(n: int = 6):
    """Return images whose means differ from image to image, and one timestep per image."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *SHAPE, generator=g) + torch.linspace(-2, 2, n).view(-1, 1, 1, 1)
    return x, torch.randint(0, 100, (n,), generator=g)


@pytest.mark.parametrize("subnet", [{"width": 1.0, "depth": 4}, {"width": 0.5, "depth": 4}, {"width": 0.5, "depth": 2}])
def test_last_exit_is_the_dit_supernet_and_static(subnet):
    _, net = tiny()
    heads = CertaintyHeads(32, 4)
    x, t = batch()
    net.set_subnet(subnet)
    with torch.no_grad():
        eps, u = exit_outputs(net, heads, x, t)
        assert len(eps) == len(u) == subnet["depth"]
        assert torch.equal(eps[-1], net(x, t))
        static = net.export(subnet)
        eps_s, u_s = exit_outputs(static, heads, x, t)
        assert torch.equal(eps_s[-1], static(x, t))
        torch.testing.assert_close(eps_s[-1], eps[-1], rtol=1e-5, atol=1e-6)
    assert all(v.shape == (6,) and bool(((v > 0) & (v < 1)).all()) for v in u)


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_every_exit_is_the_shared_final_layer_after_its_blocks(width):
    _, net = tiny(depths=[4, 3, 2, 1])
    x, t = batch()
    with torch.no_grad():
        net.set_subnet({"width": width, "depth": 4})
        eps, _ = exit_outputs(net, CertaintyHeads(32, 4), x, t)
        for i, e in enumerate(eps):
            shallow = net.export({"width": width, "depth": i + 1})
            torch.testing.assert_close(e, shallow(x, t), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eps[0], eps[-1])  # the exits do differ


def reference_loss(eps, u, noise):
    """AdaDiff's loss written out image by image and layer by layer (w_i = u_i / sum_j u_j)."""
    b, n = noise.shape[0], len(eps)
    final = sum(((eps[-1][j] - noise[j]) ** 2).mean() for j in range(b)) / b
    head, layer = 0.0, 0.0
    for j in range(b):
        total_u = sum(u[i][j] for i in range(n))
        for i in range(n):
            label = (1 - torch.tanh((eps[i][j] - noise[j]).abs())).mean()
            head = head + (u[i][j] - label) ** 2 / (b * n)
            layer = layer + u[i][j] / total_u * ((eps[i][j] - noise[j]) ** 2).mean() / b
    return final, head, layer


def hand_made(n_layers=3, b=4):
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = [(noise + torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64) / (i + 1)).requires_grad_()
           for i in range(n_layers)]
    u = [torch.rand(b, generator=g, dtype=torch.float64).requires_grad_() for _ in range(n_layers)]
    return eps, u, noise


def test_loss_matches_the_formula():
    eps, u, noise = hand_made()
    total, parts = adadiff_loss(eps, u, noise)
    final, head, layer = reference_loss(eps, u, noise)
    torch.testing.assert_close(total, final + head + layer)
    final, head, layer = (float(v.detach()) for v in (final, head, layer))
    assert parts["final"] == pytest.approx(final) and parts["certainty"] == pytest.approx(head)
    assert parts["layerwise"] == pytest.approx(layer) and parts["total"] == pytest.approx(float(total.detach()))


def test_pseudo_label_range_and_exact_exit():
    eps, _, noise = hand_made()
    labels = pseudo_labels(eps + [noise.clone(), noise + 100.0], noise)
    assert labels.shape == (4, 5) and not labels.requires_grad
    assert bool(((labels >= 0) & (labels <= 1)).all())
    assert torch.equal(labels[:, 3], torch.ones(4, dtype=torch.float64))  # eps_i == noise: fully certain
    assert torch.allclose(labels[:, 4], torch.zeros(4, dtype=torch.float64))  # far off: no certainty
    assert bool((labels[:, 2] > labels[:, 0]).all())  # the closer exit gets the higher label


def test_gradients_do_not_flow_through_the_pseudo_label_or_weights():
    eps, u, noise = hand_made()
    adadiff_loss(eps, u, noise)[0].backward()
    labels = pseudo_labels(eps, noise)
    n, b = len(u), noise.shape[0]
    for i in range(n):  # the heads' gradient: only from the certainty MSE (weights are detached)
        torch.testing.assert_close(u[i].grad, 2 * (u[i].detach() - labels[:, i]) / (b * n))
    # the exits' gradient: only from the final and the weighted layer MSE, none through the label
    eps2 = [e.detach().clone().requires_grad_() for e in eps]
    final, _, layer = reference_loss(eps2, [v.detach() for v in u], noise)
    (final + layer).backward()
    for e, e2 in zip(eps, eps2):
        torch.testing.assert_close(e.grad, e2.grad)


def test_threshold_extremes():
    _, net = tiny()
    heads = CertaintyHeads(32, 4)
    x, t = batch()
    with torch.no_grad():
        eps, _ = exit_outputs(net, heads, x, t)
        never = DynamicExitDenoiser(net, heads, 2.0)
        assert torch.equal(never(x, t), net(x, t))
        assert never.last_depths.tolist() == [4] * 6
        for threshold in (0.0, -1.0):
            always = DynamicExitDenoiser(net, heads, threshold)
            torch.testing.assert_close(always(x, t), eps[0], rtol=0, atol=0)
            assert always.last_depths.tolist() == [1] * 6
        assert torch.equal(always(x, torch.tensor(7)), exit_outputs(net, heads, x, torch.tensor(7))[0][0])
    assert bool((always.last_flops < never.last_flops).all())


def test_exit_is_per_image_with_a_shrinking_batch():
    cfg, net = tiny()
    heads = CertaintyHeads(32, 4)
    with torch.no_grad():
        heads.tokens[0].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        heads.tokens[1].bias.fill_(-10.0)  # nobody exits at block 2
        heads.tokens[2].bias.fill_(10.0)  # everyone left exits at block 3
    x, t = batch(8)
    with torch.no_grad():
        eps, u = exit_outputs(net, heads, x, t)
    first = u[0].sort().values
    threshold = float(first[3] + first[4]) / 2  # half the images exit after block 1
    denoiser = DynamicExitDenoiser(net, heads, threshold)
    seen = {i: [] for i in range(4)}
    for i, block in enumerate(net.blocks):  # record the batch size each block runs on
        block.forward = (lambda f, i: lambda h, c: seen[i].append(h.shape[0]) or f(h, c))(block.forward, i)
    out = denoiser(x, t)
    # the reference, image by image: the first block whose certainty reaches the threshold, else the last
    expected = [next((i + 1 for i in range(3) if u[i][j] >= threshold), 4) for j in range(8)]
    assert denoiser.last_depths.tolist() == expected and sorted(set(expected)) == [1, 3]
    for j, d in enumerate(expected):
        torch.testing.assert_close(out[j], eps[d - 1][j], rtol=1e-5, atol=1e-6)
    assert seen == {0: [8], 1: [4], 2: [4], 3: []}
    # FLOPs: the parts add up to the DiT's own count, a head is two dot products per token plus one
    cost = denoiser.unit_flops
    assert cost["stem"] + 4 * cost["block"] + cost["final"] == flops_table(cfg.model, SHAPE)[net.full]
    assert cost["head"] == 2 * 16 * 32 + 2 * 32
    for d, flops in zip(expected, denoiser.last_flops.tolist()):
        assert flops == cost["stem"] + d * (cost["block"] + cost["head"]) + cost["final"]  # d < 4: heads all ran
    early = denoiser.last_depths == 1
    assert denoiser.last_flops[early].max() < denoiser.last_flops[~early].min()


def test_flops_skip_the_last_head():
    _, net = tiny()
    denoiser = DynamicExitDenoiser(net, CertaintyHeads(32, 4), 2.0)
    cost = denoiser.unit_flops
    flops = denoiser.flops_at(torch.tensor([4, 2]))
    assert flops.tolist() == [cost["stem"] + 4 * cost["block"] + 3 * cost["head"] + cost["final"],
                              cost["stem"] + 2 * cost["block"] + 2 * cost["head"] + cost["final"]]


def test_training_calibrates_the_heads():
    cfg, net = tiny()
    heads = CertaintyHeads(32, 4)
    schedule = NoiseSchedule(cfg.diffusion)
    x0 = load_dataset("digits", limit=32).to_float()
    g = torch.Generator().manual_seed(4)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 100, (32,), generator=g)
    xt = schedule.q_sample(x0, t, noise)
    net.train()
    opt = torch.optim.AdamW([*net.parameters(), *heads.parameters()], lr=3e-3)
    history = []
    for _ in range(40):
        loss, parts = adadiff_loss(*exit_outputs(net, heads, xt, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(parts)
    assert history[-1]["certainty"] < 0.25 * history[0]["certainty"]
    assert history[-1]["final"] < history[0]["final"]
    with torch.no_grad():
        eps, u = exit_outputs(net.eval(), heads, xt, t)
    u, labels = torch.stack(u, 1).flatten(), pseudo_labels(eps, noise).flatten()
    assert float(torch.corrcoef(torch.stack([u, labels]))[0, 1]) > 0.5
