"""Sparse-to-sparse supernet training (arXiv 2504.21380): Static, RigL and MagRan masks (`masks`),
kept beside the supernet (masks.safetensors) and counted in a sparse FLOPs table.

Plug-in points (`plugin.Sparsity`): training (a hook into every step), supernet add-on files, cost
(the sparse table `search.cost` chooses).
"""

from .plugin import Sparsity

PLUGIN = Sparsity()
