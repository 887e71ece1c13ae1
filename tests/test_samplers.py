"""The DDIM / DDPM update formulas, checked against diffusers and against Gaussian data.

The oracle tests in test_diffusion.py predict x0 exactly, so they cannot see a wrong coefficient in the
update. Here:

* each step of `ddim_step`, and whole `sample_loop` trajectories, are compared with diffusers'
  DDIMScheduler / DDPMScheduler built on our betas, fed the same x_t, the same model output (a fixed
  non-oracle function of x and t, whose predicted x0 is clipped for some pixels and not for others)
  and the same step noise;
* for Gaussian data x0 ~ N(MU, S2) per pixel the optimal noise predictor is known in closed form, so
  the samplers must reproduce the exact moments of the discretised chain at 20 steps, and MU and S2
  themselves over the full 1000-step chain.

diffusers is a test dependency (the dev extra); these tests fail, rather than skip, without it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddsm_search.config import DiffusionConfig
from ddsm_search.diffusion import NoiseSchedule, sample_loop, sampling_timesteps
from ddsm_search.solvers.base import Solver
from ddsm_search.solvers.ddim import ddim_step

T = 1000
SHAPE = (8, 2, 4, 4)  # 32 values per image for the model's linear map
# options that make diffusers' step the textbook one our sampler implements: an eps-predicting model,
# predicted x0 clipped to [-1, 1] (no dynamic thresholding), no offset or zero-SNR rescaling
COMMON = dict(prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0, thresholding=False,
              steps_offset=0, rescale_betas_zero_snr=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Run single-threaded: the tensors are small, and two intra-op threads on a loaded 2-core machine
    spend longer waiting for each other (measured: 2 s instead of 0.02 s for a 20-step run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _schedule(kind: str) -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig(timesteps=T, beta_schedule=kind))


def _ddim(betas: torch.Tensor, spacing: str = "leading") -> DDIMScheduler:
    # set_alpha_to_one: the last step goes to alpha_bar = 1 (x0 itself), as sample_loop does
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), set_alpha_to_one=True,
                         timestep_spacing=spacing, **COMMON)


def _ddpm(betas: torch.Tensor) -> DDPMScheduler:
    # fixed_small: the posterior variance beta_t (1 - a_prev) / (1 - a_t) of q(x_prev | x_t, x0)
    return DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), variance_type="fixed_small",
                         **COMMON)


def _exact(scheduler, alphas_cumprod: torch.Tensor):
    """Give a diffusers scheduler our float64 alpha_bar (after checking it built the same in float32).

    diffusers keeps alphas_cumprod in float32; the step-by-step tests run in float64 with our exact
    coefficients so that they can compare at 1e-10 and test the formulas, not float32 rounding. (atol:
    a beta within 1e-7 of 1, as the cosine schedule's last, keeps few float32 digits in 1 - beta.)
    """
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alphas_cumprod, rtol=2e-5, atol=1e-9)
    scheduler.alphas_cumprod = alphas_cumprod.clone()
    return scheduler


def _model(alphas_cumprod: torch.Tensor, seed: int = 1234):
    """A fixed non-oracle eps predictor: a shrinkage denoiser plus tanh of a random linear map of x.

    The first term is the optimal predictor for N(0, 0.25) data; the second moves the predicted x0 by up
    to 1.5 sqrt(1 - a_t), so x0 is clipped for some pixels at every noise level and not for others.
    """
    g = torch.Generator().manual_seed(seed)
    dim = math.prod(SHAPE[1:])
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    b = torch.randn(dim, generator=g, dtype=torch.float64)

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        t = int(t)
        a = float(alphas_cumprod[t])
        flat = x.reshape(len(x), -1).double()
        shrink = math.sqrt(1 - a) / (0.25 * a + 1 - a) * flat
        out = shrink + 1.5 * math.sqrt(a) * torch.tanh(flat @ w.T + b * math.cos(t / 150))
        return out.reshape(x.shape).to(x.dtype)

    return eps


def _clipped_fraction(x, eps, a_t):
    return ((x - math.sqrt(1 - a_t) * eps).abs() > math.sqrt(a_t)).double().mean().item()


def test_diffusers_builds_the_same_alphas_from_its_own_schedules():
    """Our linear and cosine betas are diffusers' "linear" and "squaredcos_cap_v2" (to float32 precision)."""
    for kind, name in [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        ours = _schedule(kind).alphas_cumprod
        for cls in (DDIMScheduler, DDPMScheduler):
            theirs = cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule=name).alphas_cumprod
            torch.testing.assert_close(theirs.double(), ours, rtol=5e-5, atol=0)
            from_betas = cls(num_train_timesteps=T, trained_betas=_schedule(kind).betas.numpy()).alphas_cumprod
            torch.testing.assert_close(from_betas.double(), ours, rtol=2e-5, atol=0)


# ---------------------------------------------------------------- step by step, float64

# float64 with the same alpha_bar: the two agree to 1e-13 (measured; x0 = (x - sqrt(1 - a) eps) / sqrt(a)
# amplifies rounding by up to 1e4 at the noisiest cosine step); the mutations tried moved them by 0.15 or more
STEP_ATOL = 1e-10


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 20)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_steps_match_diffusers(kind, spacing, steps, eta):
    s = _schedule(kind)
    ref = _exact(_ddim(s.betas, spacing), s.alphas_cumprod)
    ref.set_timesteps(steps)
    ts = ref.timesteps.tolist()
    model = _model(s.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clipped = []
    for i, t in enumerate(ts):
        # DDIMScheduler steps to t - T // steps (alpha_bar = 1 past 0); these spacings follow that rule
        assert (ts[i + 1] if i + 1 < len(ts) else -1) == max(t - T // steps, -1)
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = model(x, t)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        expected = ref.step(eps, t, x, eta=eta, use_clipped_model_output=True,
                            variance_noise=z if eta > 0 else None).prev_sample
        got = ddim_step(x.clone(), eps, a_t, a_prev, False, eta, z if eta > 0 else None)
        torch.testing.assert_close(got, expected, rtol=0, atol=STEP_ATOL, msg=lambda m: f"step {i} (t={t}): {m}")
        clipped.append(_clipped_fraction(x, eps, a_t))
        x = expected
    # the model exercises both branches of the clipping at every step, and on the whole about half
    assert all(0 < c < 1 for c in clipped) and 0.2 < np.mean(clipped) < 0.8, clipped


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_match_diffusers_on_our_timesteps(kind, eta):
    """Our own sampling_timesteps (uneven gaps, 999 .. 0) through a respaced DDIMScheduler.

    DDIMScheduler only steps by T // steps, so it is given the 15-step chain itself as its schedule:
    betas 1 - a(t_k) / a(t_k+1), for which its timesteps 14 .. 0 are our 999 .. 0 (and t - 1 the next).
    This compares ddim_step on pairs (a_t, a_prev) that no fixed-stride schedule produces.
    """
    s = _schedule(kind)
    ts = sampling_timesteps(T, 15)
    chain = s.alphas_cumprod[ts[::-1]]  # alpha_bar along the chain, least noisy first
    betas = 1 - chain / torch.cat([torch.ones(1, dtype=torch.float64), chain[:-1]])
    ref = _exact(_ddim(betas), chain)
    ref.set_timesteps(len(ts))
    assert ref.timesteps.tolist() == list(range(len(ts) - 1, -1, -1))
    model = _model(s.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i, t in enumerate(ts):
        k = len(ts) - 1 - i  # diffusers' index for our timestep t
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = model(x, t)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + i), dtype=torch.float64)
        expected = ref.step(eps, k, x, eta=eta, use_clipped_model_output=True,
                            variance_noise=z if eta > 0 else None).prev_sample
        got = ddim_step(x.clone(), eps, a_t, a_prev, False, eta, z if eta > 0 else None)
        torch.testing.assert_close(got, expected, rtol=0, atol=STEP_ATOL, msg=lambda m: f"step {i} (t={t}): {m}")
        x = expected


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", ["ours", "leading"])
def test_ddpm_steps_match_diffusers(kind, timesteps):
    s = _schedule(kind)
    ref = _exact(_ddpm(s.betas), s.alphas_cumprod)
    if timesteps == "ours":  # custom timesteps: DDPMScheduler then steps to the next one in the list
        ts = sampling_timesteps(T, 20)
        ref.set_timesteps(timesteps=ts)
    else:
        ref.set_timesteps(10)
        ts = ref.timesteps.tolist()
    assert ts[-1] == 0  # so DDPMScheduler (noise only for t > 0) and we (none on the last step) agree
    model = _model(s.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for i, t in enumerate(ts):
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = model(x, t)
        # DDPMScheduler.step draws its noise as torch.randn(shape, generator=, dtype=model_output.dtype) on
        # the generator's device (randn_tensor), and only for t > 0: the same draw from an equal generator
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(300 + i)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(300 + i), dtype=torch.float64) if t > 0 else None
        got = ddim_step(x.clone(), eps, a_t, a_prev, True, 0.0, z)
        torch.testing.assert_close(got, expected, rtol=0, atol=STEP_ATOL, msg=lambda m: f"step {i} (t={t}): {m}")
        x = expected


# ---------------------------------------------------------------- whole trajectories, float32

def _run_diffusers(ref, model, ts, x, generator, **step_kwargs):
    for t in ts:
        x = ref.step(model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


# float32 throughout, diffusers with its own float32 alpha_bar; the step noise is drawn by both from
# generators in the same state (the initial noise first, then one draw per stochastic step), so the
# trajectories agree to float32 rounding, amplified by 1 / sqrt(a_t) in the predicted x0 of the first
# steps and damped again by sqrt(a_prev): measured below 1e-5; the mutations tried moved them by 0.04 or more.
TRAJECTORY_ATOL = 5e-5


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sample_loop_matches_a_diffusers_ddim_loop(kind, eta):
    s = _schedule(kind)
    ref = _ddim(s.betas, "leading")
    ref.set_timesteps(20)
    ts = ref.timesteps.tolist()
    model = _model(s.alphas_cumprod)
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x_ours, x_ref = torch.randn(SHAPE, generator=g_ours), torch.randn(SHAPE, generator=g_ref)
    ours = sample_loop({1.0: model}, [1.0] * len(ts), ts, x_ours, Solver("ddim", eta=eta).run(s, ts), generator=g_ours)
    # DDIMScheduler.step draws even on the last step (where sigma = 0): after everything that matters
    theirs = _run_diffusers(ref, model, ts, x_ref, g_ref, eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TRAJECTORY_ATOL)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", ["ours", "leading"])
def test_sample_loop_matches_a_diffusers_ddpm_loop(kind, timesteps):
    s = _schedule(kind)
    ref = _ddpm(s.betas)
    if timesteps == "ours":
        ts = sampling_timesteps(T, 20)
        ref.set_timesteps(timesteps=ts)
    else:
        ref.set_timesteps(10)
        ts = ref.timesteps.tolist()
    model = _model(s.alphas_cumprod)
    g_ours, g_ref = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    x_ours, x_ref = torch.randn(SHAPE, generator=g_ours), torch.randn(SHAPE, generator=g_ref)
    ours = sample_loop({1.0: model}, [1.0] * len(ts), ts, x_ours, Solver("ddpm").run(s, ts), generator=g_ours)
    theirs = _run_diffusers(ref, model, ts, x_ref, g_ref)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TRAJECTORY_ATOL)


def test_ddim_with_eta_one_is_ancestral_ddpm():
    """eta = 1 makes DDIM's sigma the posterior's standard deviation and its mean the posterior mean."""
    s = _schedule("linear")
    ts = sampling_timesteps(T, 12)
    model = _model(s.alphas_cumprod)

    def run(sampler, eta):
        g = torch.Generator().manual_seed(8)
        return sample_loop({1.0: model}, [1.0] * len(ts), ts, torch.randn(SHAPE, generator=g),
                           Solver.of_sampler(sampler, eta).run(s, ts), generator=g)

    torch.testing.assert_close(run("ddim", 1.0), run("ddpm", 0.0), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- Gaussian data, exact denoiser

MU, S2 = 0.2, 0.25**2
# Per pixel x0 ~ N(MU, S2). Clipping the predicted x0 to [-1, 1] is negligible: even for the data
# itself it cuts the 3.2-sigma upper tail, changing the mean by -5e-5 and the variance by -0.13%
# (predicted x0 along the chain is a posterior mean, narrower still).


def _gaussian_denoiser(alphas_cumprod):
    """E[eps | x_t] for x_t = sqrt(a) x0 + sqrt(1 - a) eps: sqrt(1 - a) (x_t - sqrt(a) MU) / (a S2 + 1 - a)."""
    def eps(x, t):
        a = float(alphas_cumprod[int(t)])
        return math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a * S2 + 1 - a)
    return eps


def _chain_moments(alphas_cumprod, ts, sampler, eta):
    """Exact mean and variance of the discretised chain's output, from x_T ~ N(0, 1), clipping ignored.

    With this denoiser every step is affine in x_t plus independent Gaussian noise, x_prev = k x_t + c +
    sigma z, so the law stays Gaussian: m <- k m + c, v <- k^2 v + sigma^2 (DDIM / DDPM papers' formulas).
    """
    m, v = 0.0, 1.0
    for i, t in enumerate(ts):
        a = float(alphas_cumprod[t])
        ap = float(alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        ce = math.sqrt(1 - a) / (a * S2 + 1 - a)  # eps_hat = ce x - ce sqrt(a) MU
        e1, e0 = ce, -ce * math.sqrt(a) * MU
        p1, p0 = (1 - math.sqrt(1 - a) * e1) / math.sqrt(a), -math.sqrt(1 - a) * e0 / math.sqrt(a)  # x0_hat = p1 x + p0
        if ap == 1.0:
            k, c, var = p1, p0, 0.0
        elif sampler == "ddpm":  # posterior q(x_prev | x_t, x0_hat)
            beta = 1 - a / ap
            cx0, cxt = math.sqrt(ap) * beta / (1 - a), math.sqrt(a / ap) * (1 - ap) / (1 - a)
            k, c, var = cx0 * p1 + cxt, cx0 * p0, beta * (1 - ap) / (1 - a)
        else:
            var = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
            d = math.sqrt(1 - ap - var)
            k, c = math.sqrt(ap) * p1 + d * e1, math.sqrt(ap) * p0 + d * e0
        m, v = k * m + c, k * k * v + var
    return m, v


def _sample_gaussian(kind, steps, sampler, eta, n_pixels, seed):
    s = _schedule(kind)
    ts = sampling_timesteps(T, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pixels // 64, 1, 8, 8, generator=g)
    out = sample_loop({1.0: _gaussian_denoiser(s.alphas_cumprod)}, [1.0] * steps, ts, x,
                      Solver.of_sampler(sampler, eta).run(s, ts), generator=g, batch_size=len(x)).double()
    return out.mean().item(), out.var().item(), _chain_moments(s.alphas_cumprod, ts, sampler, eta)


SAMPLERS = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_gaussian_data_gives_the_exact_moments_of_the_20_step_chain(kind, sampler, eta):
    """20 steps are far from converged (the variance comes out 25-55% low) but exactly predictable.

    The output pixels are i.i.d. Gaussian, so the sample mean has standard error sqrt(v / N) and the
    sample variance a relative one of sqrt(2 / N) = 0.55% at N = 2^16; tolerances are 5 of those plus
    the clipping bias (< 1e-4 on the mean, < 0.2% on the variance). Halving DDIM's eps term, 2.5x its
    sigma, mixing x0 into DDPM's mean or DDPM's variance set to beta move the variance by 14% to 240%.
    """
    n = 2**16
    mean, var, (m, v) = _sample_gaussian(kind, 20, sampler, eta, n, seed=10)
    assert 0.4 * S2 < v < 0.8 * S2  # the discretisation error this test is meant to see
    assert abs(mean - m) < 5 * math.sqrt(v / n) + 1e-4, (mean, m)
    assert abs(var / v - 1) < 5 * math.sqrt(2 / n) + 2e-3, (var, v)


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_gaussian_data_is_recovered_by_the_full_chain(sampler, eta):
    """All 1000 steps (linear betas) give back MU and S2.

    Discretisation: the exact chain moments (computed, and checked here) are within 5e-4 of MU (3e-4
    for DDIM eta = 0, which carries the start's offset from the true x_T marginal, -sqrt(a_T) MU) and
    3.5% of S2 (1.2% low for DDIM eta = 0, 3% for the stochastic samplers, whose posterior variance
    leaves out the uncertainty of the predicted x0). Sampling at N = 2^15: 4 standard errors are 0.0055
    on the mean and 3.1% on the variance. Clipping: < 1e-4 and 0.2%. So |mean - MU| < 0.006 and
    |var / S2 - 1| < 0.07. Halving DDIM's eps term loses > 90% of the variance, 2.5x DDIM's sigma 20%
    (its sigma^2 then exceeds 1 - a_prev near t = 0), 0.9 mean + 0.1 x0 in DDPM 77%. (DDPM's variance
    set to beta converges to the same reverse process as steps are refined: only the 20-step test sees it.)
    """
    mean, var, (m, v) = _sample_gaussian("linear", T, sampler, eta, 2**15, seed=11)
    assert abs(m - MU) < 5e-4 and abs(v / S2 - 1) < 0.035, (m, v)
    assert abs(mean - MU) < 0.006, mean
    assert abs(var / S2 - 1) < 0.07, var
