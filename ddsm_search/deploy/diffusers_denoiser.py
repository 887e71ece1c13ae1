"""The diffusers pipeline's `unet` component: a schedule and its supernet as one diffusers model.

`DDSMDenoiser(supernet, schedule)` is a torch module (a diffusers `ModelMixin` where diffusers imports)
whose parameters are the supernet's; `denoiser(sample, timestep).sample` is the noise predicted by what
the schedule's step at that timestep runs (its subnet, group weights or early exit). It only runs the
schedule's own timesteps, since every step may run another network; a step that keeps or reuses
features of other steps (caching) runs only inside the pipeline's own call.

`save_pretrained(dir)` writes schedule.json (the supernet named by the relative path "supernet" with its
SHA-256), the files its settings name, and supernet/ (meta.json, weights and add-on files, not the train
state); `from_pretrained(dir)` loads them, every file hash-checked. Samples are float32 only.
The pipeline itself (`DDSMPipeline`, its scheduler, model_index.json) is in deploy/diffusers_pipeline.py;
the helpers both use (whether diffusers imports, `to()`'s arguments, loader options) are here.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DDSMError
from ..solvers.schedulers import diffusers_failure


try:
    from diffusers import ConfigMixin, ModelMixin
    DIFFUSERS_ERROR: str | None = None
except Exception as _exc:  # noqa: BLE001 - whatever stops diffusers importing means: the plain pipeline
    DIFFUSERS_ERROR = diffusers_failure(_exc)
    ConfigMixin = ModelMixin = None


DIFFUSERS = DIFFUSERS_ERROR is None

SCHEDULE, SUPERNET = "schedule.json", "supernet"  # in the unet folder: the schedule, the supernet's folder


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


def no_options(where: str, given: dict, allowed: dict) -> None:
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

        no_options("DDSMDenoiser.save_pretrained", {"safe_serialization": safe_serialization, "variant": variant,
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
        no_options(f"loading {pretrained_model_name_or_path}", kwargs,
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
