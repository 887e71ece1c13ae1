"""Datasets as uint8 image tensors: embedded sklearn digits, CIFAR-10 python batches, image folders."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DDSMError

KINDS = ("digits", "cifar10", "folder")
SPLITS = {"digits": ("train", "test", "all"), "cifar10": ("train", "test", "all"), "folder": ("all", "train")}
DIGITS_TEST = 300
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
CIFAR_ROW = 3 * 32 * 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# The only globals a CIFAR batch pickle needs: anything else would run arbitrary code on load.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


@dataclass(frozen=True)
class ImageData:
    """Images as uint8 N x C x H x W with their value range, plus labels if known."""

    name: str
    images: torch.Tensor
    levels: int
    labels: torch.Tensor | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        """Return the number of images."""
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Return the shape of one image as (C, H, W)."""
        return tuple(self.images.shape[1:])

    def to_float(self, index=None) -> torch.Tensor:
        """Return the selected images (all if index is None) as float32 in [-1, 1]."""
        images = self.images if index is None else self.images[index]
        return images.float() / self.levels * 2 - 1

    def subset(self, index) -> "ImageData":
        """Return an ImageData with only the rows selected by a LongTensor, bool mask or slice."""
        labels = None if self.labels is None else self.labels[index].contiguous()
        return ImageData(self.name, self.images[index].contiguous(), self.levels, labels)


def load_dataset(kind: str, path: str | None = None, *, split: str = "train", image_size: int | None = None,
                 channels: int | None = None, limit: int | None = None) -> ImageData:
    """Return the `split` of dataset `kind` (digits, cifar10, folder), keeping at most `limit` images."""
    _check_choice(kind, split)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DDSMError(f"limit must be a positive integer, got {limit!r}")
    if kind == "digits":
        if path is not None:
            raise DDSMError(f"dataset 'digits' is embedded and takes no path, got {path!r}")
        _check_fixed("digits", image_size, channels, 8, 1)
        return _load_digits(split, limit)
    if path is None:
        raise DDSMError(f"dataset '{kind}' needs a path")
    if kind == "cifar10":
        _check_fixed("cifar10", image_size, channels, 32, 3)
        return _load_cifar10(Path(path).expanduser(), split, limit)
    return _load_folder(Path(path).expanduser(), image_size, 3 if channels is None else channels, limit)


def load_data(data, split: str | None = None) -> ImageData:
    """Return the images of an experiment's data section (a config.DataConfig): its own split (default),
    its limit applied, or another `split` of the same dataset, whole (a held-out test split, say)."""
    split = data.split if split is None else split
    return load_dataset(data.kind, data.path, split=split, image_size=data.image_size, channels=data.channels,
                        limit=data.limit if split == data.split else None)


def data_key(data) -> str:
    """Return the cache key of an experiment's data section (see `dataset_key`)."""
    return dataset_key(data.kind, data.path, data.split, data.image_size, data.channels)


def dataset_key(kind: str, path: str | None, split: str, image_size: int | None, channels: int | None) -> str:
    """Return a short stable string naming a dataset, for use as a cache key."""
    if kind == "digits":
        return f"digits-{split}"
    where = str(Path(path).expanduser().resolve()) if path is not None else "none"
    if kind == "folder":
        # a folder's "train" split is all of it: one key so both share a cache entry
        return f"folder-all-{image_size or 'native'}px-{channels or 3}ch-{where}"
    return f"{kind}-{split}-{where}"


def _check_choice(kind: str, split: str) -> None:
    if kind not in SPLITS:
        raise DDSMError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if split not in SPLITS[kind]:
        hint = " (image folders have no test split)" if kind == "folder" and split == "test" else ""
        raise DDSMError(f"unknown split {split!r} for dataset '{kind}'{hint}; choose one of {', '.join(SPLITS[kind])}")


def _check_fixed(kind: str, image_size, channels, size: int, chans: int) -> None:
    # these datasets are used at their native resolution; silently resizing would skew FID references
    if image_size not in (None, size):
        raise DDSMError(f"dataset '{kind}' has image_size {size}, got image_size={image_size}")
    if channels not in (None, chans):
        raise DDSMError(f"dataset '{kind}' has {chans} channel(s), got channels={channels}")


