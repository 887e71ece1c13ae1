"""The deployable pipeline object: a schedule (its subnets, exit policy, group weights) run exactly as
`generate` runs it; saved with save_pretrained and loaded back (by its own from_pretrained and by
diffusers' loader) bit for bit, in a folder that needs nothing outside it; its scheduler component
swapped for another diffusers scheduler runs that solver; what it refuses, it refuses in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddsm_search.checkpoint import in_memory, load_supernet
from ddsm_search.cli.main import main
from ddsm_search.deploy.diffusers_denoiser import DIFFUSERS, DIFFUSERS_ERROR, DDSMDenoiser
from ddsm_search.deploy.diffusers_pipeline import DDSMPipeline
from ddsm_search.errors import DDSMError
from ddsm_search.methods.step_groups.finetune import finetune_schedule
from ddsm_search.sampling import Runtime, generate
from ddsm_search.schedule import Schedule, load_schedule, save_schedule
from ddsm_search.space.subnet import Subnet
from ddsm_search.solvers.base import Solver
from ddsm_search.solvers.schedulers import diffusers_failure
from tests.conftest import tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _expected(supernet, schedule, *, settings: bool = True, **kwargs) -> torch.Tensor:
    """Return generate's images of the schedule (without its settings: its static subnets alone), as the
    pipeline returns them."""
    runtime = Runtime(supernet)
    plan = runtime.plan_schedule(schedule) if settings else runtime.plan(schedule.subnets, solver=schedule.solver)
    images = generate(plan, **kwargs)
    return (images / 2 + 0.5).clamp(0, 1)


ROOT = Path(__file__).resolve().parents[1]


def _one_line(call, match: str) -> DDSMError:
    """Return the DDSMError `call()` raises, checked to match and to be one line."""
    with pytest.raises(DDSMError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)
    return info.value


def _ramp(supernet, path, solver=Solver("ddim", eta=0.5)):
    """Write and return a five-step width ramp for the supernet (DDIM with eta: its step noise too)."""
    subnets = [Subnet.of(width=w) for w in (0.5, 0.5, 0.75, 1.0, 1.0)]
    return save_schedule(path, Schedule(subnets=subnets, solver=solver), supernet)


def _images(pipe, n: int = 3, seed: int = 4) -> torch.Tensor:
    return pipe(batch_size=n, seed=seed, output_type="pt").images


def _python(code: str, tmp_path, hide: str | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter on this worktree's ddsm_search (one thread; diffusers' module cache
    and nothing else in tmp_path; `hide`: a package made unimportable first)."""
    prelude = "import sys, torch\ntorch.set_num_threads(1)\n"
    if hide:
        prelude = f"import sys\nsys.modules[{hide!r}] = None\n" + prelude
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tuned(one_thread, tiny_supernet, tmp_path_factory):
    """A schedule with per-group fine-tuned weights (finetune, two steps) beside it."""
    root = tmp_path_factory.mktemp("tuned")
    supernet = load_supernet(tiny_supernet)
    plain = save_schedule(root / "p.json", Schedule(subnets=[Subnet.of(width=0.5)] * 2 + [Subnet.of(width=1.0)] * 3),
                          supernet)
    return finetune_schedule(plain, tiny_supernet, root / "t.json", steps=2, batch_size=4, lr=1e-3,
                             progress=False).schedule


