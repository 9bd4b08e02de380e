"""Shared test fixtures: an isolated calibration cache and tiny data sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DPIMAGES_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_npz(tmp_path):
    """A 200-image, 10-class, 28x28 grayscale npz with learnable structure."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    images = np.zeros((200, 28, 28, 1), np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y : 6 + 2 * y, 4:24, 0] = 200
        images[i] = np.clip(images[i].astype(int) + rng.integers(0, 30, (28, 28, 1)), 0, 255)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images, labels=labels.astype(np.int64), classes=np.array([str(c) for c in range(10)]))
    return path
