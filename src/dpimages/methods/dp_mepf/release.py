"""DP-MEPF's one-shot release: noisy per-class sums of unit-norm features and noisy class counts.

Privacy contract (neighbouring relation: add or remove one image together
with its label):

* Each private image is embedded by a fixed public (or random) feature
  network into a first-moment vector and, optionally, a second-moment
  vector, each of unit L2 norm (`dpimages.nets.features.FeatureExtractor`),
  and clipped to norm 1 again by the mechanism (`clip_rows`).
* Released: (1) the per-class sums of first-moment vectors, a (K, D1)
  matrix; (2) optionally the per-class sums of second-moment vectors,
  (K, D2); (3) the per-class image counts, (K,). Classes are disjoint, so
  adding or removing one image changes each stacked matrix by at most 1 in
  L2 norm and the counts by exactly 1: three Gaussian mechanisms with L2
  sensitivity 1 and noise multipliers ``s / sqrt(w_i)`` (``w_i`` the
  normalised budget weights), one ledger event each, calibrated together
  with `dpimages.privacy.calibrate` for the target (epsilon, delta).
* The per-class means (noisy sum / noisy count, projected onto the set the
  true mean lies in) and everything after them are post-processing.

The per-class sums are accumulated in chunks (so that high-dimensional
features of large data sets fit in memory) with the mechanisms' own
`clip_rows` and `class_sums`, and released with `gaussian_release` at
sensitivity 1: the same computation as `clipped_gaussian_class_sums`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpimages.nets.features import FeatureExtractor
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.mechanisms import class_sums, clip_rows, gaussian_release, noisy_class_counts
from dpimages.privacy.rng import NoiseSource

LABEL_FIRST = "dp-mepf per-class sums of unit-norm first-moment features"
LABEL_SECOND = "dp-mepf per-class sums of unit-norm second-moment features"
LABEL_COUNTS = "dp-mepf class counts"
CLIP_NORM = 1.0  # per-image feature vectors have unit norm; clipping to 1 enforces it


@dataclass(frozen=True)
class ReleasePlan:
    """Noise multipliers of the planned releases (None: not released)."""

    noise_first: float
    noise_second: float | None
    noise_counts: float

    def events(self) -> list[PrivacyEvent]:
        out = [PrivacyEvent.gaussian(self.noise_first, 1, LABEL_FIRST)]
        if self.noise_second is not None:
            out.append(PrivacyEvent.gaussian(self.noise_second, 1, LABEL_SECOND))
        out.append(PrivacyEvent.gaussian(self.noise_counts, 1, LABEL_COUNTS))
        return out


def weights(second_moment: bool, w_first: float, w_second: float, w_counts: float) -> tuple[float, float, float]:
    """Normalised budget weights (first, second, counts); second is 0 when not released."""
    ws = (w_first, w_second if second_moment else 0.0, w_counts)
    total = sum(ws)
    return ws[0] / total, ws[1] / total, ws[2] / total


def plan_for(scale: float, w: tuple[float, float, float]) -> ReleasePlan:
    """Noise multiplier s / sqrt(w_i) per release: their composition is one Gaussian with multiplier s."""
    return ReleasePlan(
        scale / math.sqrt(w[0]), None if w[1] == 0 else scale / math.sqrt(w[1]), scale / math.sqrt(w[2])
    )


def calibrate_plan(epsilon: float, delta: float, w: tuple[float, float, float]) -> tuple[float, ReleasePlan]:
    """The smallest common scale s whose planned events meet (epsilon, delta); runs before data is read."""
    scale = calibrate(lambda s: plan_for(s, w).events(), epsilon, delta)
    return scale, plan_for(scale, w)


@dataclass
class Released:
    """The released (noisy) quantities; everything else is derived from them."""

    sum_first: torch.Tensor  # (K, D1) float64
    sum_second: torch.Tensor | None  # (K, D2) float64
    counts: torch.Tensor  # (K,) float64

    def means(self, project: bool, nonneg_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noisy per-class means (post-processing), float32.

        Counts are floored at 1. With `project`, each mean is projected onto
        the convex set the true mean of unit vectors lies in (the unit ball,
        intersected with the non-negative orthant where the features are
        non-negative), which can only bring it closer to the truth.
        """
        n = self.counts.clamp_min(1.0).unsqueeze(1)

        def proj(m: torch.Tensor, nonneg: bool) -> torch.Tensor:
            if not project:
                return m
            if nonneg:
                m = m.clamp_min(0.0)
            return m / m.norm(dim=1, keepdim=True).clamp_min(1.0)

        first = proj(self.sum_first / n, nonneg_first).float()
        second = None if self.sum_second is None else proj(self.sum_second / n, True).float()
        return first, second

    def proportions(self) -> list[float]:
        """Noisy class proportions (counts floored at 0), for unlabelled sampling."""
        c = self.counts.clamp_min(0.0)
        total = float(c.sum())
        k = c.numel()
        return [1.0 / k] * k if total <= 0 else [float(v) / total for v in c]


def _chunked_class_sums(
    extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-class sums of clipped unit-norm features (no noise: internal, released right after)."""
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    with torch.no_grad():
        for i in range(0, images.shape[0], chunk):
            f, g = extractor(images[i : i + chunk])
            y = labels[i : i + chunk]
            part1 = class_sums(clip_rows(f.double(), CLIP_NORM), y, num_classes)
            s1 = part1 if s1 is None else s1 + part1
            if g is not None:
                part2 = class_sums(clip_rows(g.double(), CLIP_NORM), y, num_classes)
                s2 = part2 if s2 is None else s2 + part2
    assert s1 is not None
    return s1, s2


def release(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    plan: ReleasePlan,
    *,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    chunk: int = 500,
) -> Released:
    """The one and only access to private data: returns the noisy sums and counts.

    `ledger.reserve` checks the whole plan before anything is computed; each
    mechanism then records its event before its noise is drawn.
    """
    ledger.reserve(*plan.events())
    s1, s2 = _chunked_class_sums(extractor, images, labels, num_classes, chunk)
    if (s2 is None) != (plan.noise_second is None):
        raise RuntimeError("feature extractor and release plan disagree about the second moment")
    noisy1 = gaussian_release(s1, sensitivity=CLIP_NORM, noise_multiplier=plan.noise_first, ledger=ledger,
                              noise=noise, label=LABEL_FIRST)
    noisy2 = None
    if s2 is not None and plan.noise_second is not None:
        noisy2 = gaussian_release(s2, sensitivity=CLIP_NORM, noise_multiplier=plan.noise_second, ledger=ledger,
                                  noise=noise, label=LABEL_SECOND)
    counts = noisy_class_counts(labels, num_classes, noise_multiplier=plan.noise_counts, ledger=ledger, noise=noise,
                                label=LABEL_COUNTS)
    return Released(noisy1, noisy2, counts)
