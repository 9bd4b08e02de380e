"""Calibration: the smallest noise multiplier that meets a target epsilon.

One generic routine (`calibrate`) serves every method: it takes a factory
from a noise multiplier to the run's whole planned list of events and
bisects on dp-accounting's PLD accountant. It runs before private data is
touched. The search uses a coarser PLD discretisation, which is pessimistic
(an upper bound on epsilon), so the returned sigma also meets the target
under the exact accountant. A target that even the smallest served noise
multiplier (`MIN_NOISE_MULTIPLIER`, where the secure sampler's support ends)
stays below is refused: it cannot be served without an unaccounted tail. Results are cached on disk
(``$DPIMAGES_CACHE`` or ``~/.cache/dpimages``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from dpimages.errors import InputError
from dpimages.privacy import disk_cache
from dpimages.privacy.ledger import (
    COARSE_PLD_INTERVAL,
    MIN_NOISE_MULTIPLIER,
    PrivacyEvent,
    check_positive,
    epsilon_pld,
)

SEARCH_INTERVAL = COARSE_PLD_INTERVAL
RELATIVE_TOLERANCE = 1e-3
MAX_NOISE_MULTIPLIER = 1e4

EventFactory = Callable[[float], Sequence[PrivacyEvent]]


def _cache_key(make_events: EventFactory, target_epsilon: float, delta: float) -> str:
    probe = [[e.to_json() for e in make_events(s)] for s in (1.0, 2.0)]
    return json.dumps([probe, target_epsilon, delta, SEARCH_INTERVAL, RELATIVE_TOLERANCE], sort_keys=True)


def calibrate(make_events: EventFactory, target_epsilon: float, delta: float) -> float:
    """Smallest noise multiplier s (within 0.1%) with epsilon(make_events(s)) <= target."""
    check_positive("epsilon", target_epsilon)
    check_positive("delta", delta)
    key = _cache_key(make_events, target_epsilon, delta)
    cached = disk_cache.load("calibration").get(key)
    if cached is not None:
        return float(cached)

    def eps(sigma: float) -> float:
        return epsilon_pld(make_events(sigma), delta, SEARCH_INTERVAL)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise InputError(
                f"epsilon {target_epsilon} is not reachable with noise multiplier <= {MAX_NOISE_MULTIPLIER:g} "
                "for this schedule: raise epsilon or reduce steps / sample rate"
            )
    lo = hi / 2.0
    while lo > MIN_NOISE_MULTIPLIER and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
    if lo <= MIN_NOISE_MULTIPLIER:
        if eps(MIN_NOISE_MULTIPLIER) < target_epsilon:
            raise InputError(
                f"epsilon {target_epsilon:g} needs a noise multiplier below {MIN_NOISE_MULTIPLIER:.4f} for this "
                "schedule, less noise than the secure Gaussian sampler serves without an unaccounted tail: "
                "lower epsilon, or add steps")
        lo = MIN_NOISE_MULTIPLIER
    while hi - lo > RELATIVE_TOLERANCE * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    disk_cache.store("calibration", key, hi)
    return hi


def calibrate_dpsgd(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    before: Sequence[PrivacyEvent] = ()) -> float:
    """Noise multiplier for `steps` Poisson-subsampled Gaussian steps at rate `sample_rate`.

    `before`: fixed events of earlier stages of the same run; the multiplier is calibrated over them and the
    steps together (one PLD composition), so the whole plan meets the target.
    """
    fixed = list(before)
    return calibrate(lambda s: [*fixed, PrivacyEvent.subsampled_gaussian(s, sample_rate, steps)], target_epsilon,
                     delta)


def calibrate_gaussian(target_epsilon: float, delta: float, count: int = 1) -> float:
    """Noise multiplier for `count` composed Gaussian releases."""
    return calibrate(lambda s: [PrivacyEvent.gaussian(s, count)], target_epsilon, delta)
