"""Feature extractors for FID/KID behind one interface: the embedded digits CNN and clean-fid's Inception.

clean-fid is imported only when the Inception extractor is built: its package pulls in torchvision,
which does not load with the CPU build of torch used here. Only the two clean-fid modules that do not
need torchvision are imported (`cleanfid.inception_torchscript`, `cleanfid.resize`), which is exactly
what clean-fid's own `build_feature_extractor("clean")` uses. Nothing is ever downloaded: the
Inception weights must already be on disk.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import DDSMError
from ..io import sha256_file
from .digits_cnn import FEATURES, IMAGE_SHAPE, WEIGHTS_PATH, DigitsCNN

EXTRACTORS = ("digits-cnn", "inception")
INCEPTION_ENV = "DDSM_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"  # the TorchScript file clean-fid downloads; it loads it by this name
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_BATCH = 64  # 299x299 inputs: bigger batches only cost memory


@runtime_checkable
class FeatureExtractor(Protocol):
    """Turns images in [-1, 1] (N, C, H, W) into feature rows; `key` names it (weights included) in cache keys."""

    name: str
    key: str
    dim: int

    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Return the (N, dim) float64 features of the images."""
        ...


class DigitsCNNExtractor:
    """Penultimate pre-ReLU activations of the embedded digits classifier (64 features, 1x8x8 images)."""

    name = "digits-cnn"
    dim = FEATURES

    def __init__(self, device: str = "cpu", weights: str | os.PathLike | None = None):
        from safetensors.torch import load_file

        path = Path(weights) if weights is not None else WEIGHTS_PATH
        if not path.is_file():
            raise DDSMError(f"digits classifier weights not found: {path} (run scripts/train_digits_classifier.py)")
        model = DigitsCNN()
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as err:  # a damaged file fails in safetensors or in load_state_dict; same meaning
            raise DDSMError(f"cannot load digits classifier weights {path}: {type(err).__name__}: {err}") from None
        self.model = model.to(device).eval()
        self.device = device
        self.key = f"digits-cnn-{sha256_file(path)[:16]}"

    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Return the (N, 64) float64 features of 1x8x8 images in [-1, 1]."""
        if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DDSMError(f"the digits-cnn extractor reads {'x'.join(map(str, IMAGE_SHAPE))} images, got "
                            f"{'x'.join(map(str, images.shape[1:]))}; use the inception extractor")
        with torch.inference_mode():
            rows = [self.model.features(chunk.to(self.device, torch.float32)).cpu() for chunk in images.split(batch_size)]
        return torch.cat(rows).double().numpy()


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Return the Inception TorchScript file: `weights`, else $DDSM_INCEPTION_WEIGHTS, else clean-fid's download spot."""
    given = weights if weights is not None else os.environ.get(INCEPTION_ENV)
    if given:
        path = Path(given).expanduser()
        path = path / INCEPTION_FILE if path.is_dir() else path
    else:  # where clean-fid itself saves the download, so a machine that ran clean-fid once needs no setting
        path = Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE
    if not path.is_file():
        raise DDSMError(f"Inception weights not found at {path}: download {INCEPTION_URL} on a machine with internet "
                        f"and set {INCEPTION_ENV} to the file (nothing is downloaded at run time)")
    if path.name != INCEPTION_FILE:
        raise DDSMError(f"clean-fid loads the Inception weights by the name {INCEPTION_FILE}; rename or link {path}")
    return path


def _import_cleanfid():
    """Return clean-fid's (InceptionV3W, build_resizer), or raise DDSMError saying why they do not import."""
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError as err:
        if (err.name or "").split(".")[0] == "cleanfid":
            raise DDSMError("the inception extractor needs clean-fid, which is not installed (pip install "
                            "'ddsm-search[inception]'; beside a CPU-only torch: pip install --no-deps clean-fid requests)"
                            ) from None
        raise DDSMError(f"clean-fid cannot be imported: {err} (it needs torchvision built for the installed torch)") from None
    except Exception as err:  # torchvision built for another torch fails with RuntimeError on import
        first = str(err).splitlines()[0] if str(err) else ""
        raise DDSMError(f"clean-fid cannot be imported: {type(err).__name__}: {first} (clean-fid imports torchvision, "
                        f"which does not load with this torch {torch.__version__})") from None
    return InceptionV3W, build_resizer


class InceptionExtractor:
    """clean-fid's Inception-v3 pool features (2048) in its "clean" mode: PIL bicubic resize to 299x299."""

    name = "inception"
    dim = 2048

    def __init__(self, device: str = "cpu", weights: str | os.PathLike | None = None):
        path = inception_weights_path(weights)
        inception_cls, build_resizer = _import_cleanfid()
        try:
            self.model = inception_cls(str(path.parent), download=False, resize_inside=False).to(device).eval()
        except Exception as err:  # torch.jit.load on a damaged file
            raise DDSMError(f"cannot load Inception weights {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        self.resize = build_resizer("clean")
        self.device = device
        self._path = path
        self._key: str | None = None

    @property
    def key(self) -> str:
        """Return 'inception-clean-' plus the start of the weights' SHA-256 (hashed once, on first use)."""
        if self._key is None:
            self._key = f"inception-clean-{sha256_file(self._path)[:16]}"
        return self._key

    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Return the (N, 2048) float64 features of 1- or 3-channel images in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DDSMError(f"the inception extractor reads 1- or 3-channel images, got shape {tuple(images.shape)}")
        rows = []
        for chunk in images.split(min(batch_size, INCEPTION_BATCH)):
            # clean-fid takes float pixels in [0, 255], H x W x 3, and resizes without quantising
            pixels = ((chunk.float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            resized = np.stack([self.resize(p) for p in pixels]).transpose(0, 3, 1, 2)
            with torch.inference_mode():
                rows.append(self.model(torch.from_numpy(np.ascontiguousarray(resized)).to(self.device)).cpu())
        return torch.cat(rows).double().numpy()


def get_extractor(name: str, device: str = "cpu", *, weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Return the feature extractor called `name` ('digits-cnn' or 'inception') on `device`."""
    if name == "digits-cnn":
        return DigitsCNNExtractor(device, weights)
    if name == "inception":
        return InceptionExtractor(device, weights)
    raise DDSMError(f"unknown feature extractor {name!r} (choose from {', '.join(EXTRACTORS)})")


def default_extractor_for(dataset_kind: str) -> str:
    """Return the default extractor name for a dataset kind: digits-cnn for digits, inception otherwise."""
    return "digits-cnn" if dataset_kind == "digits" else "inception"
