"""DPAF's private releases: the schedule and its noise plan, and the only code that reads private images or labels.

Privacy argument
----------------
Neighbouring relation: add or remove one image together with its label. N (the data set size) is public, as
in every DP-SGD library. The schedule (steps, sample rates, clip norms, noise multipliers) is a function of N
and the config only (`Schedule`); it is fixed, calibrated (`calibrate_plan`: `dpimages.privacy.calibrate`, one
common scale for all releases, split by `noise_plan`) and reserved in the ledger before any private pixel or
label is read. A run makes three kinds of private releases, all made by this module, and nothing else reads
private data:

1. **Class counts**, once (``dpaf class counts``, `release_counts`): the per-class image counts plus
   N(0, sigma_c^2) (`noisy_class_counts`; one image changes one count by 1, so L2 sensitivity 1): a Gaussian
   event. They set the class proportions of the generated batches (so real and fake aggregates are built
   from batches with the same class mix) and the divisors below.
2. **Feature aggregation** (``dpaf feature aggregation``, `aggregation_release`), ``cycles * agg_steps`` times:
   a Poisson sample S of the private set (every image independently with probability q_a = agg_batch / N,
   `PoissonSampler`); each selected image i goes to row r(i) = y_i * M + g_i, where g_i is its group among
   M = ``agg_groups``: a keyed hash of (a secret key that the run's `NoiseSource` draws for this release, the
   image's content), so no other image's group depends on whether, or where, image i is in the data
   (`dpimages.privacy.keyed`; until issue 34 groups were drawn by dataset index from the public training
   generator, and inserting one image moved every later image's group). Released:
   the (K*M, d) matrix of row sums of the clipped features ``clip(f1(x_i) - mu_{y_i}, C_f)`` plus
   N(0, sigma_a^2 C_f^2) noise per entry (`release_aggregates`); mu (K, d) is this cycle's per-class reference,
   the mean f1 feature of generated images (``center=true``; zero otherwise). Sensitivity: conditionally on
   everything released before, f1 and mu are fixed functions (f1's weights are themselves DP outputs, see 3,
   and post-processing of them; mu is computed from f1 and G only); the rows partition S, so adding or
   removing one image changes exactly one row, by a vector of norm at most C_f; the stacked matrix moves by
   at most C_f in L2 (Frobenius) norm. With Poisson sampling this is one subsampled Gaussian event (noise
   multiplier sigma_a, rate q_a), recorded by `gaussian_release(..., sample_rate=q_a)` before the noise is
   drawn. Dividing by the expected row sizes ``q_a * N_k / M`` (N_k from the *released* counts) is
   post-processing.
3. **f1's DP-SGD steps** (``dpaf f1 dp-sgd``), ``cycles * f1_steps`` times: the DP-SGD engine (`DPSGD`, the
   release) on its own Poisson sample (rate q_1 = f1_batch / N, independent of the aggregation samples;
   `accumulate_private` feeds it the sampled private examples) with the per-example loss
   ``t_{y_i} . clip(f1(x_i) - mu_{y_i}, C_f)``. The target vectors t are the gradients of f2's loss with
   respect to the *released* aggregates (an average over the current phase's releases, evaluated with the
   current f2): functions of earlier releases only, fixed during the step. Each example's gradient is
   clipped to C, summed, noised N(0, sigma_1^2 C^2) and divided by the expected batch size: one subsampled
   Gaussian event per step. Fake images, whose per-example gradients are clipped and summed into the same
   step so that real and fake contributions are balanced, depend on no private data beyond earlier
   releases, so they do not change the sensitivity.

Post-processing: f2 is trained only on released aggregates (real side) and on generated images (fake side);
the generator G only on f2 and f1 applied to its own images. Both are functions of earlier releases and of
randomness independent of the data, so their weights, the EMA of G and every sample are post-processing, as
are f1's Adam updates (functions of the noisy gradients). The two Poisson samples are drawn independently for
every release, so the releases compose adaptively: the ledger's composition (PLD, dp-accounting) of
1 Gaussian event + ``cycles * agg_steps`` subsampled Gaussian events (sigma_a, q_a) + ``cycles * f1_steps``
subsampled Gaussian events (sigma_1, q_1) is the run's guarantee. (Sharing one Poisson sample between an
aggregation and an f1 step would *not* be covered by this composition of independently sampled events; the
samplers are separate for that reason.)

The training generator (latents, fake labels, simulated row counts) is seeded apart from the privacy noise and
never consumes a number of draws that depends on private data, so the post-processing cannot depend on an
unreleased private quantity such as a Poisson batch size.

Ablation (``aggregation=false``): no forward-phase aggregation. The whole discriminator
``f2(clip(f1(x), C_f), y)`` is trained with DP-SGD (``dpaf discriminator dp-sgd``, rate plain_batch / N, one
step per iteration, ``cycles * agg_steps`` steps), a plain DP-GAN with the same networks; the class counts are
released as in 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dpimages.errors import InputError
from dpimages.methods.dpaf.config import DPAFConfig
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.keyed import keyed_buckets
from dpimages.privacy.mechanisms import class_sums, clip_rows, gaussian_release, noisy_class_counts
from dpimages.privacy.noise import NoiseSource

LABEL_COUNTS = "dpaf class counts"
LABEL_AGG = "dpaf feature aggregation"
LABEL_F1 = "dpaf f1 dp-sgd"
LABEL_D = "dpaf discriminator dp-sgd"


# -- the private schedule and its budget split (public choices only) ---------------------------------
@dataclass(frozen=True)
class Schedule:
    """Sample rates and step counts of every planned release (functions of N and the config only)."""

    n: int
    aggregation: bool
    q_agg: float
    agg_total: int
    q_f1: float
    f1_total: int
    q_plain: float
    plain_total: int
    f1_share: float
    counts_share: float

    @classmethod
    def from_config(cls, cfg: DPAFConfig, n: int) -> Schedule:
        for name in ("agg_batch", "f1_batch") if cfg.aggregation else ("plain_batch",):
            if getattr(cfg, name) > n:
                raise InputError(f"{name} {getattr(cfg, name)} is larger than the data set ({n} images): lower it")
        return cls(n, cfg.aggregation, cfg.agg_batch / n, cfg.cycles * cfg.agg_steps, cfg.f1_batch / n,
                   cfg.cycles * cfg.f1_steps, cfg.plain_batch / n, cfg.cycles * cfg.agg_steps, cfg.f1_share,
                   cfg.counts_share)


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers of the planned releases (agg/f1 for DPAF; d for the ablation; None when unused)."""

    counts: float
    agg: float | None
    f1: float | None
    d: float | None

    def events(self, s: Schedule) -> list[PrivacyEvent]:
        """The whole planned event list, the DP-SGD release last: what the ledger reserves and, after an
        uninterrupted run, holds."""
        out = [PrivacyEvent.gaussian(self.counts, 1, LABEL_COUNTS)]
        if s.aggregation:
            assert self.agg is not None and self.f1 is not None
            out += [PrivacyEvent.subsampled_gaussian(self.agg, s.q_agg, s.agg_total, LABEL_AGG),
                    PrivacyEvent.subsampled_gaussian(self.f1, s.q_f1, s.f1_total, LABEL_F1)]
        else:
            assert self.d is not None
            out.append(PrivacyEvent.subsampled_gaussian(self.d, s.q_plain, s.plain_total, LABEL_D))
        return out


