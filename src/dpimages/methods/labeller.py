"""A DP labeller any conditional generator can use: a DP-SGD classifier on scattering coefficients.

A method with ``labeller=relabel`` or ``labeller=filter`` trains, as the
first stage of its own plan, a classifier on the private images with
DP-SGD (Tramer and Boneh's ScatterNet+linear: fixed scattering coefficients,
`dpimages.nets.scattering`, then GroupNorm and a linear layer, ``ScatterCNN``
without channels; `dpimages.scatter_classifier`).
Its generator's samples are then relabelled by the classifier
(``relabel``) or kept only where the classifier agrees with the class the
generator was asked for (``filter``; images that never pass within
``FILTER_ROUNDS`` rounds keep the classifier's label).

Privacy contract (neighbouring relation: add or remove one image with its
label):

* The only private read is the DP-SGD training
  (`dpimages.scatter_classifier`): Poisson sampling at rate q =
  ``labeller_batch`` / N (N public), each example's gradient clipped to
  ``labeller_clip``, Gaussian noise of std ``noise_multiplier *
  labeller_clip`` on the sum, one ``subsampled_gaussian`` event per step,
  all of them reserved with the rest of the method's plan before any pixel
  is read.
* The joint plan: the labeller's noise multiplier is calibrated from public
  choices to ``labeller_share * epsilon`` on its own; the method then
  calibrates its own releases over the labeller's events and its own
  together (one PLD composition), so the whole run meets the target.
* Relabelling and filtering read only the trained classifier and the
  generator: post-processing of DP releases, no privacy cost. The
  classifier's weights are saved in the checkpoint (``labeller.*``), never
  its accuracy on private data; `dpimages.scatter_classifier.write_heldout_accuracy` writes its accuracy on
  held-out real images under ``private-eval/`` only (evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dpimages.privacy import PrivacyEvent, calibrate_dpsgd
from dpimages.runs import prefixed, unprefixed
from dpimages.scatter_classifier import ClassifierSchedule, ScatterClassifier

RELEASE_LABEL = "labeller: DP-SGD steps of a classifier on scattering coefficients"
FILTER_ROUNDS = 10  # a filtered sample draws at most this many candidates


@dataclass(frozen=True)
class LabellerPlan:
    """The labeller stage of a joint plan: mode, its epsilon share, schedule and calibrated noise (public)."""

    mode: str
    epsilon_share: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    schedule: ClassifierSchedule

    def events(self) -> list[PrivacyEvent]:
        return [PrivacyEvent.subsampled_gaussian(self.noise_multiplier, self.sample_rate, self.steps, RELEASE_LABEL)]

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "epsilon_share": self.epsilon_share, "sample_rate": self.sample_rate,
                "steps": self.steps, "noise_multiplier": self.noise_multiplier, **asdict(self.schedule)}


def classifier_text(info: dict[str, Any]) -> str:
    """The trained classifier and its DP-SGD schedule, from `LabellerPlan.describe` (public facts only)."""
    head = "a linear layer" if not info.get("channels") else f"a CNN {list(info['channels'])}"
    return (f"{head} on fixed scattering coefficients, trained with DP-SGD on the private images: {info['steps']} "
            f"steps, Poisson rate {info['sample_rate']:.4g}, per-example clip {info['clip_norm']:g}, noise "
            f"multiplier {info['noise_multiplier']:.5g}")


def use_text(mode: str) -> str:
    """How the samples use the classifier under `mode` (relabel or filter)."""
    return ("each sample is relabelled by it" if mode == "relabel" else
            "a sample is kept only where it agrees with the class the generator was asked for (redrawn up to "
            f"{FILTER_ROUNDS} times, then relabelled)")


def labeller_text(info: dict[str, Any]) -> str:
    """The report's paragraph on the labeller stage, from `LabellerPlan.describe` (public facts only)."""
    use = use_text(info["mode"])
    return (f"DP labeller ({info['mode']}): {classifier_text(info)}, calibrated on its own to "
            f"epsilon {info['epsilon_share']:.4g} (its share of the budget); the method's own releases were calibrated "
            f"over the labeller's steps and their events together (one PLD composition), all reserved before any "
            f"private read. {use[0].upper()}{use[1:]}: post-processing.")


def schedule_from(cfg: Any) -> ClassifierSchedule:
    """The labeller's schedule from a config's ``labeller_*`` keys."""
    return ClassifierSchedule(batch_size=cfg.labeller_batch, epochs=cfg.labeller_epochs, lr=cfg.labeller_lr,
                              clip_norm=cfg.labeller_clip)


def plan_labeller(cfg: Any, dataset_size: int, epsilon: float, delta: float,
                  share: float | None = None) -> LabellerPlan | None:
    """The labeller stage for a config with ``labeller`` != none, from public facts only (None otherwise).

    `share` (default: the config's ``labeller_share``) is the fraction of `epsilon` its steps are calibrated to;
    1.0 where the classifier is the run's only release (dpdfd's ``teacher=dp-sgd``, planned whatever ``labeller``
    says: there it is the teacher first)."""
    if cfg.labeller == "none" and share is None:
        return None
    schedule = schedule_from(cfg)
    q, steps = schedule.steps(dataset_size)
    eps = (cfg.labeller_share if share is None else share) * epsilon
    return LabellerPlan(cfg.labeller, eps, q, steps, calibrate_dpsgd(eps, delta, q, steps), schedule)


def label_samples(classifier: ScatterClassifier, mode: str, labels: np.ndarray,
                  generate: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) for the requested `labels`: relabelled, or filtered to agreement (post-processing).

    `generate(labels)` returns uint8 images (n, H, W, C) conditioned on `labels`. With ``filter``, the
    images the classifier disagrees with are drawn again, up to `FILTER_ROUNDS` times; those still
    disagreeing keep the classifier's label.
    """
    images = generate(labels)
    predicted = classifier.predict(images)
    if mode == "relabel":
        return images, predicted
    for _ in range(FILTER_ROUNDS - 1):
        redo = np.flatnonzero(predicted != labels)
        if redo.size == 0:
            break
        fresh = generate(labels[redo])
        fresh_pred = classifier.predict(fresh)
        ok = fresh_pred == labels[redo]
        images[redo[ok]] = fresh[ok]
        predicted[redo[ok]] = labels[redo[ok]]
    return images, predicted


def labeller_tensors(classifier: ScatterClassifier) -> dict[str, torch.Tensor]:
    """The trained head's weights for a checkpoint (``labeller.*``); the scattering has none."""
    return prefixed("labeller", classifier.head.state_dict())


def has_labeller(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint holds a trained labeller (`labeller_tensors`)."""
    return any(k.startswith("labeller.") for k in tensors)


def restore_labeller(schedule: ClassifierSchedule, image_shape: tuple[int, int, int], num_classes: int,
                     tensors: dict[str, torch.Tensor], device: torch.device) -> ScatterClassifier:
    """The labeller saved by `labeller_tensors`."""
    model = ScatterClassifier(image_shape, num_classes, schedule.channels, schedule.hidden)
    model.head.load_state_dict(unprefixed("labeller", tensors))
    return model.to(device).eval()
