"""Pretrained models brought in as supernets.

- `diffusers_unet.import_diffusers`: a diffusers UNet2DModel as a U-Net supernet (what maps and what is
  refused: `diffusers_config`), with an import record (import.json) kept beside it;
- `importance.reorder_by_importance`: order a U-Net supernet's channels by Taylor importance, so that
  each width keeps the most important GroupNorm groups and heads.

Fine-tuning the import into a supernet is training with `train.init_from` (and `train.teacher`).
Plug-in points: supernet add-on files (the import record). Nothing heavy is imported here.
"""

from ...space.plugins import MethodFamily


class Pretrained(MethodFamily):
    """Import of diffusers models."""

    name = "pretrained"
    summary = "import a diffusers UNet2DModel as a U-Net supernet, channels optionally ordered by importance"
    addons = ("import.json",)


PLUGIN = Pretrained()
