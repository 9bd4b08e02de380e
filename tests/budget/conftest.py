"""Fixtures of tests/budget: a budget book path in the test's own folder, and a small generated data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpimages.data.toy import toy_bars


@pytest.fixture
def book_path(tmp_path, monkeypatch) -> Path:
    """Where `DPIMAGES_BUDGET_BOOK` points for this test (the book is not created)."""
    path = tmp_path / "owner" / "budget.sqlite"
    monkeypatch.setenv("DPIMAGES_BUDGET_BOOK", str(path))
    return path


@pytest.fixture
def toy_npz(tmp_path) -> Path:
    """`toy_bars()` (200 labelled 28x28 images, 10 classes) as an npz with its class names."""
    d = toy_bars()
    path = tmp_path / "toy.npz"
    np.savez(path, images=d.images, labels=d.labels, classes=np.array(d.classes))
    return path
