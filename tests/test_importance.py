"""Ordering channels by Taylor importance: the full-size function stays (to 1e-5), smaller widths keep
other (whole) groups and heads, and the order is deterministic."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ddsm_search.backbones.registry import build_supernet
from ddsm_search.checkpoint import load_supernet
from ddsm_search.config import DiffusionConfig, DiTConfig, UNetConfig
from ddsm_search.errors import DDSMError
from ddsm_search.methods.pretrained.diffusers_unet import IMPORT_FILE, import_diffusers
from ddsm_search.methods.pretrained.importance import channel_sets, reorder_by_importance
from tests.test_import_diffusers import CONFIGS, save_unet

DIFFUSION = DiffusionConfig(timesteps=100)


def _native(**changes):
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(4,), group_size=4, head_dim=8,
                     **changes)
    net = build_supernet(cfg, (1, 8, 8)).eval()
    with torch.no_grad():  # norms' scales and biases start at 1 and 0: make every channel differ
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance")
    nets = {}
    for name in ("additive", "scale_shift"):
        save_unet(root / name, **CONFIGS[name])
        nets[name] = load_supernet(import_diffusers(root / name, root / f"{name}-net")).model
    return nets


def _images(shape, n=8, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _outputs(net, x, t, widths):
    with torch.no_grad():
        return {w: net.set_subnet(w)(x, t) for w in widths}


@pytest.mark.parametrize("which", ["native", "native-fixed-heads", "additive", "scale_shift"])
def test_full_size_unchanged_and_half_width_changed(imported, which):
    net = {"native": lambda: _native(), "native-fixed-heads": lambda: _native(attn_heads=2, widths=(1.0, 0.5))}.get(
        which, lambda: copy.deepcopy(imported[which]))()
    before = copy.deepcopy(net)
    shape = net.image_shape
    report = reorder_by_importance(net, _images(shape), DIFFUSION, images=8, timesteps=3, batch_size=4)
    assert report["sets_permuted"] > 0 and any(s["moved"] for s in report["sets"])
    assert net.subnet == net.full and not any(p.grad is not None for p in net.parameters())
    json.dumps(report)  # kept in import.json
    x, t = _images(shape, n=3, seed=1), torch.tensor([3, 50, 99])
    old, new = _outputs(before, x, t, (1.0, 0.5)), _outputs(net, x, t, (1.0, 0.5))
    assert (old[1.0] - new[1.0]).abs().max() < 1e-5
    assert (old[0.5] - new[0.5]).abs().max() > 1e-3
    assert torch.isfinite(new[0.5]).all()


def _signature(block) -> torch.Tensor:
    """Per channel inside a ResBlock, values that move only with it: conv1's bias, norm2's scale and bias."""
    return torch.stack([block.conv1.bias, block.norm2.weight, block.norm2.bias], 1).detach()


def test_widths_keep_whole_groups_of_other_channels():
    net = _native()
    before = copy.deepcopy(net)
    reorder_by_importance(net, _images((1, 8, 8)), DIFFUSION, images=8, timesteps=3, batch_size=4)
    changed = 0
    for (name, old), new in zip(before.named_modules(), net.modules()):
        if type(old).__name__ != "ResBlock":
            continue
        sig_old, sig_new = _signature(old), _signature(new)
        origin = [int((sig_old - row).abs().sum(1).argmin()) for row in sig_new]
        assert all(torch.equal(sig_old[i], row) for i, row in zip(origin, sig_new)), name
        kept = origin[:new.conv1.active_out(0.5)[0]]
        group = new.norm2.group_size
        assert len({i // group for i in kept}) * group == len(kept), name  # whole groups only
        changed += sorted(kept) != list(range(len(kept)))
    assert changed > 0


def test_attention_sets_move_whole_heads_or_channels_inside_heads():
    sets = {s.name: s for s in channel_sets(_native())}
    heads = sets["down.2.1.heads"]
    assert heads.unit == 8 and len(heads.taps) == 4
    fixed = {s.name: s for s in channel_sets(_native(attn_heads=2, widths=(1.0, 0.5)))}
    assert {"down.2.1.head0.qk", "down.2.1.head1.v"} <= set(fixed) and fixed["down.2.1.head0.qk"].size == 16


def test_straddling_groups_stay_and_are_reported(imported):
    # block_out_channels (32, 64) in 8 groups: the decoder's [h 64, skip 32] has groups of 12, which
    # straddle the skip's edge, so part of conv_in's channels cannot move
    report = reorder_by_importance(copy.deepcopy(imported["additive"]), _images((1, 8, 8)), DIFFUSION, images=4,
                                   timesteps=2, batch_size=4)
    partial = [s for s in report["sets"] if s["fixed"]] + report["kept_in_order"]
    assert partial


def test_order_is_deterministic():
    a, b = _native(), _native()
    for net in (a, b):
        reorder_by_importance(net, _images((1, 8, 8)), DIFFUSION, images=8, timesteps=3, batch_size=4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_only_u_nets():
    torch.manual_seed(0)
    dit = build_supernet(DiTConfig(hidden_size=32, blocks=2, head_dim=8), (1, 8, 8))
    with pytest.raises(DDSMError, match="U-Net"):
        reorder_by_importance(dit, _images((1, 8, 8)), DIFFUSION)


def test_import_with_importance_order(tmp_path):
    """import_diffusers(importance=N) orders on N training images (digits here) and still equals the
    diffusers model at full width."""
    model = save_unet(tmp_path / "m", **CONFIGS["additive"])
    supernet = load_supernet(import_diffusers(tmp_path / "m", tmp_path / "net", importance=8))
    record = json.loads((supernet.path / IMPORT_FILE).read_text())
    assert record["importance"]["images"] == 8 and record["importance"]["sets_permuted"] > 0
    x, t = _images((1, 8, 8), n=2), torch.tensor([0, 999])
    with torch.no_grad():
        assert (supernet.model.set_subnet(1.0)(x, t) - model(x, t).sample).abs().max() < 1e-5
