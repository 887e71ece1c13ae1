"""Fine-tuning a supernet that exists (train.init_from), distilled from its frozen self (train.teacher)."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.errors import DDSMError
from ddsm_search.methods.pretrained.diffusers_config import unet2d_class
from ddsm_search.methods.pretrained.diffusers_unet import import_diffusers
from ddsm_search.training import train

MODEL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
             norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random diffusers UNet2DModel imported as a supernet (the 'pretrained' model)."""
    root = tmp_path_factory.mktemp("init-from")
    torch.manual_seed(0)
    unet2d_class()(**MODEL).save_pretrained(root / "unet")
    import_diffusers(root / "unet", root / "net", widths=(1.0, 0.5))
    return root / "net"


def _cfg(net, **train):
    cfg = load_supernet(net).config
    small = dict(steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1, init_from=str(net))
    return replace(cfg, train=replace(cfg.train, **{**small, **train}))


def _losses(out) -> dict:
    with open(out / "loss_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {r["subnet"]: float(r["loss"]) for r in rows if r["step"] == "1"}


def _full_output(net, x, t):
    model = load_supernet(net).model
    with torch.no_grad():
        return model.set_subnet(model.full)(x, t)


def test_init_from_starts_at_the_imported_weights_and_distils_from_them(imported, tmp_path):
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    # lr 1e-30: steps below float32 resolution, so the run keeps the imported weights exactly
    out = train(_cfg(imported, lr=1e-30), tmp_path / "still", progress=False, grids=False)
    assert torch.equal(_full_output(out, x, t), _full_output(imported, x, t))
    # distill_weight 1 from the frozen import: full size starts as its own teacher, loss exactly 0
    out = train(_cfg(imported, teacher="frozen", distill_weight=1.0), tmp_path / "frozen", progress=False,
                grids=False)
    losses = _losses(out)
    assert losses["width=1.0"] == 0.0 and losses["width=0.5"] > 0.0
    assert load_supernet(out).config.train.init_sha256 == load_supernet(imported).sha256


def test_init_from_refusals(imported, tmp_path, tiny_cfg):
    with pytest.raises(DDSMError, match="another model section"):
        train(replace(tiny_cfg, train=replace(tiny_cfg.train, init_from=str(imported), steps=1)), tmp_path / "a",
              progress=False, grids=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DDSMError, match="not the supernet this run started from"):
        train(_cfg(imported, init_sha256="0" * 64), tmp_path / "b", progress=False, grids=False)
    with pytest.raises(DDSMError, match="frozen distils from the model given by train.init_from"):
        from ddsm_search.config import validate

        validate(replace(tiny_cfg, train=replace(tiny_cfg.train, teacher="frozen")))
