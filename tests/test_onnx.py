"""ONNX export of a schedule (deploy/onnx_export.py) and the numpy + onnxruntime sampler
(deploy/onnx_sampler.py): graphs equal their torch subnets, whole schedules equal `generate` on the
same noise under every solver (DDIM eta 0 and 0.5, DDPM, DPM-Solver++ 2M/3M and SDE, UniPC 2 and 3,
clipped or not, Euler; group weights) with clipping seen to happen, a solver's linear form equals its
torch run, version-1 and version-2 manifests load and sample, tampering and bad inputs are refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ddsm_search.checkpoint import load_supernet  # noqa: E402
from ddsm_search.cli.main import main  # noqa: E402
from ddsm_search.deploy import onnx_export, onnx_sampler  # noqa: E402
from ddsm_search.deploy.onnx_export import export_onnx  # noqa: E402
from ddsm_search.deploy.onnx_sampler import OnnxSampler, linear_latent, manifest_digest, predicted_x0  # noqa: E402
from ddsm_search.diffusion import NoiseSchedule, sampling_timesteps  # noqa: E402
from ddsm_search.errors import DDSMError  # noqa: E402
from ddsm_search.methods.step_groups.weights import GroupWeights, WeightGroup  # noqa: E402
from ddsm_search.sampling import (
    Runtime,  # noqa: E402
    generate,  # noqa: E402
)
from ddsm_search.schedule import Schedule, save_schedule  # noqa: E402
from ddsm_search.solvers.base import Solver, timesteps_for  # noqa: E402
from ddsm_search.solvers.linear import linear_form  # noqa: E402
from tests.conftest import tiny_dict  # noqa: E402
from tests.test_exit_stage import TINY_DIT  # noqa: E402

REL = 1e-4  # graph against its torch subnet: max |diff| <= REL * max |torch|
IMAGES = 2e-4  # a whole schedule's images in [-1, 1] (errors of the steps add up)
SOLVER_IMAGES = 1e-5  # max |ONNX - generate| of a whole schedule under each solver, absolute (issue 26)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _draws(seed: int, n: int, shape, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (initial noise, one noise per step but the last) as `generate` draws them from its seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    z = [torch.randn((n, *shape), generator=g) for _ in range(steps - 1)]
    return x.numpy(), np.stack([v.numpy() for v in z])


def _close(got: np.ndarray, ref: np.ndarray, rel: float) -> float:
    assert got.shape == ref.shape and got.dtype == np.float32
    err = float(np.abs(got - ref).max())
    assert err <= rel * max(1.0, float(np.abs(ref).max())), err
    return err


def _graph_matches_subnet(folder: Path, supernet, key: str, n: int = 4) -> None:
    """Check one graph against the torch static subnet it came from, at every timestep it serves."""
    import onnxruntime as ort

    entry = json.loads((folder / "manifest.json").read_text())["graphs"][key]
    session = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
    net = supernet.model.export(supernet.model.check_subnet(entry["subnet"])).eval()
    x = torch.randn((n, *supernet.image_shape), generator=torch.Generator().manual_seed(7))
    for t in entry["timesteps"]:
        with torch.inference_mode():
            ref = net(x, torch.full((n,), t)).numpy()
        assert float(np.abs(ref).max()) > 1e-2, "a network that predicts ~0 would test nothing"
        out = session.run(["eps"], {"x": x.numpy(), "t": np.full(n, t, np.float32)})[0]
        assert float(np.abs(out - ref).max()) <= REL * float(np.abs(ref).max()), (key, t)


@pytest.fixture(scope="module")
def unet(tiny_supernet, tmp_path_factory):
    """The tiny U-Net's schedule of three widths exported once: (supernet, subnets, schedule file, folder)."""
    root = tmp_path_factory.mktemp("onnx-unet")
    supernet = load_supernet(tiny_supernet)
    subnets = [supernet.model.check_subnet(w) for w in (1.0, 0.5, 0.5, 0.75, 1.0)]
    path = save_schedule(root / "schedule.json", Schedule(subnets=subnets), supernet)
    folder, _ = export_onnx(path, root / "onnx")
    return supernet, subnets, path, folder


