"""How a static subnet runs: torch's layers (the default) or a plugin such as the fused CPU kernel.

A backend turns an exported static network into a denoiser, a callable (x, t) -> predicted noise,
whose `backend` attribute names it. `torch` returns the network itself. `fused` (the hand-written CPU
kernel in backends/fused, for the U-Net) runs the whole network as one call where it can, and falls
back to torch's layers elsewhere. `auto` picks, per subnet and batch size, whichever a short timing on
this machine found faster; timings are kept per machine (backends/choice.py), so a subnet is measured
once. Which is faster is not assumed: on a 2-core AVX-512 Xeon the kernel ran the digits U-Net's full
width at 0.76x torch's speed and width 0.25 at 3.3x.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import DDSMError

BACKENDS = ("torch", "fused")
CHOICES = ("auto", *BACKENDS)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def supports(name: str, net) -> bool:
    """Return whether backend `name` can run `net` at all (its kind of network, this machine)."""
    if name == "torch":
        return True
    if name == "fused":
        from ..backbones.unet import UNet
        from .fused import available
        from .fused.unet_graph import untranslatable

        # a U-Net with options the kernel does not translate (some imported diffusers models) is not
        # its kind of network: "auto" then keeps torch's layers without timing the kernel's fallback
        return isinstance(net, UNet) and available() and untranslatable(net) is None
    raise DDSMError(f"unknown backend {name!r} (choose from {', '.join(CHOICES)})")


def wrap(net, name: str) -> Denoiser:
    """Return `net` as a denoiser on backend `name` (torch: the network itself)."""
    if name == "torch":
        return net
    if not supports(name, net):
        raise DDSMError(f"backend {name!r} cannot run a {type(net).__name__} here")
    from .fused.unet_graph import FusedDenoiser

    return FusedDenoiser(net)


def backend_of(denoiser) -> str:
    """Return the name of the backend a denoiser runs on."""
    return getattr(denoiser, "backend", "torch")


def runs_fused(denoiser, x: torch.Tensor) -> bool:
    """Return whether `denoiser` would run a batch like `x` on the fused kernel."""
    return backend_of(denoiser) == "fused" and denoiser.runs_fused(x)
