"""Step groups (Step-Adaptive Training, arXiv 2312.13307, reconstructed): timestep groups of equal
log-SNR spans and a size prior per group (`groups`), per-group fine-tuning of a schedule's runs of one
subnet on their own timesteps (`finetune`), and the weights a schedule names (`weights`).

Plug-in points (`plugin.StepGroups`): schedule settings, step runtime, search seeds.
"""

from .plugin import StepGroups

PLUGIN = StepGroups()
