"""A tiny generated labelled image set for tests, smoke fingerprints and examples (no download, no private data)."""

from __future__ import annotations

import numpy as np

from dpimages.data.imagedata import ImageData


def toy_bars(n: int = 200, num_classes: int = 10, seed: int = 0, shift: int = 0) -> ImageData:
    """`n` 28x28 grayscale images: class y is a bright bar at row ``2 + 2 * ((y + shift) % num_classes)``, plus
    uniform noise in [0, 30) drawn with `seed`. Labels cycle through the classes; class names are "0", "1", ..."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for i, y in enumerate(labels):
        row = 2 + 2 * ((int(y) + shift) % num_classes)
        images[i, row : row + 4, 4:24, 0] = 200
        images[i] = np.clip(images[i].astype(int) + rng.integers(0, 30, (28, 28, 1)), 0, 255)
    return ImageData(images, labels.astype(np.int64), [str(c) for c in range(num_classes)], "toy bars")
