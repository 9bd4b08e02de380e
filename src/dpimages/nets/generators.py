"""Label-conditional image generators (DCGAN- and ResNet-style).

These generators are trained only on released (noised) statistics, never on
private images, so BatchNorm is allowed: it mixes synthetic examples only.
Outputs are images (N, C, H, W) in [-1, 1] (tanh).

Layout: latent z and a learned label embedding -> linear -> a (4*ch, h/4,
w/4) map -> two x2 upsampling stages (to 2*ch, then ch channels) -> a 3x3
conv to C channels -> tanh; odd sizes are centre-cropped to (H, W).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpimages.errors import InputError


class _UpConv(nn.Module):
    """DCGAN-style stage: nearest x2 upsampling, 3x3 conv, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))))


class _UpRes(nn.Module):
    """ResNet-style stage: BN-ReLU-up-conv-BN-ReLU-conv plus an upsampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.skip(up)


class ConditionalGenerator(nn.Module):
    """G(z, y): label-conditional generator of (C, H, W) images in [-1, 1]."""

    def __init__(
        self,
        image_shape_chw: tuple[int, int, int],
        num_classes: int,
        z_dim: int = 32,
        channels: int = 64,
        kind: str = "dcgan",
    ) -> None:
        super().__init__()
        if kind not in ("dcgan", "resnet"):
            raise InputError(f"generator must be 'dcgan' or 'resnet', got {kind!r}")
        c, h, w = (int(v) for v in image_shape_chw)
        if min(h, w) < 4:
            raise InputError(f"generator image size must be at least 4x4, got {h}x{w}")
        if num_classes < 1 or z_dim < 1 or channels < 1:
            raise InputError(f"num_classes, z_dim and channels must be >= 1, got {num_classes}, {z_dim}, {channels}")
        self.image_shape_chw = (c, h, w)
        self.num_classes, self.z_dim, self.channels, self.kind = int(num_classes), int(z_dim), int(channels), kind
        self.h0, self.w0 = -(-h // 4), -(-w // 4)
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, 4 * channels * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(4 * channels)
        stage = _UpConv if kind == "dcgan" else _UpRes
        self.up1 = stage(4 * channels, 2 * channels)
        self.up2 = stage(2 * channels, channels)
        self.out_bn = nn.BatchNorm2d(channels) if kind == "resnet" else nn.Identity()
        self.out = nn.Conv2d(channels, c, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim or labels.shape != (z.shape[0],):
            raise InputError(f"generator needs z (N, {self.z_dim}) and labels (N,), got {tuple(z.shape)} "
                             f"and {tuple(labels.shape)}")
        x = self.fc(torch.cat([z, self.embed(labels)], dim=1)).view(-1, 4 * self.channels, self.h0, self.w0)
        x = F.relu(self.bn0(x))
        x = self.up2(self.up1(x))
        x = self.out(F.relu(self.out_bn(x)) if self.kind == "resnet" else x)
        _, h, w = self.image_shape_chw
        if x.shape[2] != h or x.shape[3] != w:
            top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
            x = x[:, :, top : top + h, left : left + w]
        return torch.tanh(x)

    def config(self) -> dict:
        return {"image_shape_chw": list(self.image_shape_chw), "num_classes": self.num_classes, "z_dim": self.z_dim,
                "channels": self.channels, "kind": self.kind}