def test_unet_export_graphs_equal_subnets_and_manifest(unet):
    supernet, subnets, path, folder = unet
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "width-1.0.onnx", "width-0.5.onnx",
                                                               "width-0.75.onnx"]), "one graph per distinct subnet"
    assert manifest["format"] == "ddsm-search/onnx" and manifest["version"] == 3
    assert manifest["steps"] == [s.key for s in subnets]
    assert manifest["solver"] == {"name": "ddim", "eta": 0.0, "key": "ddim", "steps": 5,
                                  "timesteps": sampling_timesteps(supernet.config.diffusion.timesteps, 5)}
    assert "linear" not in manifest and "sampler" not in manifest, "DDIM runs the sampler's own update"
    assert manifest["supernet"]["sha256"] == supernet.sha256
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)
    assert np.allclose(manifest["noise_schedule"]["alphas_cumprod"], abar.numpy(), rtol=1e-12)
    for key, graph in manifest["graphs"].items():
        assert hashlib.sha256((folder / graph["file"]).read_bytes()).hexdigest() == graph["sha256"]
        _graph_matches_subnet(folder, supernet, key)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_unet_schedule_images_equal_generate(unet):
    supernet, subnets, _, folder = unet
    n = 9  # odd: two sessions take 4 and 5 images
    noise, _ = _draws(3, n, supernet.image_shape, len(subnets))
    ref = generate(Runtime(supernet).plan(subnets, solver="ddim"), n=n, seed=3).numpy()
    for sessions, batch_size in ((1, None), (2, None), (2, 2)):
        got = OnnxSampler(folder, sessions=sessions).sample(n, noise=noise, batch_size=batch_size)
        _close(got, ref, IMAGES)
        assert got.min() >= -1 and got.max() <= 1
    seeded = OnnxSampler(folder)
    assert np.array_equal(seeded.sample(3, seed=5), seeded.sample(3, seed=5)), "a seed gives the same images"


# (solver, spacing): every solver, clipped (the default) and not, two of them on diffusers' trailing grid
# (explicit timesteps, not T-1 .. 0)
SOLVERS = [("ddim", "uniform"), ("ddim(eta=0.5)", "uniform"), ("ddpm", "uniform"), ("dpmsolver++", "uniform"),
           ("dpmsolver++(order=3)", "uniform"), ("sde-dpmsolver++", "uniform"), ("unipc", "uniform"),
           ("unipc(order=3)", "trailing"), ("euler", "uniform"), ("euler", "trailing"),
           ("dpmsolver++(clip=False)", "uniform"), ("unipc(clip=False)", "uniform")]
WIDTHS = (1.0, 0.5, 0.5, 0.75, 1.0, 0.5, 0.75)  # a mixed schedule: three widths, 7 steps (3rd order runs twice)


@pytest.fixture(scope="module")
def exports(tiny_supernet, tmp_path_factory):
    """Export the mixed schedule under a solver once per module: exports(text, spacing) -> (schedule, folder)."""
    root = tmp_path_factory.mktemp("onnx-solvers")
    supernet = load_supernet(tiny_supernet)
    done = {}

    def export(text: str, spacing: str = "uniform"):
        if (text, spacing) not in done:
            subnets = [supernet.model.check_subnet(w) for w in WIDTHS]
            timesteps = timesteps_for(supernet.config.diffusion.timesteps, len(subnets), spacing)
            schedule = Schedule(subnets=subnets, solver=Solver.parse(text), timesteps=timesteps)
            name = f"{text}-{spacing}".replace("(", "-").replace(")", "").replace("=", "")
            path = save_schedule(root / f"{name}.json", schedule, supernet)
            done[text, spacing] = schedule, export_onnx(path, root / name, supernet=supernet)[0]
        return done[text, spacing]

    return supernet, export


def _x0_spy(monkeypatch) -> list[tuple[float, bool]]:
    """Record (max |x0| before clipping, clip) of every call of the ONNX sampler's x0 prediction."""
    seen, real = [], onnx_sampler.predicted_x0

    def spy(coefficients, clip, x, eps):
        a, b = coefficients
        seen.append((float(np.abs(a * x.astype(np.float64) + b * eps.astype(np.float64)).max()), clip))
        return real(coefficients, clip, x, eps)

    monkeypatch.setattr(onnx_sampler, "predicted_x0", spy)
    return seen


