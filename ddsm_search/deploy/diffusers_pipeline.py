"""A diffusers-style pipeline that runs an exported schedule: its plan, with whatever its settings add.

    pipe = DDSMPipeline.from_schedule("results/digits-search/schedule_50%.json")   # supernet: as recorded
    images = pipe(batch_size=16, seed=0).images                                     # NHWC floats in [0, 1]

It is a `diffusers.DiffusionPipeline` where diffusers imports (imported plainly: no private flag of
diffusers is set), and a plain object with the same call otherwise, `DIFFUSERS_ERROR` saying in one
line why (diffusers not installed, or what stopped it importing). Either way `__call__` is
`sampling.generate` on the schedule, so its images equal generate's for the same seed or generator
(tested). The number of inference steps is the schedule's: a schedule is one subnet per step, so
another count is refused. Nothing is loaded through diffusers' `from_pretrained` and `save_pretrained`
is not offered: the deployable form stays the schedule file and the supernet directory, both
hash-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DDSMError


def diffusers_failure(exc: Exception) -> str:
    """Return one line saying why diffusers did not import."""
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "diffusers":
        return "diffusers is not installed (pip install 'ddsm-search[diffusers]')"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # diffusers wraps a dependency that fails to load in a RuntimeError whose last line is the cause
    cause = (lines[-1] if isinstance(exc, RuntimeError) else lines[0]) if lines else type(exc).__name__
    hint = (" (a torchvision built for another torch? pip uninstall torchvision, or install the one made for this "
            "torch)") if "torchvision" in str(exc) else ""
    return f"diffusers does not import: {cause}{hint}"


def _diffusers_base():
    """Return (DiffusionPipeline, ImagePipelineOutput, None) from diffusers, or (None, None, why not)."""
    try:
        from diffusers import DiffusionPipeline, ImagePipelineOutput
    except Exception as exc:  # noqa: BLE001 - whatever stops diffusers importing means: the thin pipeline
        return None, None, diffusers_failure(exc)
    return DiffusionPipeline, ImagePipelineOutput, None


_Base, _Output, DIFFUSERS_ERROR = _diffusers_base()
DIFFUSERS = _Base is not None

if _Output is None:
    @dataclass
    class ImagePipelineOutput:
        """The pipeline's result: `images` as diffusers returns them (np, pt or pil)."""

        images: object
else:
    ImagePipelineOutput = _Output

OUTPUT_TYPES = ("np", "pt", "pil")


class DDSMPipeline(_Base or object):
    """Sample a schedule from its supernet: the schedule's plan (sampling.Plan), one callable per step
    (a static subnet, or what the schedule's method families make of it)."""

    def __init__(self, supernet, schedule, *, backend: str = "torch"):
        if DIFFUSERS:
            super().__init__()
            self.register_to_config(_schedule_steps=schedule.steps)  # diffusers' config: none of our modules
        self.supernet, self.schedule, self.backend = supernet, schedule, backend
        self._device = torch.device(next(supernet.model.parameters()).device)
        self._plan()

    def _plan(self) -> None:
        from ..sampling import Runtime

        runtime = Runtime(self.supernet, device=self._device.type, backend=self.backend)
        self.plan = runtime.plan_schedule(self.schedule)  # checked (a multi-stage U-Net: each step's stage)

    @classmethod
    def from_schedule(cls, schedule_path: str | Path, supernet_dir: str | Path | None = None, *,
                      device: str = "cpu", backend: str = "torch") -> "DDSMPipeline":
        """Return the pipeline of a schedule file and its supernet (default: the path the schedule
        recorded), both checked as `sample --schedule` checks them."""
        from ..checkpoint import load_supernet
        from ..sampling import resolve_device
        from ..schedule import load_schedule

        if supernet_dir is None:
            supernet_dir = load_schedule(schedule_path).supernet_path
            if not supernet_dir:
                raise DDSMError(f"schedule {schedule_path} names no supernet: pass supernet_dir")
        device = resolve_device(device)
        supernet = load_supernet(supernet_dir, device)
        return cls(supernet, load_schedule(schedule_path, supernet), backend=backend)

    @property
    def device(self) -> torch.device:
        """Return the device the pipeline samples on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Return the dtype of its weights (float32)."""
        return next(self.supernet.model.parameters()).dtype

    @property
    def components(self) -> dict:
        """Return what the pipeline is made of (diffusers' name for it)."""
        return {"supernet": self.supernet, "schedule": self.schedule}

    def to(self, device) -> "DDSMPipeline":
        """Move the supernet (and the networks of its steps) to `device`; return self."""
        device = torch.device(device)
        self.supernet.model.to(device)
        self._device = device
        self._plan()
        return self

    @property
    def num_inference_steps(self) -> int:
        """Return the schedule's number of sampling steps."""
        return self.schedule.steps

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                 num_inference_steps: int | None = None, output_type: str = "np", return_dict: bool = True,
                 progress: bool = False, batch: int = 500):
        """Return ImagePipelineOutput(images) of `batch_size` images sampled as `sampling.generate` samples
        them from `seed` (default 0) or a CPU `generator`: np (N, H, W, C floats in [0, 1]), pt (N, C, H, W
        in [0, 1]) or pil; with return_dict=False, (images,)."""
        from ..sampling import generate

        if output_type not in OUTPUT_TYPES:
            raise DDSMError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_inference_steps is not None and num_inference_steps != self.schedule.steps:
            raise DDSMError(f"this schedule runs {self.schedule.steps} steps (one subnet each), not "
                            f"num_inference_steps={num_inference_steps}")
        if generator is not None and seed is not None:
            raise DDSMError("pass a generator or a seed, not both")
        x = generate(self.plan, n=batch_size, seed=0 if seed is None else seed, generator=generator, batch_size=batch,
                     progress=progress)
        images = to_output(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def to_output(x: torch.Tensor, output_type: str):
    """Return images in [-1, 1] (N, C, H, W) as diffusers' pipelines return them for `output_type`."""
    pt = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return pt
    arr = pt.permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    pixels = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
