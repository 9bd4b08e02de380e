"""DPDM's warm start: a cheap first stage whose images pretrain the U-Net before DP-SGD.

Modes (``warm_start``):

* ``none``: DP-SGD from a random initialisation (the published method).
* ``central`` (after DP-FETA, Li et al. 2025): ``central_releases`` noisy
  per-class means of Poisson-sampled batches of the private images,
  downsampled to ``central_size`` pixels. Each release is one Poisson-
  subsampled Gaussian mechanism (rate ``central_batch / N``): every sampled
  image contributes the row ``[x, kappa]`` (x its downsampled pixels in
  [0, 1], ``kappa = central_kappa`` a constant coordinate that counts it),
  clipped to L2 norm ``C = sqrt(D + kappa^2)`` (the largest norm such a row
  can have, so no row is changed), summed per class. Classes are disjoint,
  so adding or removing one image moves the stacked sums by at most C. The
  central image of a class is its noisy pixel sum over its noisy count
  (post-processing), upsampled to the image size. Pretraining uses random
  flips and shifts.
* ``dp-mepf`` (ours): a DP-MEPF fit (`dpimages.methods.dp_mepf`, at preset
  ``warm_preset``) calibrated to the stage's share of epsilon; its samples
  (post-processing) pretrain the U-Net class-conditionally.
* ``public`` (PrivImage-like): the public images (``--public``) pretrain
  the U-Net, with their labels when their class names are the private ones
  (no privacy cost). When they are labelled with other classes, PrivImage's
  selection (Li et al. 2024) picks which of them to pretrain on: a conv
  classifier trained on the public images alone predicts each private
  image's public class, and ONE Gaussian histogram of those predictions is
  released (add/remove one image moves one bin by 1: L2 sensitivity 1),
  calibrated to the stage's share; the ``public_classes`` classes with the
  largest noisy counts (post-processing) are kept and pretrain the U-Net
  under the null label. ``public_classes=0``: all public images, no release.

Joint plan: the stage's events are fixed from public facts before any
private access (`WarmStart.events`; ``warm_share`` of epsilon, calibrated
on their own), and DPDM's noise multiplier is then calibrated over the
stage's events plus the DP-SGD schedule together with one PLD accountant,
so the whole run meets (epsilon, delta). All of it is reserved in the ledger
before the stage reads any private pixel. Pretraining is post-processing
(`dpimages.methods.pretrain`: no ledger, no noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dpimages.data import ImageData
from dpimages.data.imagedata import to_unit_range
from dpimages.errors import InputError
from dpimages.methods.dpdm.config import DPDMConfig
from dpimages.methods.prior import Prior, fit_prior, plan_prior
from dpimages.nets.feature_extractors import train_conv_classifier
from dpimages.privacy import PrivacyEvent, calibrate
from dpimages.privacy.dpsgd import PoissonSampler
from dpimages.privacy.mechanisms import clipped_gaussian_class_sums, noisy_histogram
from dpimages.seeds import stream_seed
from dpimages.synthesizer import FitContext

CENTRAL_LABEL = "dpdm warm start: per-class sums of downsampled images and counts (central images)"
SELECT_LABEL = "dpdm warm start: histogram of the private images' predicted public classes (class selection)"
WARM_STARTS = ("none", "central", "dp-mepf", "public")


@dataclass
class WarmStart:
    """The planned first stage: its events (public facts only) and what it needs to run."""

    mode: str
    epsilon: float = 0.0  # the stage's own epsilon target (its share); 0 without releases
    events: list[PrivacyEvent] = field(default_factory=list)
    prior: Prior | None = None
    central_noise: float = 0.0
    central_rate: float = 0.0
    select_noise: float = 0.0  # the class-selection histogram's noise multiplier (0: no selection)
    select_keep: int = 0  # public classes kept by the selection
    selected: list[str] = field(default_factory=list)  # their names, once chosen (post-processing of the release)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "epsilon_share": self.epsilon, "events": [e.label for e in self.events],
                **({"central_noise": self.central_noise, "central_rate": self.central_rate}
                   if self.mode == "central" else {}),
                **({"select_noise": self.select_noise, "select_keep": self.select_keep} if self.select_keep else {})}


def selection_size(cfg: DPDMConfig, private: ImageData, public: ImageData) -> int:
    """How many public classes the selection keeps; 0 when there is no selection (public facts only)."""
    if public.labels is None and cfg.public_classes > 0:
        raise InputError(f"public_classes {cfg.public_classes} needs labelled public images; {public.name} has none")
    foreign = public.labels is not None and list(public.classes) != list(private.classes)
    if not foreign or cfg.public_classes == 0:
        return 0
    keep = math.ceil(public.num_classes / 2) if cfg.public_classes < 0 else cfg.public_classes
    if keep > public.num_classes:
        raise InputError(f"public_classes {cfg.public_classes} is more than the public data's "
                         f"{public.num_classes} classes")
    return 0 if keep == public.num_classes else keep  # keeping every class needs no release


def central_clip(cfg: DPDMConfig, channels: int) -> float:
    """The rows' norm bound sqrt(D + kappa^2): D downsampled pixels in [0, 1] plus the counting coordinate."""
    return math.sqrt(cfg.central_size**2 * channels + cfg.central_kappa**2)


