"""Multi-stage decoders (arXiv 2312.09181): timestep stages found by dynamic programming over a
dissimilarity of timesteps (`stages`: the `stages` command writes stages.json), whose boundaries a
multi-stage U-Net (`model.kind: multistage`, a backbone: backbones/multistage.py) takes as
`model.stage_boundaries`. The stage of each step follows its timestep, so no schedule setting, step
field or gene is needed: this family uses none of the runtime plug-in points.
"""

from ...space.plugins import MethodFamily


class MultiStage(MethodFamily):
    """Timestep stages for the multi-stage U-Net."""

    name = "multistage"
    summary = "multi-stage decoders: timestep stages by interval clustering, one slimmable decoder per stage"


PLUGIN = MultiStage()
