"""What every slimmable supernet offers, whatever its backbone: a space of subnets, one active subnet,
and static export.

As in once-for-all, the active subnet is a plain attribute that `set_subnet` hands down to the layers
(each slimmable layer keeps its `width`; a DiT keeps how many blocks it runs). `export(subnet)`
returns a plain torch network with only that subnet's weights, equal to the supernet at that subnet.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..space.subnet import Subnet, SubnetSpace
from .slim import slim_layers


class SlimModel(nn.Module):
    """Base of the supernets: `space`, the active `subnet`, `set_subnet` and `export`."""

    space: SubnetSpace
    subnet: Subnet

    @property
    def full(self) -> Subnet:
        """Return the full-size subnet."""
        return self.space.full

    def check_subnet(self, subnet) -> Subnet:
        """Return `subnet` (a Subnet, key, mapping or bare width) as a member of this supernet's space."""
        return self.space.check(subnet)

    def set_subnet(self, subnet) -> "SlimModel":
        """Make the supernet run `subnet`; return self."""
        subnet = self.check_subnet(subnet)
        self.subnet = subnet
        self.apply_subnet(subnet)
        return self

    # Timestep stages (a multi-stage U-Net: one decoder per stage of timesteps). A backbone without
    # them has one stage over every timestep, and its subnets do not depend on the step.
    num_stages: int = 1

    def stage_timesteps(self, stage: int, timesteps: int) -> tuple[int, int]:
        """Return the timesteps [lo, hi) of `stage` in a process of `timesteps` steps (training draws a
        batch's timesteps there)."""
        return 0, timesteps

    def stage_space(self, stage: int | None) -> SubnetSpace:
        """Return the subnets that run at `stage` (the sandwich rule draws from them); None: all."""
        return self.space

    def step_subnets(self, subnets, timesteps) -> list[Subnet]:
        """Return the subnet each sampling step runs (one per timestep of `timesteps`, noisiest first):
        here `subnets` checked; a backbone with stages fills in each step's stage from its timestep."""
        return [self.check_subnet(s) for s in subnets]

    def concrete(self, subnet) -> list[Subnet]:
        """Return the members of the space that `subnet` may stand for at some step: itself here; a
        subnet that leaves the stage to the step stands for one per stage."""
        return [self.check_subnet(subnet)]

    def cache_branches_at(self, subnet) -> int:
        """Return the branches a cached step running `subnet` may choose from, 1 .. this (feature caching,
        methods/caching; the backbone's `deep_forward`); 0: a backbone without cache points."""
        return 0

    def apply_subnet(self, subnet: Subnet) -> None:
        """Hand an already checked subnet's axis values to the layers (per backbone)."""
        raise NotImplementedError

    def export(self, subnet) -> nn.Module:
        """Return a plain static network (torch layers only) equal to the supernet at `subnet`."""
        raise NotImplementedError

    def set_width(self, width: float) -> None:
        """Make every slimmable layer run at `width` (part of `apply_subnet`)."""
        for _, layer in slim_layers(self):
            layer.width = width

    def load_into(self, static: nn.Module, width: float, keep: Callable[[str], bool] = lambda name: True) -> nn.Module:
        """Load the slim layers' weights at `width` (those whose name `keep` accepts) into the static
        network, strictly (every weight is a slim layer's: none missing, none extra); return it on the
        supernet's device, in the supernet's train/eval mode."""
        state = {f"{name}.{key}": value.detach().clone()
                 for name, layer in slim_layers(self) if keep(name)
                 for key, value in layer.sliced_state(width).items()}
        static.load_state_dict(state, strict=True)
        return static.to(next(self.parameters()).device).train(self.training)