@pytest.mark.parametrize("text,spacing", SOLVERS)
def test_every_solver_equals_generate_on_the_same_noise(exports, text, spacing, monkeypatch):
    supernet, export = exports
    schedule, folder = export(text, spacing)
    manifest = json.loads((folder / "manifest.json").read_text())
    solver = Solver.parse(text)
    assert manifest["solver"] == {**solver.to_json(), "key": solver.key, "steps": len(WIDTHS),
                                  "timesteps": schedule.timesteps}
    linear = solver.name not in ("ddim", "ddpm")
    assert ("linear" in manifest) == linear
    if linear:
        assert manifest["linear"]["clip"] == solver.clip and len(manifest["linear"]["x0"]) == len(WIDTHS)
        assert 0.4 < manifest["linear"]["check_x0_beyond_1"] < 0.8, "the export's check clipped some x0, not all"
    n = 5  # two sessions take 2 and 3 images
    noise, step_noise = _draws(11, n, supernet.image_shape, len(WIDTHS))
    ref = generate(Runtime(supernet).plan_schedule(schedule), n=n, seed=11).numpy()
    sampler = OnnxSampler(folder, sessions=2)
    assert sampler.stochastic == solver.stochastic
    assert sampler.noise_steps == (list(range(len(WIDTHS) - 1)) if solver.stochastic else [])
    x0 = _x0_spy(monkeypatch)
    for kwargs in ({}, {"batch_size": 2}):
        got = sampler.sample(n, noise=noise, step_noise=step_noise if solver.stochastic else None, **kwargs)
        assert got.shape == ref.shape and got.dtype == np.float32
        err = float(np.abs(got - ref).max())
        print(f"{text} {spacing}: max |onnx - torch| = {err:.2e}")
        assert err <= SOLVER_IMAGES, (text, spacing, err)
    assert len(x0) == (2 * 2 * len(WIDTHS) if linear else 0), "one x0 per step and session"
    assert all(clip == solver.clip for _, clip in x0)
    if solver.clip:  # the clipped path runs: some x0 lay beyond [-1, 1] before it was clipped
        assert got.min() >= -1 and got.max() <= 1
        if linear:
            assert max(m for m, _ in x0) > 1.5, x0
    if solver.stochastic:
        other = generate(Runtime(supernet).plan_schedule(schedule), n=n, seed=12).numpy()
        assert np.abs(other - ref).max() > 1e-2, "the step noise changes the images: it is tested"
        got = sampler.sample(n, noise=noise, step_noise=lambda i: step_noise[i])
        assert float(np.abs(got - ref).max()) <= SOLVER_IMAGES
        with pytest.raises(DDSMError, match=r"step_noise holds 2 steps' noise, but step 2 needs one \(6 steps draw"):
            sampler.sample(n, noise=noise, step_noise=step_noise[:2])
    with pytest.raises(DDSMError, match=r"noise has shape \(2, 1, 8, 8\), expected \(5, 1, 8, 8\)"):
        sampler.sample(n, noise=noise[:2])


LINEAR = ("dpmsolver++", "dpmsolver++(order=3)", "sde-dpmsolver++", "unipc", "unipc(order=3)", "euler",
          "dpmsolver++(clip=False)", "unipc(clip=False)", "sde-dpmsolver++(clip=False)")


def _noise_schedule(T: int) -> NoiseSchedule:
    from ddsm_search.config import config_from_dict

    return NoiseSchedule(config_from_dict(tiny_dict(diffusion={"timesteps": T})).diffusion)


def _evaluate(form, clip: bool, start: np.ndarray, eps_of: list, noise_of: list) -> tuple[list, list]:
    """Return (the latents after each step, the x0 before any clipping of each step) of a form evaluated
    by the sampler's numpy code on its own latents, as it samples, with `clip` in place of its own."""
    latent, latents, x0_of, unclipped = start, [], [], []
    for i, eps in enumerate(eps_of):
        unclipped.append(predicted_x0(form.x0[i], False, latent, eps))
        x0_of.append(predicted_x0(form.x0[i], clip, latent, eps))
        noises = [z for k, z in zip(form.noise_steps, noise_of) if k <= i]
        latent = linear_latent(form.latent[i] + form.noise[i], [start, *x0_of, *noises])
        latents.append(latent)
    return latents, unclipped


