"""The embedded 8x8 digits classifier; its penultimate layer, before the ReLU, is the FID/KID feature space."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_cnn.safetensors"
INFO_PATH = WEIGHTS_PATH.with_suffix(".json")
FEATURES = 64  # few dimensions: the Frechet distance's small-sample bias grows with the feature count
IMAGE_SHAPE = (1, 8, 8)


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers for 1x8x8 digits in [-1, 1]."""

    def __init__(self, features: int = FEATURES, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(64 * 2 * 2, features),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(features, classes))
        # set after training from the training images (centred, mean |x|^2 / dim = 1): raw activations are
        # about 10 in size, which makes KID's kernel (x.y / dim + 1)^3 explode and its estimate very noisy
        self.register_buffer("feature_shift", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate activations, taken before the ReLU, centred and scaled by the stored constants."""
        # before the ReLU: dead units would give zero-variance features and a singular covariance
        return (self.body(x) - self.feature_shift) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (from the raw activations: the feature scaling does not touch the classifier)."""
        return self.head(self.body(x))
