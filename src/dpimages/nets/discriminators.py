"""Discriminators split in two: a front f1 (image -> feature vector) and a back f2 (feature vector -> score).

Used by DPAF (`dpimages.methods.dpaf`), whose forward pass aggregates f1's
per-image features privately before f2 sees them:

* `FrontFeatures` (f1): conv blocks (4x4 stride-2 conv, GroupNorm,
  LeakyReLU) and a 1x1 conv to ``feature_channels`` channels, flattened to one
  feature vector per image of dimension ``feature_channels * h' * w'``
  (h' = h // 2**len(channels)). GroupNorm only: f1 is trained with
  per-example DP-SGD, so no layer may mix the examples of a batch.
* `BackHead` (f2): takes feature vectors (one image's, or a noisy mean of
  many), reshapes them to the feature map, applies two conv layers and a
  label-conditional projection head (Miyato & Koyama 2018):
  ``score(h, y) = w . phi(h) + b + embed(y) . phi(h)``. No normalisation
  layer, so it works both on aggregates and under per-example DP-SGD.
* `SplitDiscriminator`: ``f2(clip(f1(x)), y)`` per image, with the same
  feature clipping as the aggregation (`dpimages.clipping.clip_rows`);
  the plain DP-SGD discriminator of DPAF's ablation.

All take float images (N, C, H, W) in [-1, 1]; all are vmap-friendly
(``torch.func``), so the DP-SGD engine can compute per-example gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dpimages.clipping import clip_rows
from dpimages.errors import InputError
from dpimages.nets.classifiers import group_count


class FrontFeatures(nn.Module):
    """f1: ``len(channels)`` x (conv 4x4/2, GroupNorm, LeakyReLU 0.2), then a 1x1 conv; flattened per image."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        channels: tuple[int, ...] = (32, 64),
        feature_channels: int = 16,
        groups: int = 8,
    ) -> None:
        super().__init__()
        h, w = (int(v) for v in image_size)
        if not channels or any(c < 1 for c in channels) or feature_channels < 1:
            raise InputError(f"f1 channels must be positive ints, got {list(channels)} and {feature_channels}")
        if min(h, w) // 2 ** len(channels) < 1:
            raise InputError(f"f1 with {len(channels)} stride-2 blocks needs images of at least "
                             f"{2 ** len(channels)} pixels per side, got {h}x{w}")
        layers: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            layers += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.GroupNorm(group_count(c, groups), c),
                       nn.LeakyReLU(0.2)]
            cin = c
        layers.append(nn.Conv2d(cin, feature_channels, 1))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():  # shapes only, no data
            out = self.net(torch.zeros(1, in_channels, h, w))
        self.feature_shape: tuple[int, int, int] = tuple(out.shape[1:])  # type: ignore[assignment]
        self.dim = int(out.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, dim) feature vectors."""
        return self.net(x).flatten(1)


class BackHead(nn.Module):
    """f2: feature vector (N, dim) and labels (N,) -> one score per row (higher: more real)."""

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int] = (32, 64),
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in feature_shape)
        if num_classes < 1 or len(channels) != 2 or min(channels) < 1:
            raise InputError(f"f2 needs num_classes >= 1 and two positive channel counts, got {num_classes}, "
                             f"{list(channels)}")
        self.feature_shape = (c, h, w)
        self.input_scale = float(input_scale)
        self.conv1 = nn.Conv2d(c, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2 if min(h, w) >= 4 else 1, padding=1)
        with torch.no_grad():
            n_flat = self._phi(torch.zeros(1, c * h * w)).shape[1]
        self.linear = nn.Linear(n_flat, 1)
        self.embed = nn.Embedding(num_classes, n_flat)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(n_flat))

    def _phi(self, v: torch.Tensor) -> torch.Tensor:
        x = (v * self.input_scale).view(v.shape[0], *self.feature_shape)
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        return x.flatten(1)

    def forward(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if v.ndim != 2 or v.shape[1] != math.prod(self.feature_shape) or labels.shape != (v.shape[0],):
            raise InputError(f"f2 needs features (N, {math.prod(self.feature_shape)}) and labels (N,), got "
                             f"{tuple(v.shape)} and {tuple(labels.shape)}")
        phi = self._phi(v)
        return self.linear(phi).squeeze(1) + (self.embed(labels) * phi).sum(1)


class SplitDiscriminator(nn.Module):
    """D(x, y) = f2(clip(f1(x), C_f), y) per image: the whole discriminator as one module (for DP-SGD)."""

    def __init__(self, f1: FrontFeatures, f2: BackHead, feature_clip: float) -> None:
        super().__init__()
        if not feature_clip > 0:
            raise InputError(f"feature_clip must be > 0, got {feature_clip}")
        self.f1 = f1
        self.f2 = f2
        self.feature_clip = float(feature_clip)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.f2(clip_rows(self.f1(x), self.feature_clip), labels)
