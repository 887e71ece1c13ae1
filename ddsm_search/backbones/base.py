"""What every slimmable supernet offers, whatever its backbone: a space of subnets, one active subnet,
and static export.

As in once-for-all, the active subnet is a plain attribute that `set_subnet` hands down to the layers
(each slimmable layer keeps its `width`; a DiT keeps how many blocks it runs). `export(subnet)`
returns a plain torch network with only that subnet's weights, equal to the supernet at that subnet.
"""

from __future__ import annotations

from torch import nn

from ..subnet import Subnet, SubnetSpace


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

    def apply_subnet(self, subnet: Subnet) -> None:
        """Hand an already checked subnet's axis values to the layers (per backbone)."""
        raise NotImplementedError

    def export(self, subnet) -> nn.Module:
        """Return a plain static network (torch layers only) equal to the supernet at `subnet`."""
        raise NotImplementedError
