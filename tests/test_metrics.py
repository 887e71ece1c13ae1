"""Sample quality metrics: Frechet and kernel distances against closed forms, the embedded digits features,
reference statistics cached on disk (reused, rebuilt when stale or corrupt), extractor errors, seed sets."""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddsm_search.data import load_dataset
from ddsm_search.errors import DDSMError
from ddsm_search.io import cache_dir, sha256_file
from ddsm_search.metrics import (
    default_extractor_for,
    frechet_distance,
    gaussian_stats,
    get_extractor,
    is_heldout,
    kernel_distance,
    reference_stats,
    replicates,
    seed_for,
)
from ddsm_search.metrics.digits_cnn import INFO_PATH, WEIGHTS_PATH


@pytest.fixture(scope="module")
def digits():
    """The embedded extractor, the digits train and test splits, and the train reference (fresh cache)."""
    return get_extractor("digits-cnn"), load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    extractor, train, _ = digits
    return reference_stats(train, dataset="digits-train", split="train", extractor=extractor,
                           cache_dir=tmp_path_factory.mktemp("cache"))


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --- Frechet distance -------------------------------------------------------------------------------

def test_frechet_closed_forms():
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(1 + 1 + 4 - 2 * 2)
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    root = _sqrt_psd(s1)  # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), an independent route
    expected = np.trace(s1 + s2) - 2 * np.trace(_sqrt_psd(root @ s2 @ root))
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(np.ones(8), s1, np.ones(8), s1) == pytest.approx(0, abs=1e-9)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 10))  # 5 samples in 10 dimensions: rank-4 covariances
    mu1, s1 = gaussian_stats(feats)
    mu2, s2 = gaussian_stats(rng.normal(size=(5, 10)) + 1)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


# --- KID --------------------------------------------------------------------------------------------

def _naive_mmd(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_matches_the_unbiased_mmd_and_both_paths_agree():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.3
    # subsets as large as the sets: every subset is the whole set, so each estimate is the full MMD
    mean, std = kernel_distance(y, x, num_subsets=3)
    assert mean == pytest.approx(_naive_mmd(x, y), rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) + 0.2
    gram = kernel_distance(a, b, max_subset_size=100, num_subsets=20)
    loop = kernel_distance(a, b, max_subset_size=100, num_subsets=20, gram_rows=0)
    assert gram == pytest.approx(loop, rel=1e-9)
    assert kernel_distance(a, b, max_subset_size=100, num_subsets=20, seed=5) != gram


def test_kid_near_zero_for_the_same_distribution():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, spread = kernel_distance(a, b, max_subset_size=300, num_subsets=20)
    shifted, _ = kernel_distance(a, b + 0.5, max_subset_size=300, num_subsets=20)
    assert abs(same) < 3 * spread and shifted > 20 * abs(same)
    # identical sets share rows between the two subsets, which biases the estimate by O(k(x, x) / m) only
    ident, _ = kernel_distance(a, a, max_subset_size=300, num_subsets=20)
    assert abs(ident) < 3 * np.mean((np.einsum("ij,ij->i", a, a) / 8 + 1) ** 3) / 300 < shifted


# --- digits features and real data ------------------------------------------------------------------

def test_digits_weights_shipped_with_their_record(digits):
    info = json.loads(INFO_PATH.read_text())
    assert info["test_accuracy"] >= 0.97 and info["sha256"] == sha256_file(WEIGHTS_PATH)
    assert {"seed", "date", "command"} <= set(info)
    extractor, train, _ = digits
    assert extractor.key == f"digits-cnn-{info['sha256'][:16]}"
    feats = extractor.features(train.to_float(slice(0, 10)), batch_size=3)
    assert feats.shape == (10, 64) and feats.dtype == np.float64
    assert np.array_equal(feats, extractor.features(train.to_float(slice(0, 10)), batch_size=3))
    # other batch sizes take other float32 convolution kernels: equal up to rounding only
    assert np.allclose(feats, extractor.features(train.to_float(slice(0, 10))), rtol=1e-5, atol=1e-5)


def test_fid_of_real_digits(digits, reference):
    extractor, train, test = digits
    assert reference.score(extractor.features(train.to_float()), kid=False)["fid"] == pytest.approx(0, abs=1e-6)
    real = reference.score(extractor.features(test.to_float()))
    noise = reference.score(extractor.features(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1))
    assert 0 < real["fid"] < 3 and noise["fid"] > 10 * real["fid"] and noise["kid"] > 10 * abs(real["kid"])


def _blur(x, sigma):
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r**2 / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), (k[:, None] * k[None, :])[None, None])


def test_fid_rises_with_corruption(digits, reference):
    extractor, _, test = digits
    x = test.to_float()
    noisy = [(x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1) for s in (0.1, 0.3, 0.6)]
    blurred = [_blur(x, s) for s in (0.5, 1.0, 2.0)]
    for images in (noisy, blurred):
        fids = [reference.score(extractor.features(im), kid=False)["fid"] for im in [x, *images]]
        assert fids == sorted(fids) and fids[-1] > 3 * fids[0], fids


# --- the reference cache ----------------------------------------------------------------------------

class _Counting:
    """The digits extractor with a counter on `features` and a key that a test may change."""

    name = "digits-cnn"
    dim = 64

    def __init__(self, inner, key="digits-cnn-test"):
        self.inner, self.key, self.calls = inner, key, 0

    def features(self, images, batch_size=500):
        self.calls += 1
        return self.inner.features(images, batch_size)