@pytest.mark.parametrize("T,spacing", [(100, "uniform"), (1000, "uniform"), (1000, "trailing"), (1000, "leading")])
def test_linear_form_reproduces_the_torch_run_on_random_inputs(T, spacing):
    """The coefficients read off one-hot runs, evaluated by the sampler's numpy code, against the solver's
    own torch run (float32, as `generate` runs it, clipping as it clips) on random latents, model outputs
    and step noise; the same form with its clip flipped, or one coefficient off by 1e-4, is seen."""
    schedule = _noise_schedule(T)
    timesteps = timesteps_for(T, 9, spacing)
    for text in LINEAR:
        solver = Solver.parse(text)
        form = linear_form(solver, schedule, timesteps)
        assert form.clip == solver.clip and len(form.x0) == len(timesteps)
        g = torch.Generator().manual_seed(5)
        run = solver.run(schedule, timesteps)
        x = torch.randn((4, 3, 4, 4), generator=g) * run.init_noise_sigma
        assert form.init_noise_sigma == run.init_noise_sigma
        start, eps_of, noise_of, ref = x.numpy(), [], [], []
        for i in range(len(timesteps)):
            seen = run.model_input(x, i).numpy()
            assert np.allclose(form.model_input_scale[i] * x.numpy(), seen, rtol=1e-6, atol=0), (text, i)
            eps = torch.randn(x.shape, generator=g)
            z = torch.randn(x.shape, generator=g) if solver.stochastic else None
            x = run.advance(i, eps, x, z)  # what `step` does with the noise it draws
            eps_of.append(eps.numpy())
            if i in form.noise_steps:
                noise_of.append(z.numpy())
            ref.append(x.numpy())

        def error(latents) -> float:
            return max(float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())) for a, b in zip(latents, ref))

        latents, unclipped = _evaluate(form, form.clip, start, eps_of, noise_of)
        worst, flipped = error(latents), error(_evaluate(form, not form.clip, start, eps_of, noise_of)[0])
        beyond = [float(np.mean(np.abs(v) > 1)) for v in unclipped]
        print(f"{text} T={T} {spacing}: {worst:.2e} (clip flipped: {flipped:.2g}); x0 beyond [-1, 1]: "
              f"{min(beyond):.2f} .. {max(beyond):.2f} of each step's")
        assert float(x.abs().max()) > 0.5, "the run moved somewhere"
        assert worst <= 2e-6, (text, T, spacing, worst)
        assert flipped > 1e-2, "the clip (or its absence) matters on these inputs"
        if form.clip:  # clipping happens at every step, and not to every x0
            assert min(beyond) > 0.2 and min(beyond) < 0.8, beyond
            assert float(x.abs().max()) <= 1, "a clipping solver's last latent is its clipped x0"
        row = list(form.latent[-1] + form.noise[-1])
        k = int(np.argmax(np.abs(row)))
        row[k] *= 1 + 1e-4  # one coefficient off by 1e-4 relative: the comparison above would see it
        arrays = [start, *(predicted_x0(form.x0[i], form.clip, latents[i - 1] if i else start, eps_of[i])
                           for i in range(len(timesteps))), *noise_of]
        assert error(latents[:-1] + [linear_latent(row, arrays)]) > 1e-5
        assert form.noise_steps == (tuple(range(len(timesteps) - 1)) if solver.stochastic else ())


def test_export_check_exercises_clipping_and_sees_a_wrong_form():
    """export-onnx's check of a form (onnx_export._linear_error) clips about 60% of the x0 at every step,
    and sees a form whose clip, x0 map or latent row is wrong."""
    schedule, shape = _noise_schedule(1000), (3, 8, 8)
    timesteps = timesteps_for(1000, 20, "uniform")
    for text in ("dpmsolver++", "unipc(order=3)", "sde-dpmsolver++", "euler", "unipc(clip=False)"):
        solver = Solver.parse(text)
        section = onnx_export._linear_section(solver, schedule, timesteps, shape)
        assert section["max_error"] <= 2e-6 and 0.5 < section["check_x0_beyond_1"] < 0.7, (text, section)
        body = {k: v for k, v in section.items() if k not in ("max_error", "check_x0_beyond_1")}
        wrong = [json.loads(json.dumps(body)) for _ in range(3)]
        wrong[0]["clip"] = not wrong[0]["clip"]
        wrong[1]["x0"][10][0] *= 1 + 1e-4  # a_10 of x0_10 = a_10 x_10 + b_10 eps_10
        wrong[2]["latent"][12][-1] += 1e-4  # d_12,12: x0_12 (at most 1 when clipped) in the latent after step 12
        for n, form in enumerate(wrong):
            error, _ = onnx_export._linear_error(form, solver, schedule, timesteps, shape)
            assert error > 1e-5, (text, n, error)


