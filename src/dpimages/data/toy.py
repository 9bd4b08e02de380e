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


def toy_other_bars() -> ImageData:
    """Another `toy_bars()` set of the same size: other pixels, other labels and other class counts (class 0
    gains every 7th image): the contract's second private set (`dpimages.testing`)."""
    bars = toy_bars(seed=5, shift=5)
    labels = bars.labels.copy()
    labels[::7] = 0
    return ImageData(bars.images, labels, bars.classes, "other toy bars")


SHAPE_CLASSES = ("circle", "square", "stripes")


def toy_shapes(per_class: int, size: int = 32, seed: int = 0) -> ImageData:
    """`3 * per_class` RGB images of `size` x `size` pixels in three classes: a red disc, a green square, blue
    vertical stripes, on uniform noise in [0, 40) drawn with `seed` (the folder of the own-data walkthrough)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    scale = size / 32
    images = np.empty((3 * per_class, size, size, 3), np.uint8)
    labels = np.repeat(np.arange(3), per_class)
    for i, c in enumerate(labels):
        img = rng.integers(0, 40, (size, size, 3))
        cy, cx = (rng.integers(12, 20, 2) * scale).astype(int)
        if c == 0:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49 * scale**2, 0] = 220
        elif c == 1:
            r = int(6 * scale)
            img[cy - r : cy + r, cx - r : cx + r, 1] = 220
        else:
            img[(xx // int(4 * scale)) % 2 == 0, 2] = 220
        images[i] = img
    return ImageData(images, labels.astype(np.int64), list(SHAPE_CLASSES), f"toy shapes {size}x{size}")
