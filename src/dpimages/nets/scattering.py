"""Scattering features: a fixed wavelet transform that learns nothing from data (Mallat; Oyallon et al.).

Privacy contract: the transform's filters are a function of the image size
and of the public settings ``J`` (scales) and ``L`` (orientations) only, so
computing it on a private image is a per-example map with no parameters
fitted to any data and no privacy cost of its own. Whatever a release does
with the coefficients, its sensitivity is that release's (clipping bounds it).

The implementation is kymatio's `Scattering2D` (the reference one, pinned at
0.3.0). kymatio 0.3.0 imports ``scipy.special.sph_harm`` for its 3-D
transform at import time, and scipy 1.17 removed that name in favour of
``sph_harm_y``. `_scipy_shim` restores the old name as the documented
re-ordering of the new function (``sph_harm(m, n, theta, phi) ==
sph_harm_y(n, m, phi, theta)``) before kymatio is imported; the 2-D transform
used here never calls it. A shim keeps the maintained filter bank and avoids
pinning scipy below what the rest of the stack needs (docs/dp-mepf.md).

For a 28x28 image, J=2 and L=8 give 1 + J L + L^2 J (J - 1) / 2 = 81
coefficient maps of 7x7 per channel.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from dpimages.errors import InputError


def _scipy_shim() -> None:
    """Give scipy >= 1.17 the ``sph_harm`` name that kymatio 0.3.0 imports (see the module docstring)."""
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):
        def sph_harm(m, n, theta, phi):  # noqa: ANN001, ANN202 - scipy's own signature
            return scipy.special.sph_harm_y(n, m, phi, theta)

        scipy.special.sph_harm = sph_harm


@lru_cache(maxsize=8)
def _kymatio_scattering(height: int, width: int, scales: int, orientations: int):  # noqa: ANN202
    _scipy_shim()
    try:
        from kymatio.torch import Scattering2D as KymatioScattering2D
    except ImportError as err:  # pragma: no cover - kymatio is a dependency; this names a broken install
        raise InputError(f"features=scatter needs kymatio 0.3.0 (pip install kymatio==0.3.0): {err}") from None
    return KymatioScattering2D(J=scales, shape=(height, width), L=orientations)


def scatter_orders(scales: int = 2, orientations: int = 8) -> tuple[int, int, int]:
    """Coefficient maps per channel of orders 0, 1 and 2: ``(1, J L, L^2 J (J - 1) / 2)``."""
    return 1, scales * orientations, orientations**2 * scales * (scales - 1) // 2


def scatter_channels(channels: int, scales: int = 2, orientations: int = 8) -> int:
    """Coefficient maps per image: ``channels * sum(scatter_orders(J, L))``."""
    return channels * sum(scatter_orders(scales, orientations))


class Scattering(nn.Module):
    """Images (B, C, H, W) in [-1, 1] to scattering coefficients (B, C * K, H / 2^J, W / 2^J); no parameters.

    Images are mapped to [0, 1] first, so every coefficient is non-negative (order 0 is a low-pass
    of the image, orders 1 and 2 low-passed moduli).
    """

    def __init__(self, image_size: tuple[int, int], channels: int, scales: int = 2, orientations: int = 8) -> None:
        super().__init__()
        h, w = image_size
        if h % 2**scales or w % 2**scales:
            raise InputError(f"scattering with J={scales} needs image sides divisible by {2**scales}, got {h}x{w}")
        self.image_size = (h, w)
        self.channels = channels
        self.scales = scales
        self.orientations = orientations
        self.out_channels = scatter_channels(channels, scales, orientations)
        self.out_size = (h // 2**scales, w // 2**scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.channels, *self.image_size):
            raise InputError(f"scattering expects images of shape (B, {self.channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(x.shape)} {x.dtype}")
        transform = _kymatio_scattering(*self.image_size, self.scales, self.orientations)
        out = transform.to(x.device)(((x.float() + 1.0) * 0.5).contiguous())  # (B, C, K, H', W')
        return out.reshape(x.shape[0], self.out_channels, *self.out_size)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """`forward` in chunks of `chunk` images (a per-example map: chunking changes nothing)."""
        return torch.cat([self(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]) if len(x) else \
            x.new_zeros((0, self.out_channels, *self.out_size))