def test_pipeline_images_equal_generate(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    path = _ramp(supernet, tmp_path / "s.json")
    pipe = DDSMPipeline.from_schedule(path)  # the supernet the schedule recorded
    if DIFFUSERS:
        from diffusers import DiffusionPipeline

        assert isinstance(pipe, DiffusionPipeline)
    schedule = load_schedule(path, supernet)
    out = pipe(batch_size=3, seed=4, output_type="pt")
    assert torch.equal(out.images, _expected(supernet, schedule, n=3, seed=4))
    array = pipe(batch_size=3, seed=4).images
    assert array.shape == (3, *supernet.image_shape[1:], supernet.image_shape[0]) and array.dtype == np.float32
    assert np.array_equal(array, out.images.permute(0, 2, 3, 1).numpy())
    mine = pipe(batch_size=2, generator=torch.Generator().manual_seed(9), output_type="pt", return_dict=False)[0]
    theirs = _expected(supernet, schedule, n=2, seed=0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(mine, theirs) and torch.equal(mine, pipe(batch_size=2, seed=9, output_type="pt").images)
    pil = pipe(batch_size=2, seed=1, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == supernet.image_shape[1:][::-1]
    assert pipe.num_inference_steps == 5 and pipe.device == torch.device("cpu")
    for bad, message in (({"num_inference_steps": 10}, "runs 5 steps"), ({"output_type": "latent"}, "output_type"),
                         ({"seed": 1, "generator": torch.Generator()}, "not both")):
        with pytest.raises(DDSMError, match=message):
            pipe(batch_size=1, **bad)


def test_components_scheduler_and_unet(tiny_supernet, tmp_path):
    """The scheduler is diffusers' DDIMScheduler as tests/test_samplers.py configures it (our DDIM's
    update) on the supernet's betas; the unet's parameters are the supernet's, and calling it runs what the
    schedule's step at that timestep runs."""
    from diffusers import DDIMScheduler

    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(_ramp(supernet, tmp_path / "s.json"))
    scheduler = pipe.scheduler
    assert type(scheduler) is DDIMScheduler and pipe.solver == Solver("ddim", eta=0.5)
    assert scheduler.config.clip_sample and scheduler.config.clip_sample_range == 1.0
    assert scheduler.config.set_alpha_to_one and scheduler.config.prediction_type == "epsilon"
    assert torch.equal(scheduler.betas, pipe.unet.noise_schedule.betas.float())
    assert set(pipe.components) == {"unet", "scheduler"} and pipe.components["unet"] is pipe.unet
    unet = pipe.unet
    assert isinstance(unet, torch.nn.Module) and isinstance(unet, DDSMDenoiser)
    assert {id(p) for p in unet.parameters()} == {id(p) for p in pipe.supernet.model.parameters()}
    assert unet.config.sample_size == 8 and unet.config.in_channels == 1 and unet.config.timesteps == [99, 74, 50,
                                                                                                     25, 0]
    x = torch.randn(2, *supernet.image_shape, generator=torch.Generator().manual_seed(0))
    plan = pipe.plan
    with torch.no_grad():
        for i, t in enumerate(plan.timesteps):
            eps = unet(x, t).sample
            assert torch.equal(eps, plan.denoiser(plan.steps[i])(x, torch.tensor(t)))
        assert torch.equal(unet(x, torch.tensor([50, 50]), return_dict=False)[0], unet(x, 50).sample)
    _one_line(lambda: unet(x, 7), "not one of the schedule's")
    _one_line(lambda: unet(x, torch.tensor([99, 74])), "one timestep per call")
    # another unet: its schedule's solver (and scheduler) unless a scheduler was chosen, which stays
    other = load_schedule(_ramp(supernet, tmp_path / "o.json", Solver("dpmsolver++", order=3)), supernet)
    pipe.unet = DDSMDenoiser(supernet, other)
    assert pipe.solver == Solver("dpmsolver++", order=3) and pipe.scheduler.config.solver_order == 3
    assert torch.equal(_images(pipe, n=2), _expected(supernet, other, n=2, seed=4))
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    pipe.unet = unet
    assert pipe.solver == Solver("ddim", eta=0.5) and pipe.scheduler.config.clip_sample
    _one_line(lambda: setattr(pipe, "unet", supernet.model), "must be a DDSMDenoiser")


def test_save_pretrained_round_trip(tiny_supernet, tmp_path):
    """save_pretrained writes a folder with nothing outside it (moved elsewhere, it loads), and
    from_pretrained gives the same images, bit for bit."""
    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(_ramp(supernet, tmp_path / "s.json"))
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    folder = Path(shutil.move(tmp_path / "saved", tmp_path / "moved"))  # relative paths only
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["model_index.json", "pipeline.py", "scheduler/scheduler_config.json", "unet/schedule.json",
                     "unet/supernet/meta.json", "unet/supernet/supernet.safetensors"], files  # no train state
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "DDSMPipeline"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["unet"] == ["ddsm_search.deploy.diffusers_denoiser", "DDSMDenoiser"]
    recorded = json.loads((folder / "unet" / "schedule.json").read_text())
    assert recorded["supernet"] == {"path": "supernet", "sha256": supernet.sha256}
    assert recorded["solver"] == {"name": "ddim", "eta": 0.5}
    loaded = DDSMPipeline.from_pretrained(folder)
    assert torch.equal(_images(loaded), expected)
    assert loaded.solver == pipe.solver and type(loaded.scheduler) is type(pipe.scheduler)
    loaded.save_pretrained(folder)  # again, onto itself: the same folder
    assert torch.equal(_images(DDSMPipeline.from_pretrained(folder)), expected)
    # a folder saved before the denoiser had its own module names the pipeline's module: it still loads
    index["unet"] = ["ddsm_search.deploy.diffusers_pipeline", "DDSMDenoiser"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert torch.equal(_images(DDSMPipeline.from_pretrained(folder)), expected)
    index["unet"] = ["ddsm_search.deploy.export", "DDSMDenoiser"]
    (folder / "model_index.json").write_text(json.dumps(index))
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "is not a DDSMDenoiser")


def test_round_trip_with_group_weights(tuned, tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(tuned, tiny_supernet)
    expected = _images(pipe, seed=2)
    assert torch.equal(expected, _expected(supernet, load_schedule(tuned, supernet), n=3, seed=2))
    pipe.save_pretrained(tmp_path / "saved")
    folder = Path(shutil.move(tmp_path / "saved", tmp_path / "moved"))
    written = json.loads((folder / "unet" / "schedule.json").read_text())["settings"]["weights"]
    weights = pipe.schedule.settings["weights"]
    assert written["file"] == weights.path.name and written["sha256"] == weights.sha256  # beside the schedule
    assert (folder / "unet" / written["file"]).read_bytes() == weights.path.read_bytes()
    assert torch.equal(_images(DDSMPipeline.from_pretrained(folder), seed=2), expected)


def test_pipeline_runs_group_weights(tuned, tiny_supernet):
    supernet = load_supernet(tiny_supernet)
    schedule = load_schedule(tuned, supernet)
    images = DDSMPipeline.from_schedule(tuned, tiny_supernet)(batch_size=3, seed=2, output_type="pt").images
    assert torch.equal(images, _expected(supernet, schedule, n=3, seed=2))
    assert not torch.equal(images, _expected(supernet, schedule, settings=False, n=3, seed=2))


def test_pipeline_runs_exit_policy(tmp_path):
    data = tiny_dict()
    data["model"] = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
                     "widths": [1.0, 0.5], "depths": [4, 2]}
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(data))
    net = tmp_path / "net"
    common = ["--quiet", "--device", "cpu"]
    assert main(["train", str(tmp_path / "dit.yaml"), "--out", str(net), "--train-steps", "2", *common]) == 0
    assert main(["finetune-exit", str(net), "--train-steps", "2", "--batch-size", "4", *common]) == 0
    supernet = load_supernet(net)
    path = tmp_path / "exit.json"
    path.write_text(json.dumps({"subnets": [{"width": 1.0}] * 5, "settings": {"exit": {"threshold": 0.0}}}))
    schedule = load_schedule(path, supernet)
    pipe = DDSMPipeline.from_schedule(path, net)
    images = pipe(batch_size=3, seed=5, output_type="pt").images
    expected = _expected(supernet, schedule, n=3, seed=5)  # its plan: the exit policy with the heads beside it
    assert torch.equal(images, expected)
    static = _expected(supernet, schedule, settings=False, n=3, seed=5)
    assert not torch.equal(images, static), "threshold 0: every image leaves at the smallest depth"
    # saved: the exit heads go with the supernet's files, and the policy runs from the folder alone
    pipe.save_pretrained(tmp_path / "saved")
    shutil.rmtree(net)
    supernet_files = {p.name for p in (tmp_path / "saved" / "unet" / "supernet").iterdir()}
    assert {"exit_heads.safetensors", "exit_heads.json", "meta.json", "supernet.safetensors"} <= supernet_files
    assert torch.equal(_images(DDSMPipeline.from_pretrained(tmp_path / "saved"), seed=5), expected)


def test_diffusers_loader_gives_the_same_images(tiny_supernet, tmp_path):
    """DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), and with custom_pipeline=folder,
    load a saved pipeline (through its pipeline.py) as DDSMPipeline with the same images (in a fresh
    interpreter: diffusers' module cache in tmp_path); float16 is refused in one line there too."""
    if not DIFFUSERS:
        pytest.skip(f"diffusers' DiffusionPipeline does not import here: {DIFFUSERS_ERROR}")
    from diffusers import UniPCMultistepScheduler

    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(_ramp(supernet, tmp_path / "s.json"))
    pipe.save_pretrained(tmp_path / "ddim")
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "unipc")
    code = """
from diffusers import DiffusionPipeline
from ddsm_search.errors import DDSMError
out = {}
for name in ("ddim", "unipc"):
    pipe = DiffusionPipeline.from_pretrained(name, trust_remote_code=True)
    assert type(pipe).__name__ == "DDSMPipeline" and isinstance(pipe, DiffusionPipeline), type(pipe)
    out[name] = pipe(batch_size=3, seed=4, output_type="pt").images
    again = DiffusionPipeline.from_pretrained(name, custom_pipeline=name, trust_remote_code=True)
    assert torch.equal(again(batch_size=3, seed=4, output_type="pt").images, out[name])
    out[name + " scheduler"] = type(pipe.scheduler).__name__
try:
    DiffusionPipeline.from_pretrained("ddim", trust_remote_code=True, torch_dtype=torch.float16)
except DDSMError as exc:
    out["float16"] = str(exc)
torch.save(out, "images.pt")
"""
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "images.pt")
    assert out["ddim scheduler"] == "DDIMScheduler" and out["unipc scheduler"] == "UniPCMultistepScheduler"
    assert torch.equal(out["unipc"], _images(pipe))
    pipe.scheduler = None  # back to the schedule's own solver
    assert torch.equal(out["ddim"], _images(pipe))
    assert "float32 only" in out["float16"] and "\n" not in out["float16"]


