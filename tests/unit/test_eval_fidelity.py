"""Frechet distance, KID and k-NN precision/recall on feature arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dpimages.eval.fidelity import feature_stats, frechet_distance, kid, knn_radii, precision_recall


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=8), _random_cov(rng, 8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_mean_shift_and_diagonal_closed_form() -> None:
    mu1, mu2 = np.zeros(4), np.array([1.0, 2.0, 0.0, -1.0])
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = 6.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_sqrtm_formula() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = _random_cov(rng, 16), _random_cov(rng, 16)
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_feature_stats_shapes() -> None:
    mu, s = feature_stats(np.random.default_rng(2).normal(size=(100, 5)).astype(np.float32))
    assert mu.shape == (5,) and s.shape == (5, 5) and mu.dtype == np.float64


def test_kid_near_zero_for_same_distribution_and_large_for_shifted() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same, _ = kid(x, y, n_subsets=20, subset_size=500)
    shifted, _ = kid(x, y + 1.0, n_subsets=20, subset_size=500)
    assert abs(same) < 0.05
    assert shifted > 20 * max(abs(same), 1e-3)


def test_knn_radii_excludes_the_point_itself() -> None:
    import torch

    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 4.0]  # squared distances


def test_precision_recall_identical_disjoint_and_collapsed() -> None:
    rng = np.random.default_rng(4)
    real = rng.normal(size=(1000, 8))
    p, r = precision_recall(real, real.copy(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    collapsed = np.repeat(real[:5], 200, axis=0) + 1e-3 * rng.normal(size=(1000, 8))  # mode collapse
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.2