def central_rows(x: torch.Tensor, cfg: DPDMConfig) -> torch.Tensor:
    """Each image's released row ``[downsampled pixels in [0, 1], kappa]``: (B, C, H, W) in [-1, 1] -> (B, D + 1).

    Its norm is at most `central_clip` (all pixels 1), so the mechanism's clipping never changes a row.
    """
    size = cfg.central_size
    small = F.adaptive_avg_pool2d((x.double() + 1.0) / 2.0, (size, size)).reshape(x.shape[0], -1)
    return torch.cat([small, torch.full((x.shape[0], 1), cfg.central_kappa, dtype=torch.float64)], dim=1)


def plan(cfg: DPDMConfig, private: ImageData, public: ImageData | None, epsilon: float, delta: float,
         n: int) -> WarmStart:
    """The warm start's planned events at ``warm_share * epsilon``: public facts only (N = `n`, shapes, config)."""
    mode = cfg.warm_start
    if mode == "none":
        return WarmStart(mode)
    if mode == "public":
        if public is None:
            raise InputError("warm_start=public needs public images: pass --public SPEC")
        if public.image_shape != private.image_shape:
            raise InputError(f"warm_start=public: public images are {public.image_shape} (H, W, C), the private "
                             f"ones {private.image_shape}")
        keep = selection_size(cfg, private, public)
        if not keep:
            return WarmStart(mode)
        share = cfg.warm_share * epsilon
        noise = calibrate(lambda s: [PrivacyEvent.gaussian(s, 1, SELECT_LABEL)], share, delta)
        return WarmStart(mode, share, [PrivacyEvent.gaussian(noise, 1, SELECT_LABEL)], select_noise=noise,
                         select_keep=keep)
    share = cfg.warm_share * epsilon
    if mode == "dp-mepf":
        prior = plan_prior(cfg.warm_preset, private, public, share, delta, n)
        return WarmStart(mode, share, prior.events, prior=prior)
    if not 1 <= cfg.central_batch <= n:
        raise InputError(f"central_batch must be in [1, {n}] (the data set size), got {cfg.central_batch}")
    rate = cfg.central_batch / n
    noise = calibrate(lambda s: [PrivacyEvent.subsampled_gaussian(s, rate, cfg.central_releases, CENTRAL_LABEL)],
                      share, delta)
    event = PrivacyEvent.subsampled_gaussian(noise, rate, cfg.central_releases, CENTRAL_LABEL)
    return WarmStart(mode, share, [event], central_noise=noise, central_rate=rate)


