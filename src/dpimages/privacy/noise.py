"""The noise source: privacy noise, Poisson sampling and secret keys, and the one release call.

A `NoiseSource` is the only object from which dpimages draws privacy noise,
sampling decisions and the secret keys of per-example randomness. By default
it is **secure**: every bit comes from the operating system's
cryptographically secure generator (``os.urandom``), so no one, not even the
holder of the run's ``--seed``, can recompute the noise and subtract it from
a release. ``NoiseSource.seeded(seed)`` (``dpimages fit
--insecure-seeded-noise``) is reproducible and for tests only: anyone who
knows the seed can replay the noise, so such a run is *not* differentially
private, and its ledger says so (``noise_source: seeded-insecure``). No global
RNG is used.

The release
-----------
`NoiseSource.release` is the one call through which a DP release gets its
noise: it records the release's event in the ledger (budget check, then
privacy.json) and only then draws ``N(0, (noise_multiplier x sensitivity)^2)``
for every entry, the std computed here from the event and the declared
sensitivity, never passed in. So noise cannot be drawn without an event, nor
with a std that disagrees with the ledger. Every Gaussian draw goes through
`standard_normal` and increments `gaussian_draws`, so a test (and
`dpimages.testing.check_method`) can check that draws, releases and ledger
steps agree one to one.

The secure Gaussian and its tail
--------------------------------
Gaussians are drawn in float64 by Box-Muller. A Box-Muller radius
``sqrt(-2 ln u)`` over 53-bit uniforms ``u >= 2^-54`` cannot exceed 8.65: an
output beyond 8.65 sigma from one data set's value would be impossible under
it and possible under a neighbour, a delta the ledger would not hold. Here
``u`` is drawn with its full floating-point exponent (the binade ``[2^-(L+1),
2^-L)`` with probability ``2^-(L+1)``, then 53 uniform mantissa bits), down to
``2^-1022``, so the radius reaches `SUPPORT_SIGMAS` = 37.6. A release whose
sensitivity is at most ``sigma / MIN_NOISE_MULTIPLIER`` (25.6 sigma) then
leaves at most ``P(Z > 12) < 2e-33`` of each coordinate's mass outside the
support, and `PrivacyEvent` refuses smaller noise multipliers (see
`dpimages.privacy.ledger`), so no budget is served with an unaccounted tail.

Floating point: the noise is rounded to the release's dtype. Like Opacus and
every other floating-point implementation, this leaves the known attack
surface of floating-point noise (Mironov 2012; Jin et al. 2022): the
low-order bits of a noisy value are not perfectly Gaussian. A discrete or
snapping mechanism would close it; we do not claim it is closed.
"""

from __future__ import annotations

import base64
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpimages.errors import InputError

if TYPE_CHECKING:
    from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger

SECURE = "os-csprng"
SEEDED = "seeded-insecure"
# the largest |z| the secure sampler can return: Box-Muller's radius at u = 2^-1022
SUPPORT_SIGMAS = math.sqrt(2.0 * 1022 * math.log(2.0))
MAX_BINADE = 1021  # u >= 2^-(MAX_BINADE + 1) = 2^-1022 (normal float64)


def _secure_words(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def secure_uniform(n: int) -> np.ndarray:
    """n float64 uniforms on (0, 1) from os.urandom, with the full exponent range down to 2^-1022.

    The binade ``[2^-(L+1), 2^-L)`` is chosen with probability ``2^-(L+1)`` (L = the leading zero bits of a
    random bit stream, 53 bits at a time), then 53 uniform mantissa bits place the value in it.
    """
    mantissa = (_secure_words(n) >> np.uint64(11)).astype(np.float64)  # 53 bits, exact in float64
    binade = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        top = (_secure_words(todo.size) >> np.uint64(11)).astype(np.float64)  # 53 random bits
        _, bits = np.frexp(top)  # bit length of each draw (0 for an all-zero draw)
        binade[todo] += 53 - bits
        todo = todo[(bits == 0) & (binade[todo] <= MAX_BINADE)]
    binade = np.minimum(binade, MAX_BINADE)
    return np.ldexp(1.0 + (mantissa + 0.5) / 2.0**53, -(binade + 1).astype(np.int32))


class NoiseSource:
    """Gaussian noise, Bernoulli sampling and secret keys: OS CSPRNG by default, seeded (insecure, tests) on request.

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

    # -- the release -------------------------------------------------------------
    def release(self, value: torch.Tensor, *, sensitivity: float, event: PrivacyEvent, ledger: PrivacyLedger,
                draw: bool = True) -> torch.Tensor:
        """One DP release: record `event` in `ledger`, then return ``value + N(0, (nm x sensitivity)^2)``.

        `value` must move by at most `sensitivity` (L2) between neighbouring data sets: the caller's contract,
        which `dpimages.testing.check_method` probes. `event` is one step (``steps == 1``); its noise
        multiplier nm and `sensitivity` give the std, so the noise always matches the ledger. ``draw=False``:
        record the event and return `value` unchanged (the ranks of a process group other than the one that
        draws the noise). The ledger refuses (BudgetExceeded) before anything is drawn.
        """
        if event.steps != 1:
            raise InputError(f"a release is one step of its event, got steps={event.steps}")
        if not isinstance(sensitivity, (int, float)) or not math.isfinite(sensitivity) or sensitivity <= 0:
            raise InputError(f"sensitivity must be a finite number > 0, got {sensitivity}")
        ledger.spend(event)
        if not draw:
            return value
        std = event.noise_multiplier * float(sensitivity)
        z = self.standard_normal(tuple(value.shape))
        return value + (z * std).to(device=value.device, dtype=value.dtype)

    # -- drawing ---------------------------------------------------------------
    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard normal float64 tensor on the CPU (counted as one draw). Only `release` calls it."""
        self.gaussian_draws += 1
        n = math.prod(shape)
        if not self.secure:
            return torch.randn(tuple(shape), generator=self._generator, dtype=torch.float64)
        m = (n + 1) // 2
        u1, u2 = torch.from_numpy(secure_uniform(m)), torch.from_numpy(secure_uniform(m))
        r = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)])
        return z[:n].reshape(tuple(shape))

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """Boolean mask of n independent Bernoulli(p) decisions (Poisson sampling)."""
        if self.secure:
            u = torch.from_numpy((_secure_words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53)
        else:
            u = torch.rand(n, generator=self._generator, dtype=torch.float64)
        return u < p

    def secret_key(self) -> int:
        """A 63-bit key for per-example randomness that no seed can reproduce (secure), e.g. a step's draws.

        Privacy contract: randomness that a release depends on per example is keyed by such a key and by the
        example's content (`dpimages.privacy.keyed`), never by its position with a public key.
        """
        if self.secure:
            return int.from_bytes(os.urandom(8), "little") >> 1
        return int(torch.randint(0, 2**62, (), generator=self._generator))

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
