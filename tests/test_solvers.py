"""Solvers other than DDIM / DDPM (solvers/schedulers.py) checked against diffusers' own loops.

Each reference is the loop a diffusers pipeline runs, written here from diffusers' API alone: the
scheduler built from its own `beta_schedule="linear"` (not from our betas), its own `set_timesteps(n)`
with a `timestep_spacing`, the initial noise scaled by `init_noise_sigma`, `scale_model_input` before
the network and `step(...).prev_sample` after it. Ours runs the same model through `sample_loop` with
`Solver.run` on our noise schedule and `timesteps_for(T, n, spacing)`. The model is a fixed non-oracle
function of (x, t); in the mixed-subnet tests two different functions alternate by step, as two subnets
of a schedule do, so a multistep solver's history holds outputs of both.

Float32 throughout; our betas are float64 linspace cast by diffusers to float32, its own are float32
linspace, so alpha_bar differs by float32 rounding (measured: the trajectories agree to 4e-6). Mutations
tried: every step of first order (the history dropped) moves them by 0.2 or more, Euler's model input
left unscaled by 600.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from ddsm_search.config import DiffusionConfig
from ddsm_search.diffusion import NoiseSchedule, sample_loop
from ddsm_search.errors import DDSMError
from ddsm_search.solvers.base import Solver, head_of, read_head, spacing_of, timesteps_for

T = 1000
SHAPE = (4, 2, 4, 4)
ATOL = 2e-5
SCHEDULE = NoiseSchedule(DiffusionConfig(timesteps=T))
COMMON = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(solver: Solver, spacing: str):
    # clip: diffusers' thresholding with sample_max_value 1 (test_clip_is_diffusers_thresholding_at_one)
    clip = dict(thresholding=solver.clip, sample_max_value=1.0)
    if solver.name in ("dpmsolver++", "sde-dpmsolver++"):
        return DPMSolverMultistepScheduler(**COMMON, **clip, algorithm_type=solver.name, solver_order=solver.order,
                                           timestep_spacing=spacing)
    if solver.name == "unipc":
        return UniPCMultistepScheduler(**COMMON, **clip, solver_order=solver.order, timestep_spacing=spacing)
    return EulerDiscreteScheduler(**COMMON, timestep_spacing=spacing)


def _model(seed: int):
    """eps(x, t): a shrinkage term plus tanh of a random linear map, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    dim = math.prod(SHAPE[1:])
    w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    b = torch.randn(dim, generator=g)

    def eps(x, t):
        a = float(SCHEDULE.alphas_cumprod[int(t)])
        flat = x.reshape(len(x), -1)
        out = math.sqrt(1 - a) * flat / (0.3 * a + 1 - a) + 0.5 * torch.tanh(flat @ w.T + b * math.cos(int(t) / 150))
        return out.reshape(x.shape)

    return eps


MODELS = {"a": _model(1), "b": _model(2)}
SOLVERS = ["dpmsolver++", "dpmsolver++(order=3)", "dpmsolver++(order=1)", "sde-dpmsolver++", "unipc",
           "unipc(order=3)", "euler", "dpmsolver++(clip=False)", "unipc(clip=False)", "sde-dpmsolver++(clip=False)"]


def _diffusers_loop(solver: Solver, spacing: str, steps: int, nets: list, seed: int) -> torch.Tensor:
    ref = _reference(solver, spacing)
    if solver.name == "euler" and spacing != "trailing":
        # Euler's own linspace and leading grids differ from the multistep schedulers' (n points from
        # T-1 to 0, fractional): every solver here runs the same integer grid, given to Euler explicitly
        ref.set_timesteps(timesteps=timesteps_for(T, steps, spacing))
    else:
        ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    # Euler starts from N(0, sigma_max^2 + 1), the law of x_T / sqrt(abar_T); diffusers' init_noise_sigma
    # says sigma_max instead under linspace and trailing spacing (off by 1e-4 relative at T = 1000)
    scale = float((ref.sigmas[0] ** 2 + 1) ** 0.5) if solver.name == "euler" else ref.init_noise_sigma
    x = torch.randn(SHAPE, generator=g) * scale
    for i, t in enumerate(ref.timesteps):
        eps = MODELS[nets[i]](ref.scale_model_input(x, t), t)
        noise = torch.randn(SHAPE, generator=g) if solver.stochastic else None
        x = ref.step(eps, t, x, **({"variance_noise": noise} if noise is not None else {})).prev_sample
    return x


def _ours(solver: Solver, spacing: str, steps: int, nets: list, seed: int) -> torch.Tensor:
    ts = timesteps_for(T, steps, spacing)
    run = solver.run(SCHEDULE, ts)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * run.init_noise_sigma
    return sample_loop(MODELS, nets, ts, x, run, generator=g)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_named_spacings_are_diffusers_timesteps(spacing):
    for steps in (1, 4, 7, 10, 25):
        for solver in ("dpmsolver++", "unipc", "euler") if spacing == "trailing" else ("dpmsolver++", "unipc"):
            ref = _reference(Solver.parse(solver), spacing)
            ref.set_timesteps(steps)
            assert timesteps_for(T, steps, spacing) == ref.timesteps.tolist(), (solver, steps)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("spacing,steps", [("linspace", 8), ("trailing", 5), ("leading", 10)])