def test_reference_cache_reused_and_rebuilt(digits, tmp_path, caplog):
    extractor, train, _ = digits
    counting = _Counting(extractor)
    make = lambda: reference_stats(train, dataset="digits-train", split="train", extractor=counting,  # noqa: E731
                                   n=200, cache_dir=tmp_path)
    first = make()
    assert counting.calls == 1 and first.key["count"] == 200 and first.path.is_file()
    mtime = first.path.stat().st_mtime_ns
    again = make()
    assert counting.calls == 1 and first.path.stat().st_mtime_ns == mtime, "the cache must be reused"
    assert np.array_equal(again.sigma, first.sigma) and np.array_equal(again.feats, first.feats)

    caplog.set_level(logging.WARNING, logger="ddsm_search.metrics.reference")
    counting.key = "digits-cnn-other-weights"
    make()
    assert counting.calls == 2 and "stale (extractor changed)" in caplog.text
    make()
    assert counting.calls == 2

    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])  # truncated
    make()
    assert counting.calls == 3 and "corrupt (checksum mismatch)" in caplog.text
    flipped = bytearray(first.path.read_bytes())
    flipped[-5] ^= 0xFF  # same length, one byte changed
    first.path.write_bytes(bytes(flipped))
    make()
    assert counting.calls == 4
    first.path.with_suffix(".json").write_text("{not json")
    make()
    assert counting.calls == 5 and "unreadable JSON" in caplog.text
    assert make().key["extractor"] == "digits-cnn-other-weights" and counting.calls == 5


def test_reference_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DDSM_SEARCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DDSM_SEARCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir().parts[-2:] == (".cache", "ddsm-search")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # one rule for every cache, XDG's included
    assert cache_dir() == tmp_path / "xdg" / "ddsm-search"
    from ddsm_search.backends.fused import cache_dir as kernels

    assert kernels() == tmp_path / "xdg" / "ddsm-search" / "kernels"


# --- extractors -------------------------------------------------------------------------------------

def test_extractor_choice_and_shape_errors(digits):
    assert default_extractor_for("digits") == "digits-cnn"
    assert default_extractor_for("cifar10") == default_extractor_for("folder") == "inception"
    with pytest.raises(DDSMError, match="unknown feature extractor 'vgg'"):
        get_extractor("vgg")
    with pytest.raises(DDSMError, match="reads 1x8x8 images, got 3x32x32"):
        digits[0].features(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DDSMError, match="digits classifier weights not found"):
        get_extractor("digits-cnn", weights="/nonexistent/w.safetensors")


def test_inception_weights_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("DDSM_INCEPTION_WEIGHTS", str(tmp_path / "inception-2015-12-05.pt"))
    with pytest.raises(DDSMError, match="Inception weights not found at .*DDSM_INCEPTION_WEIGHTS"):
        get_extractor("inception")
    other = tmp_path / "inception.pt"
    other.write_bytes(b"x")
    with pytest.raises(DDSMError, match="by the name inception-2015-12-05.pt"):
        get_extractor("inception", weights=other)


class _Refuse:
    """A meta-path finder that makes importing one module fail the way a broken torchvision does."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise self.error
        return None


@pytest.mark.parametrize("error, message", [
    (RuntimeError("operator torchvision::nms does not exist"), "clean-fid imports torchvision"),
    (ModuleNotFoundError("No module named 'cleanfid'", name="cleanfid"), "clean-fid, which is not installed"),
    (ModuleNotFoundError("No module named 'torchvision'", name="torchvision"), "needs torchvision"),
])
def test_cleanfid_import_errors(monkeypatch, tmp_path, error, message):
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"x")
    monkeypatch.delitem(sys.modules, "cleanfid.inception_torchscript", raising=False)
    package = types.ModuleType("cleanfid")  # installed or not (it is the inception extra), the package is found
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "cleanfid", package)
    monkeypatch.setattr(sys, "meta_path", [_Refuse("cleanfid.inception_torchscript", error), *sys.meta_path])
    with pytest.raises(DDSMError, match=message):
        get_extractor("inception", weights=weights)


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: `layers` maps 3x299x299 in [-1, 1] to 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2048))

    def forward(self, x):
        return self.layers(x)


def test_inception_plumbing_with_a_stand_in_network(tmp_path):
    pytest.importorskip("cleanfid.inception_torchscript")
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    extractor = get_extractor("inception", weights=tmp_path)  # a folder holding the file works too
    assert extractor.key == f"inception-clean-{sha256_file(path)[:16]}"
    gray = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)
    feats = extractor.features(gray, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.allclose(feats, extractor.features(gray.expand(3, 3, 8, 8)), atol=1e-5)  # gray = 3 equal channels


# --- seed sets --------------------------------------------------------------------------------------

def test_seed_sets():
    assert seed_for("search") == seed_for("search/0") != seed_for("search/1")
    search = {seed_for(s) for s in replicates("search", 10_000)}
    heldout = {seed_for(s) for s in replicates("heldout", 10_000)}
    assert len(search) == len(heldout) == 10_000 and not search & heldout
    assert replicates("search", 3) == ["search", "search/1", "search/2"]
    assert is_heldout("heldout/3") and not is_heldout("search")
    for bad in ("test", "search/x", "search/-1", "search/10000", ""):
        with pytest.raises(DDSMError, match="seed set"):
            seed_for(bad)
