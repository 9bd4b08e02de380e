"""Gaussian mechanisms: the only places where privacy noise is drawn.

Each mechanism takes the private quantity in a form whose sensitivity it
enforces itself (clipping rows, counting indices) and hands it to
`NoiseSource.release`, the one call that records its event in the ledger
(which checks the budget and writes privacy.json) and only then draws noise
with std = noise multiplier x declared sensitivity.

Sensitivities (add/remove one image with its label):
* `clipped_gaussian_sum`: rows clipped to L2 norm C, summed; one image moves
  the sum by at most C.
* `clipped_gaussian_class_sums`: the same per class; classes are disjoint,
  so the stacked per-class sums move by at most C in total.
* `noisy_histogram` / `noisy_class_counts`: each image adds 1 to one bin;
  L2 sensitivity 1.
* `gaussian_release`: a caller-bounded value with declared L2 sensitivity
  (for values normalised by construction, e.g. DPDFD's teacher ensemble: rows
  scaled to norm C by `normalise_rows`, one row per shard, so one image moves
  the sum by at most 2C).

Row clipping and scaling (`clip_rows`, `normalise_rows`) live in
`dpimages.clipping`, which networks use too; they are re-exported here.
"""

from __future__ import annotations

import torch

from dpimages.clipping import clip_rows, normalise_rows
from dpimages.errors import InputError
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger, check_positive
from dpimages.privacy.noise import NoiseSource

__all__ = ["class_sums", "clip_rows", "clipped_gaussian_class_sums", "clipped_gaussian_sum", "gaussian_release",
           "noisy_class_counts", "noisy_histogram", "normalise_rows"]


def _event(noise_multiplier: float, sample_rate: float | None, label: str) -> PrivacyEvent:
    if sample_rate is None:
        return PrivacyEvent.gaussian(noise_multiplier, 1, label)
    return PrivacyEvent.subsampled_gaussian(noise_multiplier, sample_rate, 1, label)


def gaussian_release(
    value: torch.Tensor,
    *,
    sensitivity: float,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str,
    sample_rate: float | None = None,
) -> torch.Tensor:
    """value + N(0, (noise_multiplier * sensitivity)^2); the caller guarantees the L2 sensitivity."""
    check_positive("sensitivity", sensitivity)
    return noise.release(value, sensitivity=sensitivity, event=_event(noise_multiplier, sample_rate, label),
                         ledger=ledger)


def clipped_gaussian_sum(
    rows: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str,
    sample_rate: float | None = None,
) -> torch.Tensor:
    """Noisy sum over examples of rows clipped to `clip_norm` (shape rows.shape[1:])."""
    check_positive("clip_norm", clip_norm)
    total = clip_rows(rows, clip_norm).sum(dim=0)
    return gaussian_release(
        total,
        sensitivity=clip_norm,
        noise_multiplier=noise_multiplier,
        ledger=ledger,
        noise=noise,
        label=label,
        sample_rate=sample_rate,
    )


def class_sums(rows: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D) per-class sums of the (N, D) rows (no noise: internal use)."""
    if labels.shape != (rows.shape[0],):
        raise InputError(f"labels must have shape ({rows.shape[0]},), got {tuple(labels.shape)}")
    out = torch.zeros((num_classes, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, labels.to(rows.device).long(), rows)


def clipped_gaussian_class_sums(
    rows: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str,
    sample_rate: float | None = None,
) -> torch.Tensor:
    """Noisy per-class sums of clipped rows, released as one event (classes are disjoint).

    `sample_rate`: the rows are a Poisson sample at this rate (the event is a subsampled Gaussian).
    """
    check_positive("clip_norm", clip_norm)
    sums = class_sums(clip_rows(rows, clip_norm), labels, num_classes)
    return gaussian_release(
        sums, sensitivity=clip_norm, noise_multiplier=noise_multiplier, ledger=ledger, noise=noise, label=label,
        sample_rate=sample_rate,
    )


def noisy_histogram(
    bins: torch.Tensor,
    num_bins: int,
    *,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str,
) -> torch.Tensor:
    """Counts of `bins` (one index per private example) plus N(0, noise_multiplier^2)."""
    if bins.ndim != 1:
        raise InputError(f"bins must be one index per example, got shape {tuple(bins.shape)}")
    if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= num_bins):
        raise InputError(f"bin indices must be in [0, {num_bins})")
    counts = torch.bincount(bins.long().cpu(), minlength=num_bins).to(torch.float64)
    return gaussian_release(
        counts, sensitivity=1.0, noise_multiplier=noise_multiplier, ledger=ledger, noise=noise, label=label
    )


def noisy_class_counts(
    labels: torch.Tensor,
    num_classes: int,
    *,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str = "class counts",
) -> torch.Tensor:
    """Noisy number of private images per class (sensitivity 1)."""
    return noisy_histogram(
        labels, num_classes, noise_multiplier=noise_multiplier, ledger=ledger, noise=noise, label=label
    )