def noise_plan(scale: float, s: Schedule) -> NoisePlan:
    """Noise multipliers for a common scale s, with the budget split applied.

    A subsampled Gaussian release j (rate q_j, T_j steps) gets sigma_j = s * q_j * sqrt(T_j / w_j) and the
    class counts sigma_c = s / sqrt(w_c). For small q (and sigma not too small) the Renyi-DP of T subsampled
    Gaussian steps is about proportional to T q^2 / sigma^2 and that of a Gaussian to 1 / sigma^2, so each
    release's share of the budget is about its weight w_j (f1_share, counts_share, the rest for the
    aggregation or, in the ablation, the discriminator). The split only parametrises the noise; the
    epsilon of the whole list is computed exactly by the PLD accountant, in `calibrate` and in the ledger.
    """
    w_c = s.counts_share
    counts = scale / math.sqrt(w_c)
    if s.aggregation:
        w_1 = s.f1_share
        w_a = 1.0 - w_1 - w_c
        return NoisePlan(counts, scale * s.q_agg * math.sqrt(s.agg_total / w_a),
                         scale * s.q_f1 * math.sqrt(s.f1_total / w_1), None)
    return NoisePlan(counts, None, None, scale * s.q_plain * math.sqrt(s.plain_total / (1.0 - w_c)))


