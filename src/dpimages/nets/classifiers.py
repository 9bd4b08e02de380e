"""Small DP-friendly classifiers: a GroupNorm/tanh CNN and an MLP.

Both contain no layer that mixes the examples of a batch (no BatchNorm), so
they work with per-example gradients (`dpimages.privacy.dpsgd`). They take
float images (N, C, H, W) in [-1, 1] and return logits (N, num_classes).
They are general (any image size >= 16 pixels, 1 or 3 channels) and are
reused by downstream evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from dpimages.errors import InputError


def group_count(channels: int, groups: int) -> int:
    """GroupNorm's number of groups for `channels` channels: the largest divisor of `channels` that is <= `groups`
    (the one helper of every network here)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class SmallCNN(nn.Module):
    """Papernot et al.'s tempered-sigmoid CNN (2021) with GroupNorm: ~26k parameters at 28x28x1.

    conv 8x8/2 (c1) - GN - tanh - maxpool 2/1 - conv 4x4/2 (c2) - GN - tanh -
    maxpool 2/1 - linear (hidden) - tanh - linear (classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 32,
        groups: int = 4,
    ) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if min(h, w) < 16:
            raise InputError(f"SmallCNN needs images of at least 16x16 pixels, got {h}x{w}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 8, stride=2, padding=3),
            nn.GroupNorm(group_count(c1, groups), c1),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(c1, c2, 4, stride=2),
            nn.GroupNorm(group_count(c2, groups), c2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        with torch.no_grad():  # shapes only, no data
            n_flat = self.features(torch.zeros(1, in_channels, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ScatterCNN(nn.Module):
    """Tramer and Boneh's (2021) classifiers on scattering coefficients, not on pixels.

    Input: coefficients (N, K, h, w) from `dpimages.nets.scattering.Scattering` (computed once per image,
    outside the model). GroupNorm (a per-example normalisation, ``groups`` groups, no batch statistics),
    then with ``channels=()`` a linear layer ("ScatterNet+linear"), else conv 3x3 (c1) - tanh - maxpool 2 -
    conv 3x3 (c2) - tanh - linear (hidden) - tanh - linear (classes) ("ScatterNet+CNN").
    """

    def __init__(self, in_channels: int = 81, num_classes: int = 10, size: tuple[int, int] = (7, 7),
                 channels: tuple[int, ...] = (), hidden: int = 32, groups: int = 27) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.GroupNorm(group_count(in_channels, groups), in_channels)]
        if channels:
            c1, c2 = channels
            layers += [nn.Conv2d(in_channels, c1, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                       nn.Conv2d(c1, c2, 3, padding=1), nn.Tanh()]
        self.features = nn.Sequential(*layers)
        with torch.no_grad():  # shapes only, no data
            n_flat = self.features(torch.zeros(1, in_channels, *size)).numel()
        self.head = (nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
                     if channels else nn.Sequential(nn.Flatten(), nn.Linear(n_flat, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten - (linear - tanh) x len(hidden) - linear."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
