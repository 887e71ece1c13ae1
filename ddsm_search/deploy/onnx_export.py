"""Export a schedule as ONNX: one graph per distinct step network, and a manifest that
deploy/onnx_sampler.py runs with numpy and onnxruntime alone.

Each graph is a static subnet (`supernet.model.export(subnet)`; with fine-tuned group weights, its
group's copy) traced by torch's TorchScript-based exporter (`dynamo=False`: the dynamo exporter needs
onnxscript), opset 17. Graph contract: inputs `x` float32 (batch, C, H, W) and `t` float32 (batch,),
one timestep per image; output `eps` float32 (batch, C, H, W); `batch` is dynamic. A multi-stage
U-Net's step runs the decoder of its timestep's stage, so its graphs are per (stage, width).

Every graph is checked before it is kept: onnxruntime's output at every timestep the graph serves
must equal the torch network's, run as the sampler runs it (one scalar timestep for the batch), within
TOLERANCE. Tracing records one path through the network, so a network whose control flow depended
on its inputs would be caught here rather than exported wrong.

The solver goes into the manifest: DDIM and DDPM by name (the sampler writes their update out), every
other solver also as its linear form over the schedule's timesteps (solvers/linear.py: each step's
predicted x0 an affine map of its latent and model output, clipped to [-1, 1] if the solver clips, and
each latent a fixed combination of the initial latent, the x0 predictions so far and the step noises).
The form is checked too: at every step, from the torch run's latents so far, the sampler's numpy
evaluation of it must give the solver's own torch latent and model input within LINEAR_TOLERANCE, on
random latents and step noise with model outputs drawn so that the predicted x0 are twice standard
normal (about 60% of them beyond [-1, 1], so a clipping solver clips at every step, and the rest test
the x0 map). A form that differs is refused in one line.

The output folder is new or empty and written whole or not at all: everything goes into a temporary
folder beside it that is renamed into place at the end. A schedule whose steps decide per image how
much network runs (an early exit's policy) is refused: it is not one static graph per step.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..errors import DDSMError
from .onnx_sampler import (
    CLIPPED,
    FORMAT,
    INPUTS,
    MANIFEST,
    OUTPUT,
    VERSION,
    linear_latent,
    manifest_digest,
    predicted_x0,
)

OPSET = 17
TOLERANCE = 1e-4  # max |onnxruntime - torch| <= TOLERANCE * max(1, max |torch|), at every served timestep
LINEAR_TOLERANCE = 1e-5  # max |linear form in numpy - the solver's torch run| <= LINEAR_TOLERANCE * max(1, max |torch|)


def _check_out(out: Path) -> None:
    """Raise DDSMError unless `out` is absent or an empty folder."""
    if out.exists() and not out.is_dir():
        raise DDSMError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise DDSMError(f"--out {out} exists and is not empty (choose a new folder)")


def _load(schedule_path: Path, supernet, device: str = "cpu"):
    """Return (schedule, supernet) checked against each other; refuse dynamic and stateful steps first."""
    from ..checkpoint import Supernet, load_supernet
    from ..schedule import load_schedule
    from ..space.plugins import family_of_field

    schedule = load_schedule(schedule_path)
    fields = sorted({f for s in schedule.step_keys() for f in s.fields})
    for family in (family_of_field(f) for f in fields):
        if family.dynamic or family.stateful:
            what = ("decides per image how much network runs" if family.dynamic else
                    "keeps or reuses what earlier steps computed")
            raise DDSMError(f"schedule {schedule_path} has steps whose {family.field} (settings.{family.setting}) "
                            f"{what}: it cannot be exported as one static ONNX graph per step; export a schedule "
                            "without it")
    if not isinstance(supernet, Supernet):
        where = supernet if supernet is not None else schedule.supernet_path
        if where is None:
            raise DDSMError(f"schedule {schedule_path} names no supernet (supernet.path); give --supernet DIR")
        try:
            supernet = load_supernet(where, device)
        except DDSMError as exc:
            hint = "" if supernet is not None else " (the schedule's supernet.path; give --supernet DIR if it moved)"
            raise DDSMError(f"{exc}{hint}") from None
    return load_schedule(schedule_path, supernet), supernet


def _graph_plan(schedule, runtime) -> tuple[list[str], dict[str, dict]]:
    """Return (the graph key of each step, {key: its step and the timesteps it serves})."""
    timesteps = schedule.grid(runtime.supernet.config.diffusion.timesteps)
    # a multi-stage U-Net's step runs its timestep's stage: one graph per (stage, width), never a router
    steps = runtime.steps_of(schedule.step_keys(), timesteps)
    keys, plan = [], {}
    for step, t in zip(steps, timesteps):
        name = "_".join([step.subnet.slug, *(f"{f}-{v}" for f, v in step.extras)])
        entry = plan.setdefault(step.key, {"step": step, "file": f"{name}.onnx", "timesteps": []})
        if t not in entry["timesteps"]:
            entry["timesteps"].append(t)
        keys.append(step.key)
    return keys, plan


def _export_graph(net, path: Path, image_shape, t0: int, opset: int) -> None:
    """Trace `net` at timestep t0 into an ONNX file with a dynamic batch axis."""
    import torch

    device = next(net.parameters()).device
    x = torch.randn((2, *image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((2,), float(t0), device=device)
    kwargs = dict(input_names=list(INPUTS), output_names=[OUTPUT], opset_version=opset, do_constant_folding=True,
                  dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, OUTPUT: {0: "batch"}},
                  training=torch.onnx.TrainingMode.EVAL)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the dynamo exporter needs onnxscript; the traced graph is what we check
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the graph is checked below
        torch.onnx.export(net, (x, t), str(path), **kwargs)


def _max_error(path: Path, net, image_shape, timesteps) -> float:
    """Return max |onnxruntime - torch| / max(1, max |torch|) over the served timesteps, on 3 images (a
    batch size other than the traced one), torch run as the sampler runs it."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    x = torch.randn((3, *image_shape), generator=torch.Generator().manual_seed(1))
    worst = 0.0
    device = next(net.parameters()).device
    for t in timesteps:
        with torch.inference_mode(), _full_precision():
            ref = net(x.to(device), torch.tensor(t, device=device)).float().cpu().numpy()
        out = session.run([OUTPUT], {"x": x.numpy(), "t": np.full(3, t, dtype=np.float32)})[0]
        if out.shape != ref.shape:
            return float("inf")
        worst = max(worst, float(np.abs(out - ref).max()) / max(1.0, float(np.abs(ref).max())))
    return worst


