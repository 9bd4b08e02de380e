"""Fidelity metrics on feature vectors: Frechet distance, KID, precision and recall.

All functions take feature arrays (N, D) from one feature network; numbers
from different feature networks are not comparable and are never mixed.

- Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale
  update rule"): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with
  the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
  subsets.
- Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and
  recall metric for assessing generative models"): k-NN balls around each
  real (resp. synthetic) feature; precision is the fraction of synthetic
  features inside some real ball, recall the fraction of real features
  inside some synthetic ball.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the
    eigenvalues of the symmetric matrix S1^(1/2) S2 S1^(1/2) (same spectrum
    as S1 S2), which avoids the complex round-off of a general `sqrtm`.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def kid(
    real: np.ndarray, fake: np.ndarray, *, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over `n_subsets` random subsets)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(real)} real and {len(fake)} fake")
    d = real.shape[1]
    values = []
    for _ in range(n_subsets):
        x = torch.from_numpy(np.asarray(real[rng.choice(len(real), m, replace=False)], np.float64))
        y = torch.from_numpy(np.asarray(fake[rng.choice(len(fake), m, replace=False)], np.float64))
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (
            (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
        values.append(float(mmd))
    return float(np.mean(values)), float(np.std(values))


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest other row."""
    out = torch.empty(len(x), dtype=x.dtype)
    for i in range(0, len(x), chunk):
        d = _pairwise_sq(x[i : i + chunk], x)
        # the k+1-th smallest includes the point itself at distance 0
        out[i : i + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return out


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    inside = 0
    for i in range(0, len(points), chunk):
        d = _pairwise_sq(points[i : i + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, max_n: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """k-NN precision and recall (Kynkaanniemi et al. 2019) on at most `max_n` features per set."""
    rng = np.random.default_rng(seed)
    n = min(max_n, len(real), len(fake))
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {n}")
    r = torch.from_numpy(np.asarray(real[rng.choice(len(real), n, replace=False)], np.float32))
    f = torch.from_numpy(np.asarray(fake[rng.choice(len(fake), n, replace=False)], np.float32))
    precision = _coverage(f, r, knn_radii(r, k))
    recall = _coverage(r, f, knn_radii(f, k))
    return precision, recall
