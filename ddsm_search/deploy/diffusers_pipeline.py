"""A diffusers-style pipeline that runs an exported schedule: its plan, with whatever its settings add.

    pipe = DDSMPipeline.from_schedule("results/digits-search/schedule_50%.json")   # supernet: as recorded
    images = pipe(batch_size=16, seed=0).images                                     # NHWC floats in [0, 1]
    pipe.save_pretrained("digits-50")                                               # a self-contained folder
    pipe = DDSMPipeline.from_pretrained("digits-50")                                # the same images

It is a `diffusers.DiffusionPipeline` where diffusers imports (imported plainly), and a plain object
with the same calls otherwise: `DIFFUSERS_ERROR` then says in one line why, and so does asking it for
a DiffusionPipeline method it lacks. Either way `__call__` is `sampling.generate` on the schedule's plan,
so its images equal generate's for the same seed or generator (tested). The number of inference steps
is the schedule's: a schedule is one subnet per step, so another count is refused.

Components, as diffusers names them:
- `unet`, a `DDSMDenoiser`: the schedule and its supernet, a torch module whose parameters are the
  supernet's; `unet(sample, timestep).sample` is the predicted noise of the network the schedule's step
  at that timestep runs (its subnet, group weights or early exit). It is a U-Net or a DiT, whichever the
  supernet is; it only runs the schedule's own timesteps, since every step may run another network.
- `scheduler`: the diffusers scheduler of the solver that runs (`pipe.solver`), built from the
  supernet's betas (DDIM: DDIMScheduler(clip_sample=True, set_alpha_to_one=True, ...), the update the
  hand-written DDIM is tested equal to). Swap it for another diffusers scheduler, e.g.
  `pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)`, and the pipeline runs
  that solver on the schedule's timesteps (deploy/diffusers_schedulers.py maps class and config to a
  solvers.Solver and refuses, in one line, a scheduler or option no solver has). The run steps with a
  scheduler of its own, built as the solver builds it; DDIM's eta is the schedule's (a DDIMScheduler's
  config has none). None where diffusers' schedulers do not import: the schedule's own solver runs.

`save_pretrained(dir)` writes a folder that needs nothing outside it, every file hash-checked when it
loads: model_index.json (written last), scheduler/scheduler_config.json, unet/schedule.json (naming
the solver that runs, and the supernet as the relative path "supernet" with its SHA-256), the files
its settings name (group weights) beside it, and unet/supernet/: the supernet's meta.json, weights and
add-on files (masks, exit heads), not its train state (only resuming training reads that). If the
scheduler was swapped, the schedule is saved with the new solver and without the figures measured with
the old one. `DDSMPipeline.from_pretrained(dir)` loads it; so does diffusers' own loader, through the
one-line pipeline.py saved beside it that imports this class:
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` (or with `custom_pipeline=dir`).
The pipeline samples in float32 only: `to(torch.float16)` and `torch_dtype=torch.float16` are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DDSMError
from .diffusers_denoiser import DIFFUSERS, DIFFUSERS_ERROR, DDSMDenoiser, float32_only, no_options, parse_to

if DIFFUSERS:
    from diffusers import DiffusionPipeline, ImagePipelineOutput
else:
    DiffusionPipeline = None

    @dataclass
    class ImagePipelineOutput:
        """The pipeline's result: `images` as diffusers returns them (np, pt or pil)."""

        images: object


OUTPUT_TYPES = ("np", "pt", "pil")
INDEX = "model_index.json"
PIPELINE_FILE = "pipeline"  # pipeline.py: what diffusers' loader imports the pipeline class from
PIPELINE_CODE = '''"""DDSMPipeline, for diffusers' loader: DiffusionPipeline.from_pretrained(this folder,
trust_remote_code=True) imports the class from ddsm-search (pip install 'ddsm-search[diffusers]'); the
files it loads are hash-checked."""

from ddsm_search.deploy.diffusers_pipeline import DDSMPipeline  # noqa: F401
'''


class DiffusersMissing(DDSMError, AttributeError):
    """A DiffusionPipeline attribute asked of the plain pipeline (diffusers does not import)."""