def calibrate_plan(epsilon: float, delta: float, s: Schedule) -> tuple[float, NoisePlan]:
    """The smallest common scale whose planned events meet (epsilon, delta); runs before data is read."""
    scale = calibrate(lambda v: noise_plan(v, s).events(s), epsilon, delta)
    return scale, noise_plan(scale, s)


# -- the releases ---------------------------------------------------------------------------------------
def release_counts(labels: torch.Tensor, num_classes: int, noise_multiplier: float, *, ledger: PrivacyLedger,
                   noise: NoiseSource) -> torch.Tensor:
    """Release 1: the private per-class counts plus N(0, noise_multiplier^2), float64 (K,) on the CPU."""
    return noisy_class_counts(labels, num_classes, noise_multiplier=noise_multiplier, ledger=ledger, noise=noise,
                              label=LABEL_COUNTS).cpu()


def release_aggregates(
    features: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str = LABEL_AGG,
) -> torch.Tensor:
    """Noisy row sums of clipped feature vectors of one Poisson sample: (num_rows, d).

    `features` (B, d) are the f1 features of the images of one Poisson sample with rate `sample_rate`
    (possibly empty); `rows` (B,) assigns each image to exactly one row (its class, and a group drawn
    independently of the data). Sensitivity: the rows partition the sample, so adding or removing one image
    changes one row sum by at most `clip_norm` (each feature is clipped to that norm by `clip_rows`) and the
    stacked (num_rows, d) matrix by at most `clip_norm` in L2 norm. `gaussian_release` records one
    subsampled Gaussian event (noise multiplier, sample rate) in the ledger, then adds
    N(0, (noise_multiplier * clip_norm)^2) to every entry. The same computation as
    `clipped_gaussian_class_sums`, on a Poisson sample and with the sampling rate recorded.
    """
    if features.ndim != 2 or rows.shape != (features.shape[0],):
        raise InputError(f"features must be (B, d) and rows (B,), got {tuple(features.shape)} and "
                         f"{tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise InputError(f"row indices must be in [0, {num_rows})")
    sums = class_sums(clip_rows(features, clip_norm), rows, num_rows)
    return gaussian_release(sums, sensitivity=clip_norm, noise_multiplier=noise_multiplier, ledger=ledger,
                            noise=noise, label=label, sample_rate=sample_rate)


def aggregation_release(
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    sampler: PoissonSampler,
    features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    dim: int,
    num_classes: int,
    groups: int,
    digests: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    chunk: int,
) -> torch.Tensor:
    """Release 2 from the private set: one Poisson sample, its features by row (class, group), `release_aggregates`.

    ``features(x, y)`` is f1 minus the cycle's reference (a fixed function of earlier releases), evaluated in
    chunks of `chunk` images; `dim` is its width. With `groups` > 1 each sampled image's group is a keyed hash of
    its content `digests` entry under a secret key drawn from `noise` for this release (one key per release,
    whatever the sample). Returns the noisy (num_classes * groups, dim) row sums.
    """
    idx = sampler.sample().to(x_all.device)
    with torch.no_grad():
        feats = torch.cat([features(x_all[idx[i : i + chunk]], y_all[idx[i : i + chunk]])
                           for i in range(0, idx.numel(), chunk)]) if idx.numel() else \
            torch.zeros(0, dim, device=x_all.device)
    rows = y_all[idx] * groups
    if groups > 1:
        key = noise.secret_key()
        rows = rows + torch.from_numpy(keyed_buckets(digests[idx.cpu().numpy()], key, groups)).to(rows.device)
    return release_aggregates(feats, rows, num_classes * groups, clip_norm=clip_norm,
                              noise_multiplier=noise_multiplier, sample_rate=sampler.sample_rate, ledger=ledger,
                              noise=noise)


def accumulate_private(engine: DPSGD, x_all: torch.Tensor, y_all: torch.Tensor,
                       per_label: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], physical_batch: int) -> None:
    """The private half of one DP-SGD step (release 3, or the ablation's discriminator step).

    Draws the engine's own Poisson sample of the private set and adds the clipped per-example gradients of
    ``(x, *per_label(y))`` to its sum, `physical_batch` examples at a time; `per_label` maps labels to the
    loss's public per-example inputs (targets, references). The step is released by ``engine.add_noise()``
    (ledger first, then noise), after the caller has added its fake examples.
    """
    idx = engine.sampler.sample().to(x_all.device)
    for i in range(0, idx.numel(), physical_batch):
        part = idx[i : i + physical_batch]
        engine.clip_and_accumulate(x_all[part], *per_label(y_all[part]))
