"""Turning a canary guessing game into a lower bound on epsilon.

The one-run audit of Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run" (NeurIPS 2023, arXiv:2305.08846): m canaries are each
included independently with probability 1/2; after one run the auditor
makes r guesses ("included" / "excluded", abstaining on the rest) of which v
are correct. If the run is (epsilon, delta)-DP with respect to each canary,
their Theorem 5.2 (Theorem 3.1 for delta = 0) bounds

    P[W >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha,

    alpha = max_{i = 1..v}  P[v > Binomial(r, e^eps / (1 + e^eps)) >= v - i] / i

(the numerical form of their Appendix D). An epsilon whose p-value is below
the significance level beta (0.05 for 95% confidence) is rejected; the lower
bound is the largest epsilon still rejected.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from dpimages.errors import InputError

CONFIDENCE = 0.95
_MAX_EPSILON = 100.0


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if int(x) != x:
            raise InputError(f"{name} must be an integer, got {x}")
    if not (0 <= v <= r <= m):
        raise InputError(f"need 0 <= correct (v={v}) <= guesses (r={r}) <= canaries (m={m})")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[at least v of r guesses correct] under (epsilon, delta)-DP with m canaries.

    Steinke, Nasr and Jagielski (2023), Theorem 5.2 (and Theorem 3.1 when
    ``delta == 0``), computed as in their Appendix D: the binomial tail with
    success probability e^eps / (1 + e^eps) plus ``2 m delta alpha``.
    """
    _check_counts(m, r, v)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not (0.0 <= delta <= 1.0):
        raise InputError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = CONFIDENCE, tol: float = 1e-6
) -> float:
    """Largest epsilon rejected at `confidence` (p-value < 1 - confidence) by v correct of r guesses.

    0 when even epsilon = 0 cannot be rejected (e.g. about half the guesses
    correct). Bisection on `p_value`, which increases with epsilon.
    """
    if not (0.0 < confidence < 1.0):
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2.0
        if hi > _MAX_EPSILON:
            return _MAX_EPSILON
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo
