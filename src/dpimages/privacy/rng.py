"""Sources of randomness for privacy noise and Poisson sampling.

A `NoiseSource` is the only object from which dpimages draws privacy noise
and sampling decisions. By default it is **secure**: every bit comes from the
operating system's cryptographically secure generator (``os.urandom``), so no
one, not even the holder of the run's ``--seed``, can recompute the noise and
subtract it from a release. ``NoiseSource.seeded(seed)`` (``dpimages fit
--insecure-seeded-noise``) is reproducible and for tests only: anyone who
knows the seed can replay the noise, so such a run is *not* differentially
private, and its ledger says so (``noise_source: seeded-insecure``). No global
RNG is used. Every Gaussian draw increments `gaussian_draws`, so tests can
check that the number of noise draws equals the ledger's step count.

Floating point: Gaussians are drawn in float64 (Box-Muller over 53-bit
uniforms) and rounded to the release's dtype. Like Opacus and every other
floating-point implementation, this leaves the known attack surface of
floating-point noise (Mironov 2012; Jin et al. 2022): the low-order bits of a
noisy value are not perfectly Gaussian. A discrete or snapping mechanism would
close it; we do not claim it is closed.
"""

from __future__ import annotations

import base64
import math
import os

import numpy as np
import torch

SECURE = "os-csprng"
SEEDED = "seeded-insecure"


class NoiseSource:
    """Gaussian noise and Bernoulli sampling: OS CSPRNG by default, seeded (insecure, tests) on request.

    ``NoiseSource()`` is secure. ``NoiseSource(seed)`` / ``NoiseSource.seeded(seed)`` draws from a torch
    generator seeded with `seed`: reproducible, and not private for anyone who knows the seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.secure = seed is None
        self.seed = None if seed is None else int(seed)
        self._generator = torch.Generator(device="cpu")
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        self.gaussian_draws = 0

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """Reproducible noise from `seed`: for tests only (not private for anyone who knows the seed)."""
        return cls(int(seed))

    @property
    def kind(self) -> str:
        """``os-csprng`` or ``seeded-insecure``: what privacy.json records as ``noise_source``."""
        return SECURE if self.secure else SEEDED

    # -- drawing ---------------------------------------------------------------
    def _secure_uniform(self, n: int) -> torch.Tensor:
        """n uniforms in (0, 1) with 53 random bits each, from os.urandom."""
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        u = (raw.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
        return torch.from_numpy(u)

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard normal float64 tensor on the CPU (counted as one draw)."""
        self.gaussian_draws += 1
        n = math.prod(shape)
        if not self.secure:
            return torch.randn(tuple(shape), generator=self._generator, dtype=torch.float64)
        m = (n + 1) // 2
        u1, u2 = self._secure_uniform(m), self._secure_uniform(m)
        r = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)])
        return z[:n].reshape(tuple(shape))

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """N(0, std^2) noise of the given shape, on `device` in `dtype`."""
        return (self.standard_normal(shape) * float(std)).to(device=device, dtype=dtype)

    def add_to(self, value: torch.Tensor, std: float) -> torch.Tensor:
        """``value + N(0, std^2)`` in `value`'s device and dtype: the one place where a release gets its noise.

        Every DP release of dpimages (the mechanisms and the DP-SGD engine) passes through here, so a test can
        record what each release returned and replay it on other private data (tests/methods/test_contract.py).
        """
        return value + self.normal(value.shape, std, device=value.device, dtype=value.dtype)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """Boolean mask of n independent Bernoulli(p) decisions (Poisson sampling)."""
        if self.secure:
            u = self._secure_uniform(n)
        else:
            u = torch.rand(n, generator=self._generator, dtype=torch.float64)
        return u < p

    # -- checkpointing ---------------------------------------------------------
    def state(self) -> dict:
        """JSON-serialisable state (secure sources have none to save)."""
        if self.secure:
            return {"secure": True, "gaussian_draws": self.gaussian_draws}
        raw = self._generator.get_state().numpy().tobytes()
        return {
            "secure": False,
            "seed": self.seed,
            "generator": base64.b64encode(raw).decode("ascii"),
            "gaussian_draws": self.gaussian_draws,
        }

    def load_state(self, state: dict) -> None:
        self.gaussian_draws = int(state.get("gaussian_draws", 0))
        if self.secure or state.get("secure"):
            return
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self._generator.set_state(torch.from_numpy(raw))
