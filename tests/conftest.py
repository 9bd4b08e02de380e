"""Shared test fixtures: an isolated calibration cache and tiny data sets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dpimages.data.toy import toy_bars

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """One calibration and evaluation-network cache per test session, shared by its xdist workers (each worker's
    base temp is a sub-folder of the session's; the caches write atomically)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    monkeypatch.setenv("DPIMAGES_CACHE", str(base / "cache"))


@pytest.fixture
def tiny_npz(tmp_path):
    """A 200-image, 10-class, 28x28 grayscale npz with learnable structure (`dpimages.data.toy.toy_bars`)."""
    d = toy_bars()
    path = tmp_path / "tiny.npz"
    np.savez(path, images=d.images, labels=d.labels, classes=np.array(d.classes))
    return path
