"""DPDM's training randomness, keyed so that it carries no example's membership into another's gradient.

Each DP step takes exactly one 63-bit step key from the training generator
``g`` (`step_key`), whatever its Poisson batch; each example's draws come from
a generator seeded with a function of (step key, its dataset index) alone
(`example_seeds`, `keyed_normals`). So ``g``'s state after any step, and the
draws of every other example, are the same with or without any one example in
the batch, and in any number of processes: one example changes the clipped sum
by one clipped gradient. Nothing here reads private data; the dataset indices
come from the engine's Poisson sampler and never leave the process.
"""

from __future__ import annotations

import numpy as np
import torch

from dpimages.errors import InputError


def step_key(g: torch.Generator) -> int:
    """One DP step's training key: a 63-bit integer taken from the training generator `g`.

    Privacy contract: this is the only use of `g` in a DP step, and it takes the same fixed amount of `g` (one
    64-bit integer draw on `g`'s device) whatever the step's Poisson batch, so `g`'s later states do not depend on
    the private data. Every rank of a process group holds the same `g` and takes the same key.
    """
    return int(torch.empty((), dtype=torch.int64, device=g.device).random_(generator=g))


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on a uint32 array: a bijection (distinct inputs give distinct outputs)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def example_seeds(key: int, idx: torch.Tensor) -> list[int]:
    """The 64-bit generator seed of each dataset index in `idx` (any device) under a step's `key`.

    Privacy contract: each seed is a function of (`key`, that index) only, never of the other indices, their
    number or their order. With the key's halves k_lo, k_hi and f = MurmurHash3's 32-bit finaliser (a bijection),
    the low 32 bits are ``low = f(f(i ^ k_lo) + k_hi)``: a key-dependent bijection of the index, so the examples
    of one step have distinct seeds even on the CPU, whose mt19937 generator keeps only a seed's low 32 bits; the
    high 32 bits ``f(f(low ^ k_hi) + k_lo)`` complete the 64-bit Philox key of a CUDA generator.
    """
    i = idx.detach().cpu().numpy().astype(np.int64)
    if i.size and (int(i.min()) < 0 or int(i.max()) >= 2**32):
        raise InputError("dpdm: dataset indices must be in [0, 2**32)")
    k_lo, k_hi = np.uint32(key & 0xFFFFFFFF), np.uint32((key >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        low = _fmix32(_fmix32(i.astype(np.uint32) ^ k_lo) + k_hi)
        high = _fmix32(_fmix32(low ^ k_hi) + k_lo)
    return ((high.astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)).tolist()


def keyed_normals(idx: torch.Tensor, key: int, width: int, device: torch.device) -> torch.Tensor:
    """(len(idx), width) standard normals on `device`: row j from a generator seeded with ``example_seeds(key,
    idx)[j]``, so each row is a function of (`key`, that dataset index) alone."""
    z = torch.empty((idx.numel(), width), device=device)
    gen = torch.Generator(device=device)
    for row, seed in zip(z, example_seeds(key, idx), strict=True):
        gen.manual_seed(seed)
        row.normal_(generator=gen)
    return z
