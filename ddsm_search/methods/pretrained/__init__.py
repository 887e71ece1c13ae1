"""Pretrained models brought in as supernets.

- `diffusers_unet.import_diffusers`: a diffusers UNet2DModel as a U-Net supernet (what maps and what is
  refused: `diffusers_config`); `command.add_import_parser`: its CLI command, `import-diffusers`.
- `importance.reorder_by_importance`: order a U-Net supernet's channels by Taylor importance, so that
  each width keeps the most important GroupNorm groups and heads.

Nothing is imported here, so that the CLI can add the command without loading torch.
"""
