"""Memorization check: are synthetic images closer to private training images than fresh real images are?

For each synthetic image, the Euclidean distance in pixel space (pixels
scaled to [0, 1]) to its nearest private training image; the same for real
held-out images (never seen by the generator). A generator that copies its
training data puts many synthetic images closer to the private set than
almost any held-out image is: the headline number is the fraction of
synthetic images closer than the 1st percentile of the held-out distances
(about 0.01 for a generator that behaves like fresh data, 1.0 for a copy).

The PNG of the closest pairs shows private training images: it is for the
data owner's eyes and must not be published with the results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FLAG_FRACTION = 0.05  # flagged when 5x more synthetic images than expected fall below the real 1st percentile
METRIC = "l2 in pixel space, pixels scaled to [0, 1]"


def _flat(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float().div_(255.0)


def nearest_neighbours(
    queries: np.ndarray, reference: np.ndarray | torch.Tensor, *, chunk: int = 1024, ref_chunk: int = 16384,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest `reference` image for each of `queries` (uint8, same shape).

    Candidates come from ||q||^2 + ||r||^2 - 2 q.r in float32 (fast matrix
    products); the reported distance is then recomputed exactly for the chosen
    neighbour, so an exact copy has distance 0. `reference` may also be given
    already flattened to float32 in [0, 1] (N, H*W*C), to reuse it.
    """
    r = reference if isinstance(reference, torch.Tensor) else _flat(reference)
    r_sq = (r * r).sum(1)
    best_d = np.empty(len(queries), np.float32)
    best_i = np.empty(len(queries), np.int64)
    for i in range(0, len(queries), chunk):
        q = _flat(queries[i : i + chunk])
        q_sq = (q * q).sum(1, keepdim=True)
        cur_d = torch.full((len(q),), float("inf"))
        cur_i = torch.zeros(len(q), dtype=torch.long)
        for j in range(0, len(r), ref_chunk):
            d = q_sq + r_sq[None, j : j + ref_chunk] - 2 * q @ r[j : j + ref_chunk].T
            m, a = d.min(1)
            better = m < cur_d
            cur_d[better], cur_i[better] = m[better], a[better] + j
        exact = (q - r[cur_i]).pow(2).sum(1).sqrt()
        best_d[i : i + len(q)], best_i[i : i + len(q)] = exact.numpy(), cur_i.numpy()
        if progress:
            progress(len(q))
    return best_d, best_i


def save_pairs_png(path: str | Path, synthetic: np.ndarray, private: np.ndarray, scale: int = 3) -> Path:
    """Two rows: synthetic images on top, their nearest private images below."""
    n, h, w, c = synthetic.shape
    pad = 2
    canvas = np.full((2 * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for j in range(n):
        x = pad + j * (w + pad)
        canvas[pad : pad + h, x : x + w] = synthetic[j]
        canvas[2 * pad + h : 2 * pad + 2 * h, x : x + w] = private[j]
    im = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def memorization_report(
    synthetic: np.ndarray, private: np.ndarray, heldout: np.ndarray, *, pairs_png: str | Path | None = None,
    n_pairs: int = 16, progress: Callable[[int], None] | None = None,
) -> dict:
    """Nearest-private-image distances of synthetic vs held-out real images, and the closest pairs.

    All three arrays are uint8 (N, H, W, C) of one image shape. Returns plain
    numbers (distances and fractions), never pixel values.
    """
    flat_private = _flat(private)
    syn_d, syn_i = nearest_neighbours(synthetic, flat_private, progress=progress)
    real_d, _ = nearest_neighbours(heldout, flat_private, progress=progress)
    del flat_private
    p1 = float(np.percentile(real_d, 1))
    frac = float(np.mean(syn_d < p1))
    report = {
        "metric": METRIC,
        "n_synthetic": int(len(synthetic)),
        "n_private": int(len(private)),
        "n_heldout": int(len(heldout)),
        "synthetic_nn_median": float(np.median(syn_d)),
        "synthetic_nn_min": float(syn_d.min()),
        "heldout_nn_median": float(np.median(real_d)),
        "heldout_nn_p1": p1,
        "frac_closer_than_heldout_p1": frac,
        "n_exact_copies": int((syn_d == 0).sum()),
        "flag_fraction": FLAG_FRACTION,
        "flagged": bool(frac > FLAG_FRACTION),
        "pairs_png": None,
    }
    if pairs_png is not None:
        order = np.argsort(syn_d, kind="stable")[:n_pairs]
        report["pairs_png"] = str(save_pairs_png(pairs_png, synthetic[order], private[syn_i[order]]))
        report["pairs_distances"] = [round(float(v), 4) for v in syn_d[order]]
    return report
