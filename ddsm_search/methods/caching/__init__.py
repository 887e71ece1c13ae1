"""Feature caching, training-free: DeepCache on the U-Net (arXiv 2312.00858) and Delta-DiT's block
caching on the DiT (arXiv 2406.01125). A full step keeps the features of one branch; the cached steps
after it run only the outer part of the network and reuse them (`steps`: the per-step values and their
rules; `features`: the step runtime; `plugin`: the setting, the measured FLOPs and `CacheGenes`, a
caching interval and branch per segment).

Plug-in points (`plugin.Caching`): schedule settings, step runtime, cost (a cached step's FLOPs
measured like a subnet's), search genes.
"""

from .plugin import Caching

PLUGIN = Caching()