def _load_digits(split: str, limit: int | None) -> ImageData:
    pixels, target = _digits_arrays()
    order = np.random.default_rng(0).permutation(len(pixels))
    cut = len(order) - DIGITS_TEST
    order = {"train": order[:cut], "test": order[cut:], "all": order}[split][:limit]
    images = torch.from_numpy(pixels[order].reshape(-1, 1, 8, 8).copy())
    return ImageData("digits", images, 16, torch.from_numpy(target[order].copy()))


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as uint8 pixels (1797, 64) and int64 labels (1797,), read once per process."""
    from sklearn.datasets import load_digits  # its public API: the file it reads is sklearn's own business

    digits = load_digits()
    pixels, target = digits.data.astype(np.uint8), digits.target.astype(np.int64)
    pixels.flags.writeable = target.flags.writeable = False  # shared by every caller: nobody may change it
    return pixels, target


def _load_cifar10(root: Path, split: str, limit: int | None) -> ImageData:
    # accept the folder that contains cifar-10-batches-py as well as the batches folder itself
    if not (root / CIFAR_TRAIN[0]).exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DDSMError(f"CIFAR-10 folder not found: {root}")
    names = {"train": CIFAR_TRAIN, "test": CIFAR_TEST, "all": CIFAR_TRAIN + CIFAR_TEST}[split]
    files = [root / name for name in names]
    for file in files:  # check all up front so a missing batch is reported even when limit is small
        if not file.is_file():
            raise DDSMError(f"CIFAR-10 batch file not found: {file}")
    datas, labels, count = [], [], 0
    for file in files:
        data, batch_labels = _read_cifar_batch(file)
        datas.append(data)
        labels.extend(batch_labels)
        count += len(data)
        if limit is not None and count >= limit:
            break
    data = np.concatenate(datas)[:limit].reshape(-1, 3, 32, 32)
    return ImageData("cifar10", torch.from_numpy(data.copy()), 255, torch.tensor(labels[:limit], dtype=torch.int64))


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with open(file, "rb") as fh:
            batch = _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # garbage bytes can fail in many ways; all mean the same to the user
        raise DDSMError(f"cannot read CIFAR-10 batch {file}: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DDSMError(f"malformed CIFAR-10 batch {file}: expected a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DDSMError(f"malformed CIFAR-10 batch {file}: b'data' must be uint8 (N, {CIFAR_ROW}), got {got}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data):
        raise DDSMError(f"malformed CIFAR-10 batch {file}: b'labels' must list one label per image")
    return data, [int(label) for label in labels]


def _load_folder(root: Path, image_size: int | None, channels: int, limit: int | None) -> ImageData:
    if channels not in (1, 3):
        raise DDSMError(f"channels must be 1 or 3 for an image folder, got {channels}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DDSMError(f"image_size must be a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise DDSMError(f"image folder not found: {root}")
    files = _image_files(root)[:limit]
    if not files:
        raise DDSMError(f"no .png/.jpg/.jpeg images found in {root}")
    arrays = []
    for file in files:
        array = _read_image(file, image_size, "RGB" if channels == 3 else "L")
        if arrays and array.shape != arrays[0].shape:
            raise DDSMError(f"image {file} is {array.shape[1]}x{array.shape[0]} but {files[0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; set image_size to resize all images")
        arrays.append(array)
    stacked = np.stack(arrays)
    images = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return ImageData(f"folder:{root.resolve()}", torch.from_numpy(np.ascontiguousarray(images)), 255)


def _image_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    # sort by relative path so the order (and any limit) does not depend on where the folder lives
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_image(file: Path, image_size: int | None, mode: str) -> np.ndarray:
    from PIL import Image, ImageOps  # deferred: only image folders need Pillow

    try:
        with Image.open(file) as img:
            img = ImageOps.exif_transpose(img).convert(mode)  # phone photos store rotation in EXIF
            if image_size is not None:
                img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DDSMError(f"cannot read image {file}: {err}") from None
