"""Tests for ddsm_search.data: digits splits, CIFAR-10 batch parsing, image folders, error messages."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddsm_search.data import ImageData, dataset_key, load_dataset
from ddsm_search.errors import DDSMError

PER_BATCH = 4
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split=split) for split in ("train", "test", "all")}


def _rows(data: ImageData) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.images}


def test_digits_shapes_and_dtypes(digits):
    assert digits["train"].images.shape == (1497, 1, 8, 8)
    assert digits["test"].images.shape == (300, 1, 8, 8)
    assert len(digits["all"]) == 1797 and digits["all"].shape == (1, 8, 8)
    for data in digits.values():
        assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
        assert data.labels.dtype == torch.int64 and data.levels == 16 and data.name == "digits"


def test_digits_splits_disjoint_and_cover_all(digits):
    # the 1797 digits images are pairwise distinct, so comparing image bytes compares rows
    train, test, everything = _rows(digits["train"]), _rows(digits["test"]), _rows(digits["all"])
    assert len(everything) == 1797
    assert not train & test and train | test == everything
    assert torch.equal(digits["all"].images[:1497], digits["train"].images)


def test_digits_match_sklearn_bundle(digits):
    # fingerprints of sklearn's load_digits(): class counts and pixel total (importing sklearn costs ~2 s)
    everything = digits["all"]
    assert torch.bincount(everything.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert int(everything.images.sum()) == 561718


def test_digits_to_float_range(digits):
    floats = digits["all"].to_float()
    assert floats.dtype == torch.float32 and floats.shape == (1797, 1, 8, 8)
    assert floats.min().item() == -1.0 and floats.max().item() == 1.0
    assert torch.allclose(digits["all"].to_float(slice(0, 3)), floats[:3])


def test_digits_deterministic_and_limit(digits):
    again = load_dataset("digits", split="train")
    assert torch.equal(again.images, digits["train"].images) and torch.equal(again.labels, digits["train"].labels)
    small = load_dataset("digits", split="test", limit=10)
    assert torch.equal(small.images, digits["test"].images[:10])


def test_subset_keeps_labels(digits):
    part = digits["test"].subset(torch.tensor([5, 0, 7]))
    assert len(part) == 3 and part.images.is_contiguous()
    assert torch.equal(part.labels, digits["test"].labels[[5, 0, 7]])
    assert torch.equal(digits["test"].subset(slice(None, None, 2)).images, digits["test"].images[::2])


def test_digits_rejects_path_and_wrong_size():
    with pytest.raises(DDSMError, match="path"):
        load_dataset("digits", "/tmp/x")
    with pytest.raises(DDSMError, match="image_size"):
        load_dataset("digits", image_size=16)
    with pytest.raises(DDSMError, match="channel"):
        load_dataset("digits", channels=3)


# ---------------------------------------------------------------- cifar10


def _batch(seed: int) -> dict:
    data = np.random.default_rng(seed).integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
    return {b"batch_label": b"fake", b"data": data, b"labels": [(seed + i) % 10 for i in range(PER_BATCH)]}


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for seed, name in enumerate(CIFAR_FILES):
        batch = _batch(seed)
        if seed == 0:
            # known pixel: channel G (plane 1), row 5, column 7 of image 2
            batch[b"data"][2, 1 * 1024 + 5 * 32 + 7] = 201
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_cifar_layout_and_labels(cifar):
    train = load_dataset("cifar10", str(cifar))
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and train.levels == 255
    assert train.images[2, 1, 5, 7].item() == 201
    expected = np.concatenate([_batch(s)[b"data"] for s in range(5)]).reshape(-1, 3, 32, 32)
    expected[2, 1, 5, 7] = 201
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == [(s + i) % 10 for s in range(5) for i in range(PER_BATCH)]


def test_cifar_splits_and_limit(cifar):
    test = load_dataset("cifar10", str(cifar), split="test")
    assert np.array_equal(test.images.numpy().reshape(PER_BATCH, -1), _batch(5)[b"data"])
    assert len(load_dataset("cifar10", str(cifar), split="all")) == 6 * PER_BATCH
    assert len(load_dataset("cifar10", str(cifar.parent), split="test")) == PER_BATCH  # parent folder works
    assert len(load_dataset("cifar10", str(cifar), limit=6)) == 6


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DDSMError, match="nope"):
        load_dataset("cifar10", str(tmp_path / "nope"))


def test_cifar_missing_batch(cifar):
    (cifar / "data_batch_3").unlink()
    with pytest.raises(DDSMError, match="data_batch_3"):
        load_dataset("cifar10", str(cifar), limit=1)


def test_cifar_garbage_pickle(cifar):
    (cifar / "data_batch_2").write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(DDSMError, match="data_batch_2"):
        load_dataset("cifar10", str(cifar))


@pytest.mark.parametrize("batch", [
    {b"data": np.zeros((PER_BATCH, 3000), np.uint8), b"labels": [0] * PER_BATCH},  # wrong row length
    {b"data": np.zeros((PER_BATCH, 3072), np.uint8)},  # no labels
    {b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [0]},  # label count mismatch
    [1, 2, 3],  # not a dict
])
def test_cifar_malformed_batch(cifar, batch):
    (cifar / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DDSMError, match="test_batch"):
        load_dataset("cifar10", str(cifar), split="test")


def test_cifar_refuses_code_in_pickle(cifar):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (cifar / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DDSMError, match="test_batch"):
        load_dataset("cifar10", str(cifar), split="test")


# ---------------------------------------------------------------- folder


def _save(path, size, color, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "a.png", (12, 10), (255, 0, 0), "PNG")
    _save(root / "sub" / "b.JPG", (20, 30), (0, 255, 0), "JPEG")
    _save(root / "sub" / "deeper" / "c.jpeg", (9, 9), (0, 0, 255), "JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_resized_rgb(folder):
    data = load_dataset("folder", str(folder), image_size=8)
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8 and data.labels is None
    assert data.name == f"folder:{folder.resolve()}" and data.levels == 255
    # sorted path order: a.png (red), sub/b.JPG (green), sub/deeper/c.jpeg (blue)
    means = data.images.float().mean(dim=(2, 3))
    assert means.argmax(dim=1).tolist() == [0, 1, 2]
    assert torch.equal(load_dataset("folder", str(folder), split="train", image_size=8).images, data.images)


def test_folder_grayscale_and_limit(folder):
    data = load_dataset("folder", str(folder), image_size=4, channels=1, limit=2)
    assert data.images.shape == (2, 1, 4, 4)


def test_folder_same_size_needs_no_image_size(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.png", (5, 7), (i * 50, 0, 0), "PNG")
    data = load_dataset("folder", str(tmp_path), split="all")
    assert data.images.shape == (3, 3, 7, 5)
    assert data.images[:, 0, 0, 0].tolist() == [0, 50, 100]


def test_folder_mixed_sizes_without_image_size(folder):
    with pytest.raises(DDSMError, match="image_size") as info:
        load_dataset("folder", str(folder))
    assert "b.JPG" in str(info.value)


def test_folder_empty(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DDSMError, match="no .*images"):
        load_dataset("folder", str(tmp_path))


def test_folder_corrupt_image(folder):
    (folder / "sub" / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(DDSMError, match="broken.png"):
        load_dataset("folder", str(folder), image_size=8)


def test_folder_missing(tmp_path):
    with pytest.raises(DDSMError, match="missing_dir"):
        load_dataset("folder", str(tmp_path / "missing_dir"))


def test_folder_has_no_test_split(folder):
    with pytest.raises(DDSMError, match="test split"):
        load_dataset("folder", str(folder), split="test")


# ---------------------------------------------------------------- choices and keys


def test_bad_kind_and_split_list_choices():
    with pytest.raises(DDSMError, match="digits, cifar10, folder"):
        load_dataset("mnist")
    with pytest.raises(DDSMError, match=re.escape("train, test, all")):
        load_dataset("digits", split="val")
    with pytest.raises(DDSMError, match="path"):
        load_dataset("cifar10")
    with pytest.raises(DDSMError, match="limit"):
        load_dataset("digits", limit=0)


def test_dataset_key(tmp_path):
    assert dataset_key("digits", None, "train", None, None) == "digits-train"
    assert dataset_key("cifar10", str(tmp_path), "test", None, None) == f"cifar10-test-{tmp_path.resolve()}"
    assert dataset_key("folder", str(tmp_path), "train", 8, 1) == dataset_key("folder", str(tmp_path), "all", 8, 1)
    assert dataset_key("folder", str(tmp_path), "all", 8, 1) != dataset_key("folder", str(tmp_path), "all", 16, 1)
