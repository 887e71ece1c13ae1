"""Noise schedule and samplers: exact with an oracle denoiser, seeded, batch-size invariant."""

from __future__ import annotations

import math

import pytest
import torch

from ddsm_search.config import DiffusionConfig
from ddsm_search.diffusion import NoiseSchedule, sample_loop, sampling_timesteps
from ddsm_search.solvers.base import Solver
from ddsm_search.errors import DDSMError
from ddsm_search.space.subnet import Subnet


def _oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A denoiser that knows the clean images: it returns the exact noise in x_t."""
    def denoise(x, t):
        a = float(schedule.alphas_cumprod[int(t)])
        return (x - math.sqrt(a) * x0[: len(x)]) / math.sqrt(1 - a)
    return denoise


def test_linear_schedule_endpoints():
    s = NoiseSchedule(DiffusionConfig(timesteps=1000))
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1] < 1e-4  # the last step is (almost) pure noise


def test_q_sample_mixes_signal_and_noise():
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    xt = s.q_sample(x0, torch.tensor([0, 99]), noise)
    assert xt[0].mean().item() == pytest.approx(math.sqrt(float(s.alphas_cumprod[0])), rel=1e-6)
    assert xt[1].mean().item() == pytest.approx(math.sqrt(float(s.alphas_cumprod[99])), rel=1e-5)


def test_sampling_timesteps_noisiest_first():
    ts = sampling_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert len(set(ts)) == 50
    with pytest.raises(DDSMError):
        sampling_timesteps(10, 11)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_oracle_denoiser_recovers_the_data(sampler, eta):
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    x0 = torch.rand(6, 1, 4, 4) * 1.6 - 0.8
    ts = sampling_timesteps(100, 10)
    g = torch.Generator().manual_seed(0)
    out = sample_loop({1.0: _oracle(s, x0)}, [1.0] * 10, ts, torch.randn(6, 1, 4, 4, generator=g),
                      Solver.of_sampler(sampler, eta).run(s, ts), generator=g)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def _noisy_denoiser(x, t):
    return torch.tanh(x) * 0.5


def test_each_step_uses_its_own_subnet():
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    seen = []
    full, half, shallow = Subnet.of(width=1.0, depth=4), Subnet.of(width=0.5, depth=4), Subnet.of(width=1.0, depth=2)
    denoisers = {k: (lambda k: lambda x, t: seen.append((k, int(t))) or torch.zeros_like(x))(k)
                 for k in (full, half, shallow)}
    ts = sampling_timesteps(100, 4)
    sample_loop(denoisers, [half, half, shallow, full], ts, torch.randn(2, 1, 2, 2), Solver().run(s, ts))
    assert seen == [(half, ts[0]), (half, ts[1]), (shallow, ts[2]), (full, ts[3])]


def test_stochastic_sampling_is_seeded_and_batch_size_invariant():
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    ts = sampling_timesteps(100, 8)

    def run(seed, batch_size):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(7, 1, 4, 4, generator=g)
        return sample_loop({1.0: _noisy_denoiser}, [1.0] * 8, ts, x, Solver("ddpm").run(s, ts), generator=g,
                           batch_size=batch_size)

    torch.testing.assert_close(run(3, 7), run(3, 2), rtol=0, atol=0)
    assert not torch.allclose(run(3, 7), run(4, 7))


def test_schedule_length_must_match_steps():
    s = NoiseSchedule(DiffusionConfig(timesteps=100))
    ts = sampling_timesteps(100, 4)
    with pytest.raises(DDSMError, match="3 subnets but the sampler runs 4 steps"):
        sample_loop({1.0: _noisy_denoiser}, [1.0] * 3, ts, torch.randn(1, 1, 2, 2), Solver().run(s, ts))
    with pytest.raises(DDSMError, match="unknown solver 'euler2'"):
        Solver("euler2")
    with pytest.raises(DDSMError, match="unknown solver option 'etta'"):
        Solver.parse("ddim(etta=1)")
    with pytest.raises(DDSMError, match="takes no eta"):
        Solver.parse("unipc(eta=0.5)")


def test_prefix_cache_gives_the_same_images_as_sampling_from_scratch():
    from ddsm_search.backbones.unet import SlimUNet
    from ddsm_search.checkpoint import in_memory
    from ddsm_search.config import config_from_dict
    from ddsm_search.sampling import PrefixCache, Runtime, generate
    from tests.conftest import tiny_dict

    cfg = config_from_dict(tiny_dict())
    model = SlimUNet(cfg.model, (1, 8, 8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    w = {x: Subnet.of(width=x) for x in (1.0, 0.75, 0.5)}
    first = [w[0.5], w[0.5], w[1.0], w[1.0], w[0.75], w[0.75]]
    second = [w[0.5], w[0.5], w[1.0], w[1.0], w[1.0], w[1.0]]  # shares the first 4 steps
    runtime = Runtime(in_memory(cfg, model))
    # every solver: multistep ones carry their history of model outputs across the cached prefix
    for solver in ["ddim", "ddpm", "ddim(eta=1.0)", "dpmsolver++", "dpmsolver++(order=3)", "sde-dpmsolver++", "unipc",
                   "euler"]:
        cache = PrefixCache(boundaries=[2, 4])
        kwargs = dict(n=5, seed=7)
        generate(runtime.plan(first, solver=solver), cache=cache, **kwargs)
        cached = generate(runtime.plan(second, solver=solver), cache=cache, **kwargs)
        fresh = generate(runtime.plan(second, solver=solver), **kwargs)
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0, msg=lambda m: f"{solver}: {m}")
        assert (cache.steps_saved, cache.steps_run) == (4, 6 + 2), solver
        # a prefix run by another solver is not shared
        other = generate(runtime.plan(second, solver="ddim" if solver != "ddim" else "unipc"), cache=cache, **kwargs)
        assert cache.steps_saved == 4 and not torch.equal(other, fresh)