def test_full_network_runs_match_diffusers(solver, spacing, steps):
    solver = Solver.parse(solver)
    nets = ["a"] * steps
    theirs = _diffusers_loop(solver, spacing, steps, nets, seed=3)
    ours = _ours(solver, spacing, steps, nets, seed=3)
    assert ours.abs().max() > 0.1  # a real image-scale latent, not a collapsed one
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mixed_subnets_share_one_multistep_history(solver):
    """A schedule that switches subnets by step equals diffusers' loop calling them in the same order."""
    solver = Solver.parse(solver)
    nets = ["a", "a", "b", "a", "b", "b", "a", "b"]
    theirs = _diffusers_loop(solver, "linspace", len(nets), nets, seed=4)
    ours = _ours(solver, "linspace", len(nets), nets, seed=4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    single = _ours(solver, "linspace", len(nets), ["a"] * len(nets), seed=4)
    assert (single - ours).abs().max() > 1e-3  # the second subnet changed the images


def test_uniform_grid_runs_on_every_solver():
    """This project's grid (T-1 .. 0) is none of diffusers' spacings: UniPC has its timesteps and sigmas
    replaced, the others take them as custom timesteps; every solver runs on it, clipped or not."""
    ts = timesteps_for(T, 20, "uniform")
    assert ts[0] == T - 1 and ts[-1] == 0 and spacing_of(ts, T) == "uniform"
    for solver in ("ddim", "ddpm", "dpmsolver++", "sde-dpmsolver++", "unipc", "unipc(order=3)", "euler",
                   "dpmsolver++(clip=False)"):
        out = _run(solver, 20, "uniform")
        assert torch.isfinite(out).all() and out.abs().max() > 0.1, solver


def _run(solver: str, n: int, spacing: str) -> torch.Tensor:
    grid = timesteps_for(T, n, spacing)
    r = Solver.parse(solver).run(SCHEDULE, grid)
    g = torch.Generator().manual_seed(5)
    return sample_loop(MODELS, ["a"] * n, grid, torch.randn(SHAPE, generator=g) * r.init_noise_sigma, r, generator=g)


def test_second_order_solvers_converge_faster_than_first_order():
    """Without clipping (not part of the ODE), on diffusers' linspace grid, the second-order solvers at 20
    steps are closer to a 400-step run than DPM-Solver++ of order 1 (DDIM's update) is."""
    fine = _run("dpmsolver++(clip=False)", 400, "linspace")
    errors = {s: (_run(s, 20, "linspace") - fine).abs().mean().item()
              for s in ("dpmsolver++(order=1,clip=False)", "dpmsolver++(clip=False)", "unipc(clip=False)")}
    first = errors.pop("dpmsolver++(order=1,clip=False)")
    assert all(e < 0.7 * first for e in errors.values()), (first, errors)  # measured: 0.66x and 0.43x


def test_solver_text_round_trips_and_bad_ones_are_refused():
    for text in ("ddim", "ddim(eta=0.5)", "ddpm", "dpmsolver++", "dpmsolver++(order=3)", "sde-dpmsolver++",
                 "unipc", "unipc(order=3)", "euler", "unipc(order=3,clip=False)"):
        solver = Solver.parse(text)
        assert solver.key == text and Solver.parse(solver.key) == solver
        assert Solver(**solver.to_json()) == solver
    assert Solver.parse("dpmsolver++(order=2)").key == "dpmsolver++"  # defaults are left out
    assert Solver.parse("unipc(clip=0)") == Solver("unipc", clip=False) and Solver("unipc").clip
    assert Solver("ddim").clip and not Solver("euler").clip and Solver("ddim", clip=True) == Solver("ddim")
    for text, message in [("heun", "unknown solver 'heun'"), ("ddim(eta=-1)", "eta must be"),
                          ("unipc(eta=0.1)", "takes no eta"), ("ddim(order=3)", "takes no order"),
                          ("dpmsolver++(order=4)", "order must be 1, 2 or 3"),
                          ("sde-dpmsolver++(order=3)", "order must be 1 or 2,"), ("ddim(eta)", "unknown solver option"),
                          ("ddim eta=1", "is not a solver"), ("ddim(clip=false)", "ddim takes no clip"),
                          ("euler(clip=true)", "euler takes no clip"), ("unipc(clip=maybe)", "not true or false")]:
        with pytest.raises(DDSMError, match=re_escape(message)):
            Solver.parse(text)
    with pytest.raises(DDSMError, match="unknown timestep spacing 'karras'"):
        timesteps_for(T, 10, "karras")
    with pytest.raises(DDSMError, match="steps must be between 1 and 1000"):
        timesteps_for(T, 0)


def test_plan_key_heads_name_the_solver_and_the_grid():
    assert head_of(Solver(), timesteps_for(T, 5), "uniform") is None  # the default: keys as before
    head = head_of(Solver.parse("unipc"), timesteps_for(T, 5, "trailing"), "trailing")
    assert head == "unipc trailing" and read_head(head, T, 5) == (Solver("unipc"), timesteps_for(T, 5, "trailing"),
                                                                   "trailing")
    custom = [900, 500, 300, 100, 0]
    head = head_of(Solver.parse("dpmsolver++(order=3)"), custom, None)
    assert head == "dpmsolver++(order=3) t=900,500,300,100,0"
    assert read_head(head, T, 5) == (Solver("dpmsolver++", order=3), custom, None)
    with pytest.raises(DDSMError, match="4 timesteps for 5 steps"):
        read_head("unipc t=900,500,100,0", T, 5)
    with pytest.raises(DDSMError, match="fall strictly"):
        read_head("unipc t=100,500,300,100,0", T, 5)


def test_clip_is_diffusers_thresholding_at_one():
    """Thresholding with sample_max_value 1 clamps the predicted x0 to [-1, 1], whatever its quantile."""
    ref = DPMSolverMultistepScheduler(**COMMON, thresholding=True, sample_max_value=1.0)
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 0.5, 1, 2, 5, 40]
                                                                                            ).view(-1, 1, 1, 1)
    torch.testing.assert_close(ref._threshold_sample(x0.clone()), x0.clamp(-1, 1), rtol=0, atol=1e-7)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
