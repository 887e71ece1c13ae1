"""Early exit (AdaDiff, arXiv 2309.17074): certainty heads per DiT block, trained on the frozen supernet
(`finetune`), and a per-image dynamic exit at the supernet's depth choices (`heads`), whose per-step
thresholds a schedule carries as its `exit` setting (`policy`) and a search as one gene per segment.

Plug-in points (`plugin.EarlyExit`): schedule settings, step runtime, supernet add-on files, search
genes, executed cost.
"""

from .plugin import EarlyExit

PLUGIN = EarlyExit()
