"""DP-MEPF's generator objective: the distance of a batch's per-row mean features to the released means.

Post-processing only: the targets `m1` / `m2` are the released noisy means
(`release.Released.means`); nothing here reads private data. Model selection
uses `released_distance`, on a fixed-noise sample and the released means
only, never private or validation data.
"""

from __future__ import annotations

import torch

from dpimages.nets.feature_extractors import FeatureExtractor
from dpimages.nets.generators import ConditionalGenerator

SELECTION_SEED = 12345  # the fixed latent sample of `released_distance` (the same at every evaluation)


def matching_loss(
    extractor: FeatureExtractor, images: torch.Tensor, rows: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor | None,
    unbiased: bool,
) -> torch.Tensor:
    """Sum over the rows present in the batch of ||mean features - released mean||^2 (both moments).

    With `unbiased`, the squared norm of each row's batch mean is estimated
    without its diagonal terms (features have unit norm, so those are the
    constant 1/n): the MMD-style estimate that does not reward identical
    samples.
    """
    f1, f2 = extractor(images)
    total = torch.zeros((), device=images.device)
    for f, m in ((f1, m1), (f2, m2)):
        if f is None or m is None:
            continue
        k = m.shape[0]
        sums = torch.zeros(k, f.shape[1], device=f.device, dtype=f.dtype).index_add(0, rows, f)
        n = torch.bincount(rows, minlength=k).to(f.dtype)
        present = n > 0
        sums, n, mt = sums[present], n[present], m[present]
        sq = (sums * sums).sum(1)
        if unbiased:
            sq_mean = torch.where(n > 1, (sq - n) / (n * (n - 1)).clamp_min(1.0), sq / n**2)
        else:
            sq_mean = sq / n**2
        cross = (sums * mt).sum(1) / n
        total = total + (sq_mean - 2 * cross + (mt * mt).sum(1)).sum()
    return total


@torch.no_grad()
def released_distance(
    gen: ConditionalGenerator, extractor: FeatureExtractor, m1: torch.Tensor, m2: torch.Tensor | None, z_dim: int,
    n: int, device: torch.device,
) -> float:
    """Distance of a fixed-noise sample of `n` images (rows in turn) to the released means (selection criterion).

    Unbiased in the generator's own term (no diagonal), so that a less
    diverse sample is not preferred for its smaller batch variance.
    """
    g = torch.Generator().manual_seed(SELECTION_SEED)
    rows = torch.arange(n) % m1.shape[0]
    z = torch.randn(n, z_dim, generator=g)
    was = gen.training
    gen.eval()
    images = gen(z.to(device), rows.to(device))
    d = float(matching_loss(extractor, images, rows.to(device), m1, m2, unbiased=True))
    gen.train(was)
    return d
