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

import dataclasses
import json
import shutil
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


try:
    from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
    DIFFUSERS_ERROR: str | None = None
except Exception as _exc:  # noqa: BLE001 - whatever stops diffusers importing means: the plain pipeline
    DIFFUSERS_ERROR = diffusers_failure(_exc)
    ConfigMixin = DiffusionPipeline = ModelMixin = None

    @dataclass
    class ImagePipelineOutput:
        """The pipeline's result: `images` as diffusers returns them (np, pt or pil)."""

        images: object

DIFFUSERS = DIFFUSERS_ERROR is None

OUTPUT_TYPES = ("np", "pt", "pil")
SCHEDULE, SUPERNET = "schedule.json", "supernet"  # in the unet folder: the schedule, the supernet's folder
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


class Config(dict):
    """A component's config where diffusers does not import: a dict read as attributes too."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class DenoiserOutput:
    """What `DDSMDenoiser` returns: the predicted noise as `sample`, as diffusers' models name it."""

    sample: torch.Tensor


def float32_only(dtype, where: str) -> None:
    """Raise DDSMError unless `dtype` is None or float32 (the only precision the pipeline samples in)."""
    if dtype is not None and dtype != torch.float32:
        raise DDSMError(f"{where}: DDSMPipeline samples in float32 only (its images are checked bit for bit "
                        f"against float32 sampling), not {dtype}")