class PlainPipeline:
    """DDSMPipeline's base where diffusers does not import: what it lacks is refused with the reason."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise DiffusersMissing(f"DDSMPipeline has no {name!r} here: it is a plain object, not a diffusers "
                               f"DiffusionPipeline, because {DIFFUSERS_ERROR}")



class DDSMPipeline(DiffusionPipeline if DIFFUSERS else PlainPipeline):
    """Sample a schedule from its supernet: the schedule's plan (sampling.Plan) under the scheduler's
    solver, one callable per step (a static subnet, or what the schedule's method families make of it).

    Components: `unet` (a DDSMDenoiser: the schedule and its supernet) and `scheduler` (a diffusers
    scheduler, optional: by default the schedule's solver's)."""

    _optional_components = ["scheduler"]

    def __init__(self, unet, scheduler=None):  # no annotations: diffusers' loader reads them as types
        if DIFFUSERS:
            super().__init__()
            self.register_to_config(unet=(None, None), scheduler=(None, None))  # read by its attribute writes
        self._unet = self._scheduler = self._solver = self._plan = None
        self._chosen = False  # a scheduler given (kept when the unet changes) rather than the schedule's
        self._use(_denoiser(unet), scheduler)

    # -- components --------------------------------------------------------------------------------------
    @property
    def unet(self) -> DDSMDenoiser:
        """Return the denoiser: the schedule and its supernet."""
        return self._unet

    @unet.setter
    def unet(self, unet) -> None:
        self._use(_denoiser(unet), self._scheduler if self._chosen else None)  # a chosen scheduler stays, checked

    @property
    def scheduler(self):
        """Return the diffusers scheduler of the solver that runs (None where diffusers' schedulers do not
        import: the schedule's solver runs)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self._use(self._unet, scheduler)

    def _use(self, unet: DDSMDenoiser, scheduler) -> None:
        """Run `unet` under `scheduler`'s solver (None: the schedule's own, its scheduler built here), or
        raise DDSMError naming a scheduler no solver steps as, changing nothing."""
        from .diffusers_schedulers import scheduler_for, solver_for

        own = unet.schedule.solver
        chosen = scheduler is not None
        if chosen:
            solver = solver_for(scheduler, unet.noise_schedule, eta=own.eta if own.name == "ddim" else 0.0)
        else:
            solver = own
            try:
                scheduler = scheduler_for(own, unet.noise_schedule)
            except DDSMError:  # diffusers' schedulers do not import: the schedule's own solver still runs
                scheduler = None
        self._unet, self._scheduler, self._solver, self._chosen, self._plan = unet, scheduler, solver, chosen, None
        self._register("unet", unet)
        self._register("scheduler", scheduler)

    def _register(self, name: str, component) -> None:
        """Record a component's library and class in diffusers' config (model_index.json's entries)."""
        if DIFFUSERS:
            self.register_to_config(**{name: _library_class(component)})

    @property
    def components(self) -> dict:
        """Return what the pipeline is made of (diffusers' name for it)."""
        return {"unet": self.unet, "scheduler": self.scheduler}

    @property
    def supernet(self):
        """Return the supernet (checkpoint.Supernet)."""
        return self.unet.supernet

    @property
    def schedule(self):
        """Return the schedule (schedule.Schedule) as loaded; it runs under `solver`."""
        return self.unet.schedule

    @property
    def backend(self) -> str:
        """Return the backend its static subnets run on."""
        return self.unet.backend

    @property
    def solver(self):
        """Return the solver that runs: the scheduler's (solvers.Solver)."""
        return self._solver

    @property
    def plan(self):
        """Return the plan that runs: the schedule's steps and timesteps under the scheduler's solver."""
        if self._plan is None or self._plan.runtime is not self.unet.runtime:
            self._plan = self.unet.plan(self._solver)
        return self._plan

    # -- construction ------------------------------------------------------------------------------------
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
        schedule = load_schedule(schedule_path, supernet)
        return cls(DDSMDenoiser(supernet, schedule, device=device, backend=backend))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device: str = "cpu", backend: str = "torch",
                        torch_dtype=None, dtype=None, unet=None, scheduler=None, **kwargs) -> "DDSMPipeline":
        """Return the pipeline saved in a folder by `save_pretrained`, every file hash-checked; `unet` or
        `scheduler` given replace the saved ones. (A local folder: nothing is downloaded.)"""
        where = f"DDSMPipeline.from_pretrained({str(pretrained_model_name_or_path)!r})"
        float32_only(torch_dtype, where)
        float32_only(dtype, where)
        kwargs.pop("custom_pipeline", None)  # diffusers' way to name this class: it is this class
        kwargs.pop("trust_remote_code", None)
        no_options(where, kwargs, {"local_files_only": (True, False, None)})
        folder = Path(pretrained_model_name_or_path)
        if not (folder / INDEX).is_file():
            raise DDSMError(f"{folder} is not a saved DDSMPipeline (no {INDEX}; write one with "
                            "DDSMPipeline.save_pretrained)" if folder.is_dir() else f"folder not found: {folder}")
        from ..io import read_json

        index = read_json(folder / INDEX, "pipeline index")
        if index.get("_class_name") not in ([PIPELINE_FILE, cls.__name__], cls.__name__):
            raise DDSMError(f"{folder / INDEX} is not a DDSMPipeline's (its class: {index.get('_class_name')!r})")
        entry = index.get("unet")
        if unet is None:
            # folders saved before the denoiser had a module of its own name this one (which imports it)
            if entry not in ([DDSMDenoiser.__module__, DDSMDenoiser.__name__], [__name__, DDSMDenoiser.__name__]):
                raise DDSMError(f"{folder / INDEX}: unet {entry!r} is not a DDSMDenoiser")
            unet = DDSMDenoiser.from_pretrained(folder / "unet", device=device, backend=backend)
        if scheduler is None:
            scheduler = _load_scheduler(folder, index.get("scheduler"))
        return cls(unet, scheduler)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant=None,
                        push_to_hub: bool = False, **kwargs) -> Path:
        """Write the pipeline into `save_directory` as a folder `from_pretrained` (this class's or
        diffusers') loads with nothing outside it; return the folder. model_index.json is written last."""
        from ..io import write_json_atomic, write_text_atomic

        no_options("DDSMPipeline.save_pretrained", {"safe_serialization": safe_serialization, "variant": variant,
                                                     "push_to_hub": push_to_hub, **kwargs},
                    {"safe_serialization": (True,), "variant": (None,), "push_to_hub": (False,)})
        out = Path(save_directory)
        self.unet.save_pretrained(out / "unet", solver=self._solver)
        if self.scheduler is not None:
            self.scheduler.save_pretrained(out / "scheduler")
        write_text_atomic(out / f"{PIPELINE_FILE}.py", PIPELINE_CODE)
        index = {"_class_name": [PIPELINE_FILE, type(self).__name__], **_diffusers_version(),
                 "scheduler": list(_library_class(self.scheduler)), "unet": list(_library_class(self.unet))}
        write_json_atomic(out / INDEX, index)
        return out

    # -- where and how it runs ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Return the device the pipeline samples on."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """Return the dtype it samples in (float32)."""
        return torch.float32

    def to(self, *args, **kwargs) -> "DDSMPipeline":
        """Move the supernet (and the networks of its steps) to a device; return self. Any dtype but
        float32 is refused in one line (DDSMError)."""
        device, _ = parse_to(args, dict(kwargs), "DDSMPipeline.to")
        if device is not None:
            self.unet.to(device)
            self._plan = None
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