@contextlib.contextmanager
def _full_precision():
    """Run CUDA matmuls and convolutions in float32, not TF32, while torch's outputs are compared."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
def _linear_section(solver, noise_schedule, timesteps: list[int], image_shape) -> dict | None:
    """Return the manifest's `linear` section: the solver's linear form, checked (None for DDIM and DDPM)."""
    if solver.name in CLIPPED:
        return None
    from ..solvers.linear import linear_form

    form = linear_form(solver, noise_schedule, timesteps)
    section = {"init_noise_sigma": form.init_noise_sigma, "model_input_scale": list(form.model_input_scale),
               "x0": [list(ab) for ab in form.x0], "clip": form.clip,
               "latent": [list(row) for row in form.latent], "noise_steps": list(form.noise_steps),
               "noise": [list(row) for row in form.noise]}
    error, beyond = _linear_error(section, solver, noise_schedule, timesteps, image_shape)
    if not error <= LINEAR_TOLERANCE:
        raise DDSMError(f"the linear form of solver {solver} differs from its torch run by {error:.3g} (relative; "
                        f"tolerance {LINEAR_TOLERANCE:g}); not exported")
    return {**section, "max_error": error, "check_x0_beyond_1": beyond}


def _linear_error(section: dict, solver, noise_schedule, timesteps: list[int], image_shape) -> tuple[float, float]:
    """Return (max |sampler's evaluation of the linear form - the solver's torch run| / max(1, max |torch|)
    over every step's latent and model input, the fraction of predicted x0 beyond [-1, 1]) on 3 random
    latents with random model outputs and step noise.

    Each step is evaluated from the torch run's own latents so far (a free run would also carry the
    form's rounding through the next steps' x0, which a model output held fixed amplifies by 1 / alpha).
    The model outputs are drawn so that the form's x0 of each step is twice standard normal: a clipping
    solver clips about 60% of them at every step, and the rest test the x0 map (unit-normal outputs
    would leave almost no x0 within [-1, 1] in the noisiest steps).
    """
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(2)
    run = solver.run(noise_schedule, timesteps)
    x = torch.randn((3, *image_shape), generator=g) * run.init_noise_sigma
    start, x0_of, noise_of = x.numpy(), [], []
    worst, beyond, count = 0.0, 0, 0
    for i in range(len(timesteps)):
        latent = x.numpy()
        seen = run.model_input(x, i).numpy()
        a, b = section["x0"][i]
        target = 2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        eps = ((target - a * x.double()) / (b or 1.0)).float()
        z = torch.randn(x.shape, generator=g) if solver.stochastic else None
        x = run.advance(i, eps, x, z)
        beyond += int(np.count_nonzero(np.abs(predicted_x0((a, b), False, latent, eps.numpy())) > 1))
        count += latent.size
        x0_of.append(predicted_x0((a, b), section["clip"], latent, eps.numpy()))
        if i in section["noise_steps"]:
            noise_of.append(z.numpy())
        scaled = section["model_input_scale"][i] * latent  # what the sampler's graph sees at step i
        got = linear_latent(section["latent"][i] + section["noise"][i], [start, *x0_of, *noise_of])
        for mine, ref in ((scaled, seen), (got, x.numpy())):
            if mine.shape != ref.shape:
                return float("inf"), beyond / count
            worst = max(worst, float(np.abs(mine - ref).max()) / max(1.0, float(np.abs(ref).max())))
    return worst, beyond / count


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; return them, outermost first (to remove on failure)."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def export_onnx(schedule_path: str | Path, out_dir: str | Path, supernet=None, *, opset: int = OPSET,
                device: str = "cpu", progress: bool = False) -> tuple[Path, dict]:
    """Return (the folder, its manifest) after writing one ONNX graph per distinct step network of the
    schedule and manifest.json into the new or empty folder `out_dir` (whole, or nothing on failure).

    `supernet`: a loaded Supernet, its folder, or None for the schedule's supernet.path. The torch
    networks are traced and checked against onnxruntime (on the CPU) on `device`, in full float32
    precision (no TF32 on CUDA). `progress`: a bar over the graphs.
    """
    import importlib.util
    import json

    # torch's exporter needs onnx; every graph is checked in onnxruntime before it is kept
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise DDSMError(f"export-onnx needs {' and '.join(missing)} (pip install 'ddsm-search[deploy]')")
    from tqdm.auto import tqdm

    from ..diffusion import NoiseSchedule
    from ..io import sha256_file
    from ..sampling import Runtime, resolve_device

    schedule_path, out = Path(schedule_path), Path(out_dir)
    _check_out(out)
    device = resolve_device(device)
    schedule, supernet = _load(schedule_path, supernet, device)
    runtime = Runtime(supernet, device=device)
    runtime.use(schedule.settings)
    keys, plan = _graph_plan(schedule, runtime)
    diffusion, shape = supernet.config.diffusion, tuple(supernet.image_shape)
    timesteps, noise_schedule = schedule.grid(diffusion.timesteps), NoiseSchedule(diffusion)
    linear = _linear_section(schedule.solver, noise_schedule, timesteps, shape)
    created = _make_parents(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should read like any other folder
        graphs = {}
        for key, entry in tqdm(plan.items(), desc="ONNX graphs", unit="graph", disable=not progress, leave=False):
            net, path = runtime.network(entry["step"]), tmp / entry["file"]
            try:
                _export_graph(net, path, shape, entry["timesteps"][0], opset)
            except Exception as exc:  # the exporter's errors are many kinds; say which network and why
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DDSMError(f"step network {key} could not be exported to ONNX: {first}") from None
            error = _max_error(path, net, shape, entry["timesteps"])
            if not error <= TOLERANCE:
                raise DDSMError(f"the ONNX graph of {key} differs from its torch network by {error:.3g} (relative; "
                                f"tolerance {TOLERANCE:g}) at one of timesteps {entry['timesteps']}; not exported")
            _fsync(path)
            step = entry["step"]
            graphs[key] = {"file": entry["file"], "sha256": sha256_file(path), "subnet": step.subnet.as_dict(),
                           **{f: v if isinstance(v, (int, float)) else str(v) for f, v in step.extras},
                           "timesteps": entry["timesteps"], "flops_per_image": supernet.flops.get(step.subnet),
                           "max_error": error}
        manifest = {
            "format": FORMAT, "version": VERSION,
            "schedule": {"path": str(schedule_path), "sha256": sha256_file(schedule_path)},
            "supernet": {"path": str(supernet.path), "sha256": supernet.sha256, "kind": supernet.config.model.kind},
            "image_shape": list(shape),
            "io": {"inputs": {"x": {"dtype": "float32", "shape": ["batch", *shape]},
                              "t": {"dtype": "float32", "shape": ["batch"]}},
                   "outputs": {OUTPUT: {"dtype": "float32", "shape": ["batch", *shape]}}, "opset": opset},
            "solver": {**schedule.solver.to_json(), "key": schedule.solver.key, "steps": schedule.steps,
                       "timesteps": timesteps},
            **({"linear": linear} if linear is not None else {}),
            "noise_schedule": {"timesteps": diffusion.timesteps, "beta_schedule": diffusion.beta_schedule,
                               "alphas_cumprod": [float(a) for a in noise_schedule.alphas_cumprod]},
            "graphs": graphs,
            "steps": keys,
            "flops_per_image": supernet.schedule_flops(schedule.subnets),
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(tmp / MANIFEST)
        try:
            os.replace(tmp, out)  # onto an absent or empty folder: atomic on POSIX
        except OSError as exc:  # something appeared in it meanwhile
            raise DDSMError(f"could not move the export into {out}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out, manifest