def test_swapped_scheduler_runs_its_solver(tiny_supernet, tmp_path):
    """A diffusers scheduler put in the pipeline runs as the solver it maps to, on the schedule's timesteps:
    UniPC equals generate with Solver('unipc'); saved and loaded, it stays."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    supernet = load_supernet(tiny_supernet)
    path = _ramp(supernet, tmp_path / "s.json")
    schedule = load_schedule(path, supernet)
    pipe = DDSMPipeline.from_schedule(path)
    config = pipe.scheduler.config
    pipe.scheduler = UniPCMultistepScheduler.from_config(config)
    # the DDIM config has thresholding off: the multistep solvers' clip is off too
    assert pipe.solver == Solver("unipc", clip=False)
    runtime = Runtime(supernet)
    unipc = runtime.plan(schedule.step_keys(), solver=Solver("unipc", clip=False), timesteps=schedule.grid(100))
    expected = (generate(unipc, n=3, seed=4) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(_images(pipe), expected)
    assert not torch.equal(expected, _expected(supernet, schedule, n=3, seed=4))
    pipe.save_pretrained(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "unet" / "schedule.json").read_text())
    assert recorded["solver"] == {"name": "unipc", "order": 2, "clip": False}
    assert recorded["timesteps"] == schedule.grid(100)
    loaded = DDSMPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded.scheduler) is UniPCMultistepScheduler and torch.equal(_images(loaded), expected)
    # each scheduler as the solver it maps to
    for scheduler, solver in (
            (UniPCMultistepScheduler.from_config(config, solver_order=3), Solver("unipc", order=3, clip=False)),
            (UniPCMultistepScheduler.from_config(config, thresholding=True), Solver("unipc")),
            (DPMSolverMultistepScheduler.from_config(config), Solver("dpmsolver++", clip=False)),
            (DPMSolverMultistepScheduler.from_config(config, solver_order=3, thresholding=True),
             Solver("dpmsolver++", order=3)),
            (DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++"),
             Solver("sde-dpmsolver++", clip=False)),
            (EulerDiscreteScheduler.from_config(config), Solver("euler")),
            (DDPMScheduler.from_config(config), Solver("ddpm")),
            (DDIMScheduler.from_config(config), Solver("ddim", eta=0.5))):  # DDIM's eta: the schedule's
        pipe.scheduler = scheduler
        assert pipe.solver == solver and pipe.plan.solver == solver, (scheduler, solver)
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    euler = runtime.plan(schedule.step_keys(), solver=Solver("euler"), timesteps=schedule.grid(100))
    assert torch.equal(_images(pipe, n=2), (generate(euler, n=2, seed=4) / 2 + 0.5).clamp(0, 1))


def test_pipeline_without_diffusers(tiny_supernet, tmp_path):
    """Where diffusers does not import, DDSMPipeline is a plain object with the same calls: it loads a saved
    folder (the schedule's solver runs: the one its scheduler maps to) and saves one diffusers' side loads,
    with the same images; a DiffusionPipeline method is refused in one line saying why."""
    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(_ramp(supernet, tmp_path / "s.json"))
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    code = """
from ddsm_search.deploy import diffusers_pipeline as dp
assert not dp.DIFFUSERS and "diffusers is not installed" in dp.DIFFUSERS_ERROR, dp.DIFFUSERS_ERROR
pipe = dp.DDSMPipeline.from_pretrained("saved")
assert pipe.scheduler is None and str(pipe.solver) == "ddim(eta=0.5)"
out = {"images": pipe(batch_size=3, seed=4, output_type="pt").images}
try:
    pipe.enable_model_cpu_offload()
except dp.DDSMError as exc:
    out["error"] = str(exc)
assert not hasattr(pipe, "hf_device_map")
pipe.save_pretrained("plain")
torch.save(out, "plain.pt")
"""
    done = _python(code, tmp_path, hide="diffusers")
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "plain.pt")
    assert torch.equal(out["images"], expected)
    assert "enable_model_cpu_offload" in out["error"] and "diffusers is not installed" in out["error"]
    assert "\n" not in out["error"]
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert index["scheduler"] == [None, None] and not (tmp_path / "plain" / "scheduler").exists()
    loaded = DDSMPipeline.from_pretrained(tmp_path / "plain")  # the schedule's solver, its scheduler built here
    assert loaded.solver == Solver("ddim", eta=0.5) and torch.equal(_images(loaded), expected)


def test_bad_inputs_one_line(tiny_supernet, tuned, tmp_path):
    """A folder without a schedule or an index, a changed weights file, an unknown scheduler or one with an
    option no solver has, float16: each refused with one line (DDSMError)."""
    from diffusers import DDIMScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler

    supernet = load_supernet(tiny_supernet)
    pipe = DDSMPipeline.from_schedule(tuned, tiny_supernet)
    saved = pipe.save_pretrained(tmp_path / "saved")

    def broken(name: str, change) -> Path:
        folder = Path(shutil.copytree(saved, tmp_path / name))
        change(folder)
        return folder

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))

    folder = broken("no-schedule", lambda f: (f / "unet" / "schedule.json").unlink())
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "holds no schedule")
    folder = broken("no-index", lambda f: (f / "model_index.json").unlink())
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "not a saved DDSMPipeline")
    _one_line(lambda: DDSMPipeline.from_pretrained(tmp_path / "nowhere"), "not found")
    folder = broken("weights", lambda f: flip(f / "unet" / "supernet" / "supernet.safetensors"))
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "does not match the hash")
    weights = json.loads((saved / "unet" / "schedule.json").read_text())["settings"]["weights"]["file"]
    folder = broken("group-weights", lambda f: flip(f / "unet" / weights))
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "does not match its sha256")
    folder = broken("no-supernet", lambda f: shutil.rmtree(f / "unet" / "supernet"))
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "supernet directory not found")

    def lms(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "LMSDiscreteScheduler"]
        (folder / "model_index.json").write_text(json.dumps(index))

    folder = broken("lms", lms)
    _one_line(lambda: DDSMPipeline.from_pretrained(folder), "LMSDiscreteScheduler has no solver")
    config = pipe.scheduler.config
    _one_line(lambda: setattr(pipe, "scheduler", LMSDiscreteScheduler.from_config(config)),
              "scheduler LMSDiscreteScheduler has no solver")
    _one_line(lambda: setattr(pipe, "scheduler", UniPCMultistepScheduler.from_config(config, solver_type="bh1")),
              r"UniPCMultistepScheduler\(solver_type='bh1'\) is not supported")
    _one_line(lambda: setattr(pipe, "scheduler", DDIMScheduler.from_config(config, clip_sample=False)),
              r"DDIMScheduler\(clip_sample=False\)")
    _one_line(lambda: setattr(pipe, "scheduler", UniPCMultistepScheduler.from_config(config, solver_order=4)),
              "order must be")
    _one_line(lambda: setattr(pipe, "scheduler", DDIMScheduler(num_train_timesteps=100,
                                                               beta_schedule="squaredcos_cap_v2")),
              "betas are not the supernet's")
    _one_line(lambda: setattr(pipe, "scheduler", DDIMScheduler(num_train_timesteps=1000)), "num_train_timesteps")
    assert pipe.solver == Solver("ddim"), "a refused scheduler leaves the pipeline as it was"
    _one_line(lambda: pipe.to(torch.float16), "float32 only")
    _one_line(lambda: pipe.to("cpu", torch.bfloat16), "float32 only")
    _one_line(lambda: pipe.unet.to(dtype=torch.float16), "float32 only")
    _one_line(lambda: DDSMPipeline.from_pretrained(saved, torch_dtype=torch.float16), "float32 only")
    _one_line(lambda: pipe.to("meta"), "cpu or cuda")
    if not torch.cuda.is_available():
        _one_line(lambda: pipe.to("cuda"), "no CUDA device")
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe and pipe.device == torch.device("cpu")
    _one_line(lambda: pipe.save_pretrained(tmp_path / "x", safe_serialization=False), "safe_serialization")
    _one_line(lambda: pipe.save_pretrained(tmp_path / "x", push_to_hub=True), "push_to_hub")
    _one_line(lambda: DDSMPipeline.from_pretrained(saved, device_map="auto"), "unknown option device_map")
    made = DDSMDenoiser(in_memory(supernet.config, supernet.model), Schedule(subnets=[Subnet.of(width=1.0)] * 2))
    _one_line(lambda: DDSMPipeline(made).save_pretrained(tmp_path / "x"), "not on disk")
    assert torch.equal(_images(pipe, seed=2), _expected(supernet, load_schedule(tuned, supernet), n=3, seed=2))


def test_why_diffusers_does_not_import_is_one_line():
    """The reason the plain pipeline stands in for diffusers' is one line: not installed, or the cause
    diffusers wraps (a torchvision for another torch, as on a CPU-only torch)."""
    missing = ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    assert diffusers_failure(missing) == "diffusers is not installed (pip install 'ddsm-search[diffusers]')"
    wrapped = RuntimeError("Failed to import diffusers.pipelines.pipeline_utils because of the following error (look "
                           "up to see its traceback):\nFailed to import ...autoencoder_kl because of the following "
                           "error (look up to see its traceback):\noperator torchvision::nms does not exist")
    why = diffusers_failure(wrapped)
    assert why.startswith("diffusers does not import: operator torchvision::nms does not exist (a torchvision built")
    assert "\n" not in why


def test_pipeline_runs_cached_steps_and_round_trips_them(tiny_supernet, tmp_path):
    """A schedule with feature caching: the pipeline's images are generate's, save_pretrained keeps the
    caching, and the unet refuses to run a cached step alone (it needs an earlier step's features)."""
    from ddsm_search.space.steps import Step

    supernet = load_supernet(tiny_supernet)
    full = supernet.model.full
    values = ["keep2", "reuse2", "reuse2", "keep2", "reuse2"]
    steps = [Step.of(full, cache=v) for v in values]
    path = save_schedule(tmp_path / "cached.json", Schedule.from_steps(steps, solver=Solver("unipc")), supernet)
    pipe = DDSMPipeline.from_schedule(path, backend="torch")
    expected = generate(Runtime(supernet, backend="torch").plan(steps, solver="unipc"), n=3, seed=4)
    expected = (expected / 2 + 0.5).clamp(0, 1)  # as the pipeline returns them
    assert torch.equal(_images(pipe), expected)
    pipe.save_pretrained(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "unet" / "schedule.json").read_text())
    assert recorded["settings"] == {"cache": {"steps": values}}
    assert torch.equal(_images(DDSMPipeline.from_pretrained(tmp_path / "saved")), expected)
    x = torch.randn(2, *supernet.image_shape)
    _one_line(lambda: pipe.unet(x, pipe.plan.timesteps[1]), "keeps or reuses features of other steps")