def test_linear_form_of_ddim_is_refused(tiny_cfg):
    for text in ("ddim", "ddim(eta=0.5)", "ddpm"):
        with pytest.raises(DDSMError, match="is written out by the ONNX sampler itself .*: it has no linear form"):
            linear_form(Solver.parse(text), NoiseSchedule(tiny_cfg.diffusion), [99, 50, 0])


def test_linear_form_of_clip_false_is_the_version_2_form():
    """Without clipping the new form composes to the version-2 form over eps that the code before it
    derived (tests/data/onnx_v2_linear.json, written at 29b4896) within float64 rounding."""
    data = json.loads((Path(__file__).parent / "data" / "onnx_v2_linear.json").read_text())
    schedule, timesteps = _noise_schedule(data["num_timesteps"]), data["timesteps"]
    for name, old in data["sections"].items():
        form = linear_form(Solver(name, clip=False), schedule, timesteps)
        steps = len(timesteps)
        # every latent and x0 over (x_T, eps_0 .. eps_{S-1}): x_0 = x_T, x0_i = a_i x_i + b_i eps_i
        latents, x0s = [np.eye(1 + steps)[0]], []
        for i in range(steps):
            a, b = form.x0[i]
            x0s.append(a * latents[i] + b * np.eye(1 + steps)[1 + i])
            latents.append(form.latent[i][0] * latents[0] + sum(d * x0s[j] for j, d in enumerate(form.latent[i][1:])))
        for i in range(steps):
            np.testing.assert_allclose(latents[i + 1][:i + 2], old["linear"]["latent"][i], rtol=1e-12, atol=1e-14)
        assert list(form.model_input_scale) == old["linear"]["model_input_scale"]


def test_group_weights_export_each_groups_network(tiny_supernet, tmp_path):
    supernet = load_supernet(tiny_supernet)
    model = supernet.model
    subnets = [model.check_subnet(w) for w in (0.5, 0.5, 1.0, 1.0, 1.0)]
    timesteps = sampling_timesteps(supernet.config.diffusion.timesteps, 5)
    groups = (WeightGroup(0, 2, subnets[0], (timesteps[1], 99)), WeightGroup(2, 5, subnets[2], (0, timesteps[2])))
    g = torch.Generator().manual_seed(0)
    tensors = {f"group{k}.{name}": (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
               for k, group in enumerate(groups) for name, v in model.export(group.subnet).state_dict().items()}
    from safetensors.torch import save

    blob = save(tensors)
    (tmp_path / "w.safetensors").write_bytes(blob)
    weights = GroupWeights(tmp_path / "w.safetensors", hashlib.sha256(blob).hexdigest(), groups)
    schedule = Schedule(subnets=subnets, settings={"weights": weights})
    path = save_schedule(tmp_path / "s.json", schedule, supernet)
    folder, manifest = export_onnx(path, tmp_path / "onnx")
    assert manifest["steps"] == ["width=0.5 group 0"] * 2 + ["width=1.0 group 1"] * 3
    noise, _ = _draws(2, 4, supernet.image_shape, 5)
    ref = generate(Runtime(supernet).plan_schedule(schedule), n=4, seed=2).numpy()
    plain = generate(Runtime(supernet).plan(subnets, solver="ddim"), n=4, seed=2).numpy()
    assert np.abs(ref - plain).max() > 1e-3, "the group weights change the images"
    _close(OnnxSampler(folder).sample(4, noise=noise), ref, IMAGES)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """A tiny DiT supernet trained 3 steps through the CLI, its weights then randomised in memory (adaLN-Zero
    starts every block as the identity: trained 3 steps it predicts almost zero, which would test nothing)."""
    root = tmp_path_factory.mktemp("onnx-dit")
    data = tiny_dict()
    data["model"] = TINY_DIT
    (root / "dit.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(root / "dit.yaml"), "--out", str(root / "net"), "--train-steps", "3", "--quiet",
                 "--device", "cpu"]) == 0
    supernet = load_supernet(root / "net")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in supernet.model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return supernet, root