def run_stage(warm: WarmStart, cfg: DPDMConfig, private: ImageData, public: ImageData | None,
              ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make the stage's releases (through `dpimages.privacy` only) and return its pretraining images.

    Returns (images (M, C, H, W) in [-1, 1], labels (M,) or None for the null label): samples of the DP prior,
    the noisy central images, or the public images. Everything returned is a DP release or public.
    """
    if warm.mode == "public":
        assert public is not None
        if warm.select_keep:
            return selected_public_images(warm, cfg, private, public, ctx), None
        same = list(public.classes) == list(private.classes) and public.labels is not None
        return public.to_tensor(), (public.label_tensor() if same else None)
    if warm.mode == "dp-mepf":
        assert warm.prior is not None
        fit_prior(warm.prior, private, public, ctx)
        samples = warm.prior.synthesizer.sample(cfg.warm_images, seed=stream_seed(ctx.seed, "dpdm", "warm-samples"))
        return samples.to_tensor(), samples.label_tensor()
    return central_images(warm, cfg, private, ctx)


def central_images(warm: WarmStart, cfg: DPDMConfig, private: ImageData,
                   ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``central_releases`` noisy per-class central images (see the module docstring): (R K, C, H, W), labels."""
    h, w, c = private.image_shape
    k, size = private.num_classes, cfg.central_size
    clip = central_clip(cfg, c)
    sampler = PoissonSampler(len(private), warm.central_rate, ctx.noise, shard=False,  # rank 0 alone (see fit)
                             dataset_size=ctx.public_size(private))
    x_all, y_all = private.to_tensor(), private.label_tensor()
    images, labels = [], []
    for _ in range(cfg.central_releases):
        idx = sampler.sample()
        sums = clipped_gaussian_class_sums(
            central_rows(x_all[idx], cfg), y_all[idx], k, clip_norm=clip, noise_multiplier=warm.central_noise,
            ledger=ctx.ledger, noise=ctx.noise, label=CENTRAL_LABEL, sample_rate=warm.central_rate)
        # post-processing: noisy sum / noisy count (at least one image), back to [-1, 1] at full size
        counts = (sums[:, -1] / cfg.central_kappa).clamp(min=1.0)
        means = (sums[:, :-1] / counts[:, None]).clamp(0.0, 1.0).float().reshape(k, c, size, size)
        images.append(F.interpolate(means, size=(h, w), mode="bilinear", align_corners=False) * 2.0 - 1.0)
        labels.append(torch.arange(k))
    return torch.cat(images), torch.cat(labels)


def selected_public_images(warm: WarmStart, cfg: DPDMConfig, private: ImageData, public: ImageData,
                           ctx: FitContext) -> torch.Tensor:
    """PrivImage's selection: the public images of the `select_keep` public classes the private data resembles most.

    A conv classifier trained on the public images alone (no private data) predicts each private image's public
    class; the counts of those predictions are released once through `noisy_histogram` (sensitivity 1 under
    add/remove of one image, noise multiplier `select_noise`, recorded in the ledger before the noise is drawn).
    The classes with the largest noisy counts are chosen from the release alone (post-processing). Returns the
    chosen classes' public images (M, C, H, W) in [-1, 1] and sets ``warm.selected`` to their names.
    """
    x_public, y_public = public.to_tensor(), public.label_tensor()
    classifier, _ = train_conv_classifier(x_public, y_public, public.num_classes, channels=(32, 64),
                                          epochs=cfg.select_epochs,
                                          seed=stream_seed(ctx.seed, "dpdm", "select-classifier"))
    predicted = predicted_classes(classifier, private)
    noisy = noisy_histogram(predicted, public.num_classes, noise_multiplier=warm.select_noise, ledger=ctx.ledger,
                            noise=ctx.noise, label=SELECT_LABEL)
    present = torch.bincount(y_public, minlength=public.num_classes) > 0  # public fact
    chosen = torch.argsort(noisy.masked_fill(~present, -math.inf), descending=True, stable=True)
    chosen = chosen[: min(warm.select_keep, int(present.sum()))]
    warm.selected = [public.classes[int(c)] for c in chosen]
    return x_public[torch.isin(y_public, chosen)]


def predicted_classes(classifier: torch.nn.Module, images: ImageData) -> torch.Tensor:
    """The classifier's class of each image (N,), one image per forward pass.

    A batch's composition could change the kernels' rounding and so another image's argmax; one pass per image
    makes each prediction a function of its own image alone, so a histogram of them has sensitivity 1 exactly.
    """
    with torch.no_grad():
        return torch.tensor([int(classifier(to_unit_range(torch.from_numpy(images.images[i : i + 1]))).argmax(1))
                             for i in range(len(images))], dtype=torch.long)
