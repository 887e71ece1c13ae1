"""ddsm-search: slimmable diffusion supernets and step-wise width schedules on the FLOPs-FID front."""

__version__ = "0.1.0"
