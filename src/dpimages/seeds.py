"""Named seed streams from the run seed (``--seed``): everything that is not privacy noise.

A method asks its `FitContext` for a generator by name (``ctx.generator("train")``)
or initialises its networks under ``ctx.seeded_init("model")``; it never seeds
or draws from torch's global generator directly. A stream's seed is the run
seed plus the stream's offset: `STREAM_OFFSETS` lists the streams the methods
use, with the offsets their seeded results were published with (changing one
changes every seeded smoke fingerprint, benchmarks/smoke_samples.py); any
other name gets an offset derived from its name.

Privacy: these streams are public randomness (the seed is in config.yaml).
Privacy noise and Poisson sampling never come from here
(`dpimages.privacy.noise.NoiseSource`, the OS CSPRNG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GRID_SEED = 7  # every sample grid of every method: grids of one run are comparable over training

# "METHOD/STREAM" -> offset from the run seed
STREAM_OFFSETS: dict[str, int] = {
    "dp-mepf/train": 1,
    "dpaf/model": 0,
    "dpaf/train": 104729,
    "dpaf-noagg/model": 0,
    "dpaf-noagg/train": 104729,
    "dpdfd/teacher": 1009,
    "dpdfd/model": 2003,
    "dpdfd/train": 7919,
    "dpdm/model": 0,
    "dpdm/train": 7919,
    "pe/api": 104729,
}


def stream_seed(run_seed: int, method: str, name: str) -> int:
    """The seed of stream `name` of `method` under `run_seed` (see `STREAM_OFFSETS`)."""
    key = f"{method}/{name}"
    if key in STREAM_OFFSETS:
        offset = STREAM_OFFSETS[key]
    else:
        offset = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return int(run_seed) + offset


def stream_generator(run_seed: int, method: str, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh torch generator on `device` seeded with `stream_seed`."""
    return torch.Generator(device=device).manual_seed(stream_seed(run_seed, method, name))


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Within the block torch's global CPU generator is seeded with `seed` (for module initialisation, which
    draws from it); the caller's global state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
