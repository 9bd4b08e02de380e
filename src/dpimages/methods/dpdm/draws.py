"""DPDM's training randomness, keyed by each example's content and a secret step key, never by its position.

Each DP step takes one secret key from the run's `NoiseSource` (`dpimages.privacy.keyed.shared_secret_key`),
whatever its Poisson batch; each example's draws come from a generator seeded with a keyed hash of (that key,
the example's content digest) (`dpimages.privacy.keyed.keyed_values`), filled by `keyed_normals`. So the draws
of every other example are the same with or without any one example in the data, wherever it sits, and in any
number of processes: one example changes the clipped sum by one clipped gradient. The key is secret, so no
holder of the run's public seed can recompute an image's draws.
"""

from __future__ import annotations

import numpy as np
import torch


def keyed_normals(seeds: np.ndarray, width: int, device: torch.device) -> torch.Tensor:
    """(len(seeds), width) standard normals on `device`: row j from a generator seeded with ``seeds[j]`` (uint64),
    so each row is a function of its own seed alone."""
    z = torch.empty((len(seeds), width), device=device)
    gen = torch.Generator(device=device)
    for row, seed in zip(z, seeds.tolist(), strict=True):
        gen.manual_seed(int(seed))
        row.normal_(generator=gen)
    return z
