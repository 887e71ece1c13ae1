"""The FLOPs table is measured, counts attention, and grows with width."""

from __future__ import annotations

import torch

from ddsm_search.backbones.cost import count_flops, flops_table
from ddsm_search.backbones.slim import SlimConv2d, SlimKit
from ddsm_search.backbones.unet import AttnBlock
from ddsm_search.config import config_from_dict
from ddsm_search.space.subnet import Subnet
from tests.conftest import tiny_dict


def test_conv_flops_match_the_formula_at_reduced_width():
    conv = SlimConv2d(16, 32, 3, padding=1)
    conv.width = 0.5
    assert count_flops(conv, torch.randn(2, 8, 5, 5)) == 2 * 2 * 5 * 5 * 8 * 16 * 9


def test_attention_is_counted():
    with torch.device("meta"):
        block = AttnBlock(SlimKit(4), 16, head_dim=4)
        x = torch.empty(1, 16, 4, 4)
    convs = 2 * 16 * (16 * 48 + 16 * 16)  # qkv and proj, 16 pixels
    attention = 2 * 2 * 16 * 16 * 16  # q k^T and attn v: 16 tokens x 16 tokens x 16 channels
    assert count_flops(block, x) == convs + attention


def test_flops_table_grows_with_width():
    cfg = config_from_dict(tiny_dict())
    table = flops_table(cfg.model, (1, 8, 8))
    w = {x: Subnet.of(width=x) for x in (1.0, 0.75, 0.5)}
    assert set(table) == set(w.values()) and list(table) == [w[1.0], w[0.75], w[0.5]]  # largest first
    assert table[w[0.5]] < table[w[0.75]] < table[w[1.0]]
    # channels scale by w, so the conv-dominated cost scales by about w^2
    assert 0.2 < table[w[0.5]] / table[w[1.0]] < 0.35
