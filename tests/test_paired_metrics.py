"""Paired drift and confirmation statistics: SSIM drift against scikit-image and a direct float64 SSIM, feature
drift by hand, intervals on analytic cases (standard error, coverage), the paired FID-gap bootstrap, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddsm_search.metrics import frechet_distance, gaussian_stats, get_extractor
from ddsm_search.metrics.paired import drift, feature_drift, pixel_drift, ssim_window
from ddsm_search.metrics.stats import _RootedFID, bootstrap_interval, fid_gap_interval, mean_interval

SHAPES = [(6, 1, 8, 8), (6, 3, 16, 16), (4, 3, 32, 32), (4, 1, 4, 4), (4, 3, 5, 9)]


def _pairs(shape, seed):
    """Random pairs, and structured ones (gradients, a checkerboard, a disc) against shifted/noisy versions."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                          torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    patterns = torch.stack([x, y * x, ((torch.arange(h)[:, None] + torch.arange(w)) % 2) * 2.0 - 1,
                            (x ** 2 + y ** 2 < 0.5).double() * 2 - 1])
    s = patterns[torch.arange(n) % 4][:, None].expand(n, c, h, w).clone()
    t = (0.8 * s.roll(1, dims=3) + 0.1 * torch.randn(s.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return torch.cat([a, s]), torch.cat([b, t])


def _gauss(size, sigma):
    k = np.exp(-(np.arange(size) - size // 2) ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _ssim_direct(x, y, size, sigma, data_range=2.0):
    """SSIM of two (C, H, W) float64 arrays from its formula: Gaussian-weighted local moments on valid windows."""
    k = _gauss(size, sigma)
    kernel = np.outer(k, k)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xc, yc in zip(x, y):
        px = np.lib.stride_tricks.sliding_window_view(xc, (size, size))  # (H-s+1, W-s+1, s, s)
        py = np.lib.stride_tricks.sliding_window_view(yc, (size, size))
        mx, my = (px * kernel).sum((-2, -1)), (py * kernel).sum((-2, -1))
        vx = (((px - mx[..., None, None]) ** 2) * kernel).sum((-2, -1))
        vy = (((py - my[..., None, None]) ** 2) * kernel).sum((-2, -1))
        cxy = ((px - mx[..., None, None]) * (py - my[..., None, None]) * kernel).sum((-2, -1))
        m = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        values.append(m.mean())
    return float(np.mean(values))


# --- pixel drift ------------------------------------------------------------------------------------

def test_ssim_window_rule():
    assert ssim_window(32, 32) == (11, 1.5)
    assert ssim_window(16, 16) == (11, 1.5)
    assert ssim_window(14, 30) == (11, 1.5)
    assert ssim_window(8, 8) == (5, pytest.approx(1.5 * 5 / 11))
    assert ssim_window(12, 12)[0] == 9 and ssim_window(5, 9)[0] == 3 and ssim_window(4, 4)[0] == 3
    for side in range(4, 40):  # scikit-image's truncation (radius int(3.5 sigma + 0.5)) gives the same window
        size, sigma = ssim_window(side, side)
        assert size % 2 == 1 and 2 * int(3.5 * sigma + 0.5) + 1 == size
        assert side - size + 1 >= min(4, side - 2)  # at least 4 window positions per axis where they fit


@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_drift_matches_direct_ssim(shape):
    a, b = _pairs(shape, seed=1)
    size, sigma = ssim_window(*shape[2:])
    expected = np.array([1 - _ssim_direct(x.numpy(), y.numpy(), size, sigma) for x, y in zip(a, b)])
    np.testing.assert_allclose(pixel_drift(a, b), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_drift_matches_scikit_image(shape):
    skm = pytest.importorskip("skimage.metrics")
    a, b = _pairs(shape, seed=2)
    size, sigma = ssim_window(*shape[2:])
    expected = np.array([1 - skm.structural_similarity(x.numpy(), y.numpy(), data_range=2.0, channel_axis=0,
                                                       gaussian_weights=True, sigma=sigma, win_size=size,
                                                       use_sample_covariance=False) for x, y in zip(a, b)])
    # float32 images in: the library computes in float64 all the same
    np.testing.assert_allclose(pixel_drift(a.float(), b.float()), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pixel_drift(a, b), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_pixel_drift_zero_symmetric_growing(shape):
    a, b = _pairs(shape, seed=3)
    same = pixel_drift(a, a.clone())
    assert same.dtype == np.float64 and same.shape == (a.shape[0],) and (same == 0).all()
    np.testing.assert_array_equal(pixel_drift(a, b), pixel_drift(b, a))
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    drifts = np.stack([pixel_drift(a, a + t * noise) for t in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)])
    assert (drifts > 0).all() and (np.diff(drifts, axis=0) > 0).all()  # every image, every step


def test_drift_uses_extractor_when_given():
    class Flatten:  # the extractor interface: .features(images, batch_size) -> (N, D)
        def features(self, images, batch_size=500):
            return images.flatten(1).double().numpy()

    a, b = _pairs((4, 1, 8, 8), seed=5)
    np.testing.assert_allclose(drift(a, b, Flatten()), torch.linalg.vector_norm(a - b, dim=(1, 2, 3)).numpy())
    np.testing.assert_array_equal(drift(a, b), pixel_drift(a, b))
    digits = get_extractor("digits-cnn")
    d = drift(a.float(), b.float(), digits)
    assert d.shape == (8,) and (d > 0).all() and (drift(a.float(), a.float(), digits) == 0).all()


# --- feature drift ----------------------------------------------------------------------------------

def test_feature_drift_by_hand():
    a = np.array([[0, 0, 0], [1, 1, 1], [1, 2, 3]], dtype=np.float32)
    b = np.array([[3, 4, 0], [1, 1, 1], [0, 0, 0]])
    d = feature_drift(a, b)
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, [5.0, 0.0, np.sqrt(14.0)], rtol=1e-15)
    np.testing.assert_array_equal(d, feature_drift(b, a))


# --- intervals --------------------------------------------------------------------------------------

def test_mean_interval_by_hand():
    out = mean_interval([1.0, 2.0, 3.0, 4.0])
    se = np.std([1, 2, 3, 4], ddof=1) / 2
    assert out["mean"] == 2.5 and out["se"] == pytest.approx(se) and out["n"] == 4
    assert out["low"] == pytest.approx(2.5 - 1.959964 * se) and out["high"] == pytest.approx(2.5 + 1.959964 * se)
    assert mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.5)["high"] == pytest.approx(2.5 + 0.6744898 * se)


def test_mean_interval_standard_error_and_coverage():
    mu, sigma, n = 3.0, 2.0, 200
    outs = [mean_interval(np.random.default_rng(seed).normal(mu, sigma, n)) for seed in range(200)]
    assert np.mean([o["se"] for o in outs]) == pytest.approx(sigma / np.sqrt(n), rel=0.02)
    coverage = np.mean([o["low"] <= mu <= o["high"] for o in outs])
    assert 0.90 <= coverage <= 0.99


def test_bootstrap_interval_coverage_and_determinism():
    mu, sigma, n = 3.0, 2.0, 200
    outs = [bootstrap_interval(np.random.default_rng(seed).normal(mu, sigma, n), seed=seed) for seed in range(200)]
    coverage = np.mean([o["low"] <= mu <= o["high"] for o in outs])
    assert 0.90 <= coverage <= 0.99
    assert np.mean([o["se"] for o in outs]) == pytest.approx(sigma / np.sqrt(n), rel=0.03)
    values = np.random.default_rng(7).normal(mu, sigma, n)
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)
    assert bootstrap_interval(values, seed=1)["low"] != bootstrap_interval(values, seed=2)["low"]
    normal = mean_interval(values)  # on normal data the two intervals nearly agree
    boot = bootstrap_interval(values)
    assert abs(boot["low"] - normal["low"]) < 0.2 * normal["se"]
    assert abs(boot["high"] - normal["high"]) < 0.2 * normal["se"]
    median = bootstrap_interval(values, statistic=lambda x: float(np.median(x)), resamples=200)  # no `axis`
    assert median["low"] < np.median(values) < median["high"]


# --- FID gap ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref():
    return gaussian_stats(np.random.default_rng(10).normal(size=(5000, 64)))


def test_rooted_fid_equals_frechet_distance(ref):
    feats = np.random.default_rng(11).normal(0.2, 1.3, size=(300, 64))
    fid = _RootedFID(*ref)
    assert fid(feats, fid.prepare(feats)) == pytest.approx(frechet_distance(*gaussian_stats(feats), *ref), rel=1e-9)


def test_fid_gap_same_gaussian_contains_zero(ref):
    rng = np.random.default_rng(12)
    sched, full = rng.normal(size=(2000, 64)), rng.normal(size=(2000, 64))
    out = fid_gap_interval(sched, full, *ref)
    direct = frechet_distance(*gaussian_stats(sched), *ref) - frechet_distance(*gaussian_stats(full), *ref)
    assert out["estimate"] == direct and out["resamples"] == 200 and out["n"] == 2000
    assert out["low"] < 0 < out["high"]
    assert out == fid_gap_interval(sched, full, *ref)  # deterministic for a seed


def test_fid_gap_shifted_excludes_zero(ref):
    rng = np.random.default_rng(13)
    full = rng.normal(size=(2000, 64))
    sched = full + 0.15 + 0.1 * rng.normal(size=full.shape)  # paired: same noise, drifted by a clear amount
    out = fid_gap_interval(sched, full, *ref)
    assert out["estimate"] == pytest.approx(64 * 0.15 ** 2, rel=0.3)
    assert 0 < out["low"] < out["high"]
    exact = fid_gap_interval(full, full.copy(), *ref)  # pairing: the same rows give a zero-width interval
    assert exact["estimate"] == 0 and exact["low"] == exact["high"] == pytest.approx(0, abs=1e-9)


def test_fid_gap_basic_interval_covers_population_gap(ref):
    # FID is biased upwards on finite N, more for the wider set; the basic interval undoes the bias the
    # percentile interval doubles (see fid_gap_interval): population gap known in closed form here
    rng = np.random.default_rng(14)
    z = rng.normal(size=(300, 64))
    sched, full = 1.15 * z + 0.05 + 0.2 * rng.normal(size=z.shape), z
    population = (frechet_distance(np.full(64, 0.05), np.eye(64) * (1.15 ** 2 + 0.04), *ref)
                  - frechet_distance(np.zeros(64), np.eye(64), *ref))
    basic = fid_gap_interval(sched, full, *ref)
    percentile = fid_gap_interval(sched, full, *ref, method="percentile")
    assert basic["low"] < population < basic["high"]
    assert percentile["low"] > population and basic["bias"] > 0
    assert basic["debiased"] == pytest.approx(basic["estimate"] - basic["bias"])
    assert basic["low"] < basic["debiased"] < basic["high"]


# --- bad inputs -------------------------------------------------------------------------------------

def test_bad_shapes_raise_value_error(ref):
    img = torch.zeros(2, 1, 8, 8)
    bad_pixels = [(img, torch.zeros(2, 1, 8, 9)), (img[0], img[0]), (torch.zeros(2, 2, 8, 8),) * 2,
                  (torch.zeros(2, 1, 3, 8),) * 2, (torch.zeros(0, 1, 8, 8),) * 2, (img.numpy(), img.numpy())]
    for a, b in bad_pixels:
        with pytest.raises(ValueError):
            pixel_drift(a, b)
    with pytest.raises(ValueError):
        drift(img, torch.zeros(3, 1, 8, 8), extractor=get_extractor("digits-cnn"))
    for a, b in [(np.zeros(3), np.zeros(3)), (np.zeros((3, 2)), np.zeros((3, 3))), (np.zeros((0, 2)),) * 2]:
        with pytest.raises(ValueError):
            feature_drift(a, b)
    for values in [[1.0], np.zeros((3, 2)), [1.0, np.nan]]:
        with pytest.raises(ValueError):
            mean_interval(values)
        with pytest.raises(ValueError):
            bootstrap_interval(values)
    with pytest.raises(ValueError):
        mean_interval([1.0, 2.0], confidence=1.0)
    f = np.zeros((10, 64))
    for args in [(f, np.zeros((9, 64)), *ref), (f[:, :8], f[:, :8], *ref), (f[:1], f[:1], *ref),
                 (f, f, ref[0][:8], ref[1])]:
        with pytest.raises(ValueError):
            fid_gap_interval(*args)
    with pytest.raises(ValueError):
        fid_gap_interval(f, f, *ref, method="bca")
