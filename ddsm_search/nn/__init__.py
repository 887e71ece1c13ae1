"""Building blocks: slimmable layers, the slimmable U-Net supernet and its cost."""
