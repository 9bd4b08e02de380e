"""Memorization check: exact nearest neighbours, copies flagged, fresh real images not flagged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dpimages.eval.memorization import memorization_report, nearest_neighbours


@pytest.fixture(scope="module")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    from dpimages.data import load

    train, test = load("fashion-mnist"), load("fashion-mnist:test")
    return train.images[:5000], test.images[:1000]


def test_nearest_neighbours_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
    r = rng.integers(0, 256, (101, 8, 8, 1), dtype=np.uint8)
    d, i = nearest_neighbours(q, r, chunk=10, ref_chunk=30)
    full = np.sqrt((((q.reshape(37, 1, -1) - r.reshape(1, 101, -1).astype(np.float64)) / 255.0) ** 2).sum(-1))
    np.testing.assert_array_equal(i, full.argmin(1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-5)


def test_exact_copy_has_distance_zero() -> None:
    rng = np.random.default_rng(1)
    r = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    d, i = nearest_neighbours(r[[7, 3]], r)
    assert d.tolist() == [0.0, 0.0] and i.tolist() == [7, 3]


def test_copy_of_private_set_is_flagged(fmnist, tmp_path) -> None:  # noqa: ANN001
    private, heldout = fmnist
    copies = private[np.random.default_rng(2).choice(len(private), 500, replace=False)]
    rep = memorization_report(copies, private, heldout, pairs_png=tmp_path / "pairs.png")
    assert rep["flagged"] is True
    assert rep["frac_closer_than_heldout_p1"] == 1.0 and rep["n_exact_copies"] == 500
    with Image.open(rep["pairs_png"]) as im:
        assert im.size[0] > im.size[1] > 0  # 16 pairs side by side
    assert len(rep["pairs_distances"]) == 16


def test_fresh_real_images_are_not_flagged(fmnist) -> None:  # noqa: ANN001
    private, heldout = fmnist
    rep = memorization_report(heldout[:500], private, heldout[500:])
    assert rep["flagged"] is False
    assert rep["frac_closer_than_heldout_p1"] < 0.05
    assert rep["pairs_png"] is None


def test_noise_is_far_from_private_images(fmnist) -> None:  # noqa: ANN001
    private, heldout = fmnist
    noise = np.random.default_rng(3).integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    rep = memorization_report(noise, private, heldout)
    assert rep["frac_closer_than_heldout_p1"] == 0.0
    assert rep["synthetic_nn_median"] > 2 * rep["heldout_nn_median"]