def _denoiser(unet) -> DDSMDenoiser:
    """Return `unet` if it is a DDSMDenoiser, else raise DDSMError."""
    if not isinstance(unet, DDSMDenoiser):
        raise DDSMError(f"DDSMPipeline's unet must be a DDSMDenoiser (a schedule and its supernet), got "
                        f"{type(unet).__name__}")
    return unet


def _library_class(component) -> tuple:
    """Return (library, class) as diffusers' model_index.json names a component ((None, None): none)."""
    if component is None:
        return None, None
    module = type(component).__module__
    return (module.split(".")[0] if module.startswith("diffusers.") else module), type(component).__name__


def _diffusers_version() -> dict:
    """Return {"_diffusers_version": the installed version}, or {} if diffusers is not installed."""
    from importlib import metadata

    try:
        return {"_diffusers_version": metadata.version("diffusers")}
    except metadata.PackageNotFoundError:
        return {}


def _load_scheduler(folder: Path, entry):
    """Return the scheduler a saved pipeline's model_index.json names, read from its folder; None for none,
    or where diffusers' schedulers do not import (the saved schedule names the solver it maps to)."""
    if entry in (None, [None, None]):
        return None
    from ..solvers.schedulers import diffusers_schedulers
    from .diffusers_schedulers import SOLVER_OF

    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers" and entry[1] in SOLVER_OF):
        name = ".".join(map(str, entry)).removeprefix("diffusers.") if isinstance(entry, list) else repr(entry)
        raise DDSMError(f"{folder / INDEX}: scheduler {name} has no solver in ddsm-search (choose from "
                        f"{', '.join(SOLVER_OF)}, diffusers' own classes)")
    try:
        schedulers = diffusers_schedulers()
    except DDSMError:
        return None
    try:
        return getattr(schedulers, entry[1]).from_pretrained(folder / "scheduler")
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DDSMError(f"{folder / 'scheduler'}: the {entry[1]} cannot be read ({first})") from None


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
