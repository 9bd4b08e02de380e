"""Per-example randomness keyed by the example itself, never by its position.

Sensitivity must hold wherever the added or removed image sits. Randomness
that a release depends on per example (DPDM's diffusion noise and noise
levels, DPAF's aggregation groups, DPDFD's teacher shards) is therefore a
function of that example's *content* (its pixels, shape and label: a
`content_digests` entry) and of a key, so adding or removing one image
changes no other image's draws: the other examples' contributions are the
same on both neighbours and the release moves by the one example's clipped
contribution. A position (dataset index) would not do: inserting one image
before the others shifts every later index, and with it every later draw.

The key of a release's per-example draws is secret, drawn by the run's
`NoiseSource` (`shared_secret_key`), so no holder of the run's public
``--seed`` can recompute an image's draws either. (A shard that must stay
the same over a whole run and its resumptions, DPDFD's, uses a key from a
seed stream; content keying alone is what its sensitivity needs.)

Identical images with identical labels get identical draws. The digests are
kept in memory only: nothing here is written anywhere.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from dpimages.distributed import comm_device, dist_world
from dpimages.privacy.noise import NoiseSource


def content_digests(images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """(N,) uint64: a BLAKE2b digest of each image's bytes, shape and label (-1 without labels).

    A function of that image and label alone. In memory only: an unkeyed digest must never reach a file.
    """
    shape = repr(images.shape[1:]).encode()
    out = np.empty(len(images), dtype=np.uint64)
    for i in range(len(images)):
        h = hashlib.blake2b(np.ascontiguousarray(images[i]).tobytes(), digest_size=8)
        h.update(shape)
        h.update(int(-1 if labels is None else labels[i]).to_bytes(8, "little", signed=True))
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def keyed_values(digests: np.ndarray, key: int) -> np.ndarray:
    """(n,) uint64: keyed BLAKE2b of each digest under `key` (a pseudo-random function of (key, content))."""
    k = int(key).to_bytes(8, "little", signed=False)
    out = np.empty(len(digests), dtype=np.uint64)
    for i, d in enumerate(digests.tolist()):
        out[i] = int.from_bytes(hashlib.blake2b(int(d).to_bytes(8, "little"), key=k, digest_size=8).digest(), "little")
    return out


def keyed_buckets(digests: np.ndarray, key: int, buckets: int) -> np.ndarray:
    """(n,) int64 in [0, buckets): each example's bucket (group, shard) from its content and `key`."""
    if buckets == 1:
        return np.zeros(len(digests), dtype=np.int64)
    return (keyed_values(digests, key) % np.uint64(buckets)).astype(np.int64)


def shared_secret_key(noise: NoiseSource) -> int:
    """A fresh secret key from `noise`; in a process group rank 0 draws it and every rank gets the same one.

    Every rank calls it at the same point (one key per release, whatever the private batch).
    """
    rank, world = dist_world()
    if world == 1:
        return noise.secret_key()
    buf = torch.tensor([noise.secret_key() if rank == 0 else 0], dtype=torch.int64, device=comm_device())
    torch.distributed.broadcast(buf, src=0)
    return int(buf.item())