def parse_to(args: tuple, kwargs: dict, where: str) -> tuple[torch.device | None, torch.dtype | None]:
    """Return (device, dtype) of `to(...)`'s arguments (a device, a dtype, or a tensor giving both),
    the device checked to exist here and the dtype float32 (else DDSMError in one line)."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs.pop("silence_dtype_warnings", None)
    kwargs.pop("non_blocking", None)
    if kwargs:
        raise DDSMError(f"{where}: unknown options {', '.join(sorted(kwargs))}")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
        elif isinstance(arg, (str, torch.device)):
            device = arg
        elif arg is not None:
            raise DDSMError(f"{where}: expected a device or a dtype, got {arg!r}")
    float32_only(dtype, where)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise DDSMError(f"{where}: {device!r} is not a device") from None
        if device.type not in ("cpu", "cuda"):
            raise DDSMError(f"{where}: DDSMPipeline runs on cpu or cuda, not {device.type}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DDSMError(f"{where}: no CUDA device is available")
    return device, dtype


def _no_options(where: str, given: dict, allowed: dict) -> None:
    """Raise DDSMError if an option of diffusers' loaders is given that this loader does not honour
    (`allowed`: option -> the values it may take)."""
    for key, value in given.items():
        if key not in allowed:
            raise DDSMError(f"{where}: unknown option {key}")
        if value not in allowed[key]:
            raise DDSMError(f"{where}: {key}={value!r} is not supported (a ddsm-search folder loads as it was saved)")


class DDSMDenoiser(*((ModelMixin, ConfigMixin) if DIFFUSERS else (torch.nn.Module,))):
    """The pipeline's `unet`: a schedule and its supernet (on `device`, default: where its weights are).
    Its parameters are the supernet's; calling it on a latent at one of the schedule's timesteps runs
    what that step runs (`Runtime`: made once per device and backend)."""

    config_name = "config.json"

    def __init__(self, supernet, schedule, *, device=None, backend: str = "torch"):
        from ..schedule import check_against

        super().__init__()
        check_against(schedule, supernet)
        self.supernet, self.schedule, self.backend = supernet, schedule, backend
        self.model = supernet.model  # the supernet's network: this module's parameters
        channels, height, width = supernet.image_shape
        config = dict(kind=supernet.config.model.kind, sample_size=height if height == width else [height, width],
                      in_channels=channels, out_channels=channels,
                      num_train_timesteps=supernet.config.diffusion.timesteps,
                      timesteps=schedule.grid(supernet.config.diffusion.timesteps), supernet_sha256=supernet.sha256)
        if DIFFUSERS:
            self.register_to_config(**config)
        else:
            self._config = Config(config)
        self._device = torch.device(device if device is not None else next(self.model.parameters()).device)
        self._runtime = None

    if not DIFFUSERS:
        @property
        def config(self) -> Config:
            """Return what the denoiser is: kind, sample size, channels, timesteps, the supernet's hash."""
            return self._config

    @property
    def device(self) -> torch.device:
        """Return the device its steps run on."""
        return self._device

    @property
    def noise_schedule(self):
        """Return the supernet's forward process (its betas)."""
        from ..diffusion import NoiseSchedule

        return NoiseSchedule(self.supernet.config.diffusion)

    @property
    def runtime(self):
        """Return the sampling.Runtime that makes (once) what each step runs, on this device and backend."""
        from ..sampling import Runtime

        if self._runtime is None:
            self._runtime = Runtime(self.supernet, device=self._device.type, backend=self.backend)
        return self._runtime

    def plan(self, solver=None):
        """Return the schedule's plan (sampling.Plan) under `solver` (default: the schedule's)."""
        schedule = self.schedule if solver is None else dataclasses.replace(self.schedule, solver=solver)
        return self.runtime.plan_schedule(schedule)  # checked (a multi-stage U-Net: each step's stage)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        """Return the noise predicted for `sample` at `timestep` (one of the schedule's) by what the
        schedule's step at that timestep runs: DenoiserOutput(sample=eps), or (eps,)."""
        plan = self.plan()
        values = torch.as_tensor(timestep).flatten().unique()
        if len(values) != 1:
            raise DDSMError(f"DDSMDenoiser runs one timestep per call (each step may run another network), got "
                            f"{values.tolist()}")
        t = int(values[0])
        if t not in plan.timesteps:
            raise DDSMError(f"timestep {t} is not one of the schedule's ({', '.join(map(str, plan.timesteps))})")
        step = plan.steps[plan.timesteps.index(t)]
        net = plan.denoiser(step)
        if getattr(net, "stateful", False):
            raise DDSMError(f"the schedule's step at timestep {t} ({step.key}) keeps or reuses features of other "
                            "steps: it runs only inside the pipeline's own call")
        eps = net(sample.to(self._device), torch.tensor(t, device=self._device))
        drain = getattr(net, "drain", None)
        if drain is not None:  # a dynamic step keeps what each image executed until sampling reads it
            drain()
        return DenoiserOutput(sample=eps) if return_dict else (eps,)

    def to(self, *args, **kwargs) -> "DDSMDenoiser":
        """Move the supernet (and what its steps run, made again) to a device; return self. Any dtype but
        float32 is refused."""
        device, _ = parse_to(args, dict(kwargs), "DDSMDenoiser.to")
        if device is not None and device != self._device:
            self.model.to(device)
            self._device, self._runtime = device, None
        return self

    def save_pretrained(self, save_directory, *, solver=None, safe_serialization: bool = True, variant=None,
                        **kwargs) -> Path:
        """Write the schedule (under `solver` if given), the files its settings name and the supernet's
        files into `save_directory`, each checked against its hash; return the folder."""
        from ..checkpoint import META, WEIGHTS
        from ..io import sha256_file, write_atomic, write_json_atomic
        from ..schedule import check_against, load_schedule
        from ..space.plugins import families, family_of_setting

        _no_options("DDSMDenoiser.save_pretrained", {"safe_serialization": safe_serialization, "variant": variant,
                                                     **kwargs},
                    {"safe_serialization": (True,), "variant": (None,), "push_to_hub": (False,),
                     "is_main_process": (True,)})
        supernet = self.supernet
        source = Path(supernet.path)
        if not supernet.sha256 or not (source / META).is_file():
            raise DDSMError("this pipeline's supernet is not on disk (made in Python): write it with "
                            "checkpoint.save_supernet first")
        if sha256_file(source / WEIGHTS) != supernet.sha256:
            raise DDSMError(f"{source / WEIGHTS} changed since the pipeline loaded it (its SHA-256 is not the "
                            "loaded supernet's): load the pipeline again")
        out = Path(save_directory)
        target = out / SUPERNET
        names = [META, WEIGHTS] + [a for f in families() for a in f.addons if (source / a).is_file()]
        for name in names:
            try:
                write_atomic(target / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
            except OSError as exc:
                raise DDSMError(f"{source / name} cannot be copied to {target} ({exc.strerror or exc})") from None
        schedule = self.schedule
        if solver is not None and solver != schedule.solver:  # its figures were measured with another solver
            schedule = dataclasses.replace(schedule, solver=solver, extra={})
        settings = {key: family_of_setting(key).copy_files(setting, out) for key, setting in schedule.settings.items()}
        schedule = dataclasses.replace(schedule, settings=settings)
        copied = dataclasses.replace(supernet, path=target.resolve())
        check_against(schedule, copied)
        data = schedule.to_dict(copied, out)
        data["supernet"]["path"] = SUPERNET  # relative to the schedule's folder: the saved folder moves whole
        write_json_atomic(out / SCHEDULE, data)
        load_schedule(out / SCHEDULE, copied)  # what was written reads back against the copy
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device="cpu", backend: str = "torch",
                        **kwargs) -> "DDSMDenoiser":
        """Return the denoiser saved in a folder (schedule.json and its supernet), every file hash-checked.
        diffusers' loader passes its loading options: those that would change what loads are refused."""
        from ..checkpoint import load_supernet
        from ..sampling import resolve_device
        from ..schedule import load_schedule

        for key in ("torch_dtype", "dtype"):
            float32_only(kwargs.pop(key, None), f"loading {pretrained_model_name_or_path}")
        _no_options(f"loading {pretrained_model_name_or_path}", kwargs,
                    {"device_map": (None,), "max_memory": (None,), "offload_folder": (None,), "variant": (None,),
                     "quantization_config": (None,), "use_flashpack": (False,), "use_safetensors": (None, True),
                     "low_cpu_mem_usage": (True, False), "offload_state_dict": (None, True, False),
                     "disable_mmap": (True, False)})
        folder = Path(pretrained_model_name_or_path)
        path = folder / SCHEDULE
        if not path.is_file():
            raise DDSMError(f"{folder} holds no schedule ({SCHEDULE}): not a denoiser saved by "
                            "DDSMPipeline.save_pretrained")
        recorded = load_schedule(path).supernet_path
        if not recorded:
            raise DDSMError(f"schedule {path} names no supernet")
        supernet = load_supernet(folder / recorded, "cpu")  # a relative path: beside the schedule
        denoiser = cls(supernet, load_schedule(path, supernet), backend=backend)
        return denoiser.to(resolve_device(device) if device == "auto" else device)


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
        _no_options(where, kwargs, {"local_files_only": (True, False, None)})
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
            if entry != [DDSMDenoiser.__module__, DDSMDenoiser.__name__]:
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

        _no_options("DDSMPipeline.save_pretrained", {"safe_serialization": safe_serialization, "variant": variant,
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