def test_dit_width_and_depth_schedule_round_trip(dit):
    supernet, root = dit
    model = supernet.model
    subnets = [model.check_subnet(s) for s in ("width=1.0,depth=4", "width=0.5,depth=2", "width=0.5,depth=2",
                                               "width=1.0,depth=3", "width=1.0,depth=4")]
    path = save_schedule(root / "schedule.json", Schedule(subnets=subnets), supernet)
    folder, manifest = export_onnx(path, root / "onnx", supernet=supernet)  # the randomised weights
    assert len(manifest["graphs"]) == 3 and manifest["supernet"]["kind"] == "dit"
    for key in manifest["graphs"]:
        _graph_matches_subnet(folder, supernet, key)
    n = 5
    noise, _ = _draws(4, n, supernet.image_shape, len(subnets))
    ref = generate(Runtime(supernet).plan(subnets, solver="ddim"), n=n, seed=4).numpy()
    _close(OnnxSampler(folder, sessions=2).sample(n, noise=noise), ref, IMAGES)


def test_sampler_imports_no_torch(unet, exports):
    folders = [unet[3], exports[1]("sde-dpmsolver++")[1]]  # DDIM's update, and a linear form with step noise
    code = ("import sys; from ddsm_search.deploy.onnx_sampler import OnnxSampler; "
            f"x = OnnxSampler({str(folders[0])!r}).sample(2, seed=0); "
            "assert x.shape == (2, 1, 8, 8) and abs(x).max() <= 1; "
            f"y = OnnxSampler({str(folders[1])!r}).sample(2, seed=0); "
            "assert y.shape == (2, 1, 8, 8) and abs(y).max() > 0.1; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _rewrite(folder: Path, edit) -> None:
    """Edit a folder's manifest with `edit(manifest)` and write it with its digest recomputed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_graph_or_manifest_is_refused(unet, exports, tmp_path):
    folder = shutil.copytree(unet[3], tmp_path / "copy")
    graph = folder / "width-0.5.onnx"
    blob = bytearray(graph.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    graph.write_bytes(bytes(blob))
    with pytest.raises(DDSMError, match="width-0.5.onnx does not match its SHA-256 in manifest.json"):
        OnnxSampler(folder)
    graph.unlink()
    with pytest.raises(DDSMError, match="graph file missing"):
        OnnxSampler(folder)
    shutil.rmtree(folder)
    folder = shutil.copytree(unet[3], tmp_path / "copy")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["solver"]["eta"] = 1.0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDSMError, match="changed after export"):
        OnnxSampler(folder)
    with pytest.raises(DDSMError, match="not an ONNX export"):
        OnnxSampler(tmp_path)
    # a linear solver's coefficients are under the digest too
    linear = shutil.copytree(exports[1]("unipc")[1], tmp_path / "unipc")
    manifest = json.loads((linear / "manifest.json").read_text())
    for edit in (lambda m: m["latent"][3].__setitem__(1, m["latent"][3][1] * 1.001),
                 lambda m: m["x0"][2].__setitem__(0, m["x0"][2][0] * 1.001), lambda m: m.update(clip=False)):
        manifest = json.loads((linear / "manifest.json").read_text())
        edit(manifest["linear"])
        (linear / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DDSMError, match="manifest.json was changed after export"):
            OnnxSampler(linear)


def test_malformed_linear_forms_are_refused_in_one_line(exports, tmp_path):
    source = exports[1]("sde-dpmsolver++")[1]
    cases = [
        (lambda m: m.pop("linear"), "linear must be an object"),
        (lambda m: m["linear"]["latent"][3].pop(), r"linear.latent must hold 7 rows, row i of i \+ 2 finite numbers"),
        (lambda m: m["linear"]["model_input_scale"].pop(), "linear.model_input_scale must be 7 finite numbers"),
        (lambda m: m["linear"].update(init_noise_sigma=0), "linear.init_noise_sigma must be a finite number > 0"),
        (lambda m: m["linear"].update(noise_steps=[1, 0]), "linear.noise_steps must be rising step numbers in 0 .. 6"),
        (lambda m: m["linear"]["noise"][4].append(0.5), "linear.noise must hold 7 rows"),
        (lambda m: m["linear"].pop("x0"), r"linear.x0 must hold 7 rows of two finite numbers \(a_i, b_i"),
        (lambda m: m["linear"]["x0"][6].append(1.0), "linear.x0 must hold 7 rows of two finite numbers"),
        (lambda m: m["linear"]["x0"][0].__setitem__(1, float("nan")), "linear.x0 must hold 7 rows"),
        (lambda m: m["linear"].update(clip="yes"), "linear.clip must be true or false, the solver's clip"),
        (lambda m: m["linear"].update(clip=False), r"linear.clip must be true or false, the solver's clip \(True\)"),
        (lambda m: m["solver"].update(name=7), "solver.name must be a solver name"),
    ]
    for n, (edit, message) in enumerate(cases):
        folder = shutil.copytree(source, tmp_path / f"case{n}")
        _rewrite(folder, edit)
        with pytest.raises(DDSMError, match=message) as caught:
            OnnxSampler(folder)
        assert len(str(caught.value).splitlines()) == 1


def _as_version_1(manifest: dict) -> None:
    """Rewrite a version-2 DDIM/DDPM manifest as export-onnx wrote it before solvers: `sampler`, version 1."""
    solver = manifest.pop("solver")
    manifest.update(version=1, sampler={"name": solver["name"], "eta": solver.get("eta", 0.0),
                                        "steps": solver["steps"], "timesteps": solver["timesteps"]})


def test_version_1_manifests_load_and_sample_as_before(unet, exports, tmp_path):
    supernet = exports[0]
    for name, folder in (("ddim", unet[3]), ("ddpm", exports[1]("ddpm")[1])):
        old = shutil.copytree(folder, tmp_path / name)
        _rewrite(old, _as_version_1)
        manifest = json.loads((old / "manifest.json").read_text())
        assert manifest["version"] == 1 and "solver" not in manifest and manifest["sampler"]["name"] == name
        noise, step_noise = _draws(4, 3, supernet.image_shape, len(manifest["steps"]))
        got = OnnxSampler(old).sample(3, noise=noise, step_noise=step_noise)
        assert np.array_equal(got, OnnxSampler(folder).sample(3, noise=noise, step_noise=step_noise))
    _rewrite(old, lambda m: m["sampler"].update(name="unipc"))
    with pytest.raises(DDSMError, match="sampler.name must be one of ddim, ddpm"):
        OnnxSampler(old)
    _rewrite(old, lambda m: m.update(version=4))
    with pytest.raises(DDSMError, match="has format version 4; this sampler reads 1, 2, 3"):
        OnnxSampler(old)


def test_version_2_manifests_load_and_sample_as_before(exports, tmp_path):
    """A version-2 manifest (its linear form over eps, unclipped: tests/data/onnx_v2_linear.json holds the
    sections the code at 29b4896 wrote for these timesteps) samples what the unclipped solver's `generate`
    gives, and what its version-3 export gives."""
    supernet, export = exports
    data = json.loads((Path(__file__).parent / "data" / "onnx_v2_linear.json").read_text())
    for name, old in data["sections"].items():
        schedule, folder = export(f"{name}(clip=False)")
        assert schedule.timesteps == data["timesteps"] and supernet.config.diffusion.timesteps == data["num_timesteps"]
        copy = shutil.copytree(folder, tmp_path / name)

        def as_version_2(manifest: dict) -> None:
            solver = manifest["solver"]
            manifest.update(version=2, linear=old["linear"],
                            solver={**old["solver"], "steps": solver["steps"], "timesteps": solver["timesteps"]})

        _rewrite(copy, as_version_2)
        manifest = json.loads((copy / "manifest.json").read_text())
        assert manifest["version"] == 2 and "x0" not in manifest["linear"] and "clip" not in manifest["solver"]
        n = 4
        noise, _ = _draws(6, n, supernet.image_shape, len(WIDTHS))
        ref = generate(Runtime(supernet).plan_schedule(schedule), n=n, seed=6).numpy()
        got = OnnxSampler(copy, sessions=2).sample(n, noise=noise)
        err = float(np.abs(got - ref).max())
        print(f"version 2 {name}: max |onnx - torch| = {err:.2e}")
        assert err <= SOLVER_IMAGES and float(np.abs(ref).max()) > 1, "unclipped, as version 2 ran it"
        assert float(np.abs(got - OnnxSampler(folder).sample(n, noise=noise)).max()) <= SOLVER_IMAGES
        _rewrite(copy, lambda m: m["linear"]["latent"][2].append(0.1))
        with pytest.raises(DDSMError, match=r"linear.latent must hold 7 rows, row i of i \+ 2 finite numbers "
                                            r"\(x_T, eps_0 .. eps_i\)"):
            OnnxSampler(copy)


def test_clipping_changes_the_images(exports):
    """The clipped and unclipped solvers' images differ on this network: the clip is not idle."""
    supernet, export = exports
    for name in ("dpmsolver++", "unipc"):
        runs = [generate(Runtime(supernet).plan_schedule(export(text)[0]), n=4, seed=3).numpy()
                for text in (name, f"{name}(clip=False)")]
        assert np.abs(runs[0]).max() <= 1 < np.abs(runs[1]).max()
        assert np.abs(runs[0] - runs[1]).max() > 0.1


def _cli(argv: list[str]) -> int:
    """Run `ddsm-search export-onnx ...` as the command line does."""
    from ddsm_search.cli.main import main

    return main(argv)


def test_cli_writes_and_refuses_in_one_line_writing_nothing(unet, tmp_path, capsys, monkeypatch):
    supernet, subnets, path, _ = unet
    assert _cli(["export-onnx", str(path), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    assert "wrote 3 ONNX graph(s) for 5 ddim steps and" in capsys.readouterr().out
    unipc = save_schedule(tmp_path / "unipc.json", Schedule(subnets=subnets, solver=Solver("unipc", order=3)),
                          supernet)
    assert _cli(["export-onnx", str(unipc), "--out", str(tmp_path / "ok-unipc"), "--quiet"]) == 0
    assert "wrote 3 ONNX graph(s) for 5 unipc(order=3) steps, its update as a linear form matching torch's within" \
        in capsys.readouterr().out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("x")
    exit_schedule = tmp_path / "exit.json"
    exit_schedule.write_text(json.dumps({"subnets": [{"width": 1.0}] * 5, "settings": {"exit": {"threshold": 0.8}},
                                         "supernet": {"path": str(supernet.path)}}))
    cached_schedule = tmp_path / "cached.json"
    cached_schedule.write_text(json.dumps({"subnets": [{"width": 1.0}] * 5, "supernet": {"path": str(supernet.path)},
                                           "settings": {"cache": {"steps": ["keep1", "reuse1"] * 2 + ["keep1"]}}}))
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"subnets": [{"width": 1.0}] * 5}))
    cases = [
        ([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o1")], "schedule file not found"),
        ([str(path), "--out", str(tmp_path / "full")], "exists and is not empty"),
        ([str(path), "--out", str(tmp_path / "a-file")], "is a file, not a folder"),
        ([str(exit_schedule), "--out", str(tmp_path / "o2")], "whose exit (settings.exit) decides per image how much network runs"),
        ([str(cached_schedule), "--out", str(tmp_path / "o7")],
         "whose cache (settings.cache) keeps or reuses what earlier steps computed"),
        ([str(orphan), "--out", str(tmp_path / "o3")], "names no supernet"),
        ([str(orphan), "--out", str(tmp_path / "o4"), "--supernet", str(tmp_path / "nope")],
         "supernet directory not found"),
        ([str(path), "--out", str(tmp_path / "new" / "deeper" / "o5")], "differs from its torch network"),
        ([str(unipc), "--out", str(tmp_path / "o6")], "the linear form of solver unipc(order=3) differs from its torch "
         "run by inf"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(onnx_export, "_max_error", lambda *a: float("inf"))  # the last cases: a graph that is wrong,
    monkeypatch.setattr(onnx_export, "_linear_error", lambda *a: (float("inf"), 0.6))  # and a solver's linear form
    for argv, message in cases:
        assert _cli(["export-onnx", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{message}: something was written"
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "full").iterdir())) == 1
    assert (tmp_path / "a-file").read_text() == "x"
