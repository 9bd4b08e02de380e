"""Sample grids as PNG (one row per class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, labels: np.ndarray | None, num_classes: int, per_class: int = 10) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 image with a row of `per_class` samples per class."""
    n, h, w, c = images.shape
    if labels is None:
        rows = int(np.ceil(min(n, num_classes * per_class) / per_class))
        picks = [list(range(r * per_class, min(n, (r + 1) * per_class))) for r in range(rows)]
    else:
        picks = [np.flatnonzero(labels == k)[:per_class].tolist() for k in range(num_classes)]
    pad = 2
    grid = np.full((len(picks) * (h + pad) + pad, per_class * (w + pad) + pad, c), 255, np.uint8)
    for r, idx in enumerate(picks):
        for j, i in enumerate(idx):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    per_class: int = 10,
    scale: int = 2,
) -> Path:
    """Write a per-class grid PNG (upscaled by `scale` for viewing)."""
    grid = make_grid(images, labels, num_classes, per_class)
    im = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
