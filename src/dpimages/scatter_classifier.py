"""A classifier trained with DP-SGD on scattering coefficients (Tramer and Boneh, 2021: ScatterNet+linear).

Used by the methods' DP labeller (`dpimages.methods.labeller`) and by the
benchmark's reference row ``dpsgd-classifier+scatter``.

Privacy contract (neighbouring relation: add or remove one image with its
label): the only private read is DP-SGD. Poisson sampling at rate q =
batch / N (N public), each example's gradient clipped to ``clip_norm``,
Gaussian noise of std ``noise_multiplier * clip_norm`` on the sum, one
``subsampled_gaussian`` event per step; the whole schedule is reserved in
the ledger before any pixel is read. The scattering coefficients are a fixed
per-example map (no parameters, no data): computing them once per image
changes nothing. Nothing about the private data is returned but the trained
weights.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dpimages.data import ImageData, to_unit_range
from dpimages.errors import InputError
from dpimages.nets import ScatterCNN
from dpimages.nets.scattering import Scattering
from dpimages.privacy import PrivacyLedger
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.noise import NoiseSource
from dpimages.runs import check_private_eval_path

MAX_PRECOMPUTED_BYTES = 2 << 30  # coefficients of every image kept in memory up to this size


def poisson_schedule(n: int, batch_size: int, epochs: float) -> tuple[int, float, int]:
    """(expected batch, sample rate q, steps) for N = `n` (public): the batch capped at N / 2, q = batch / N,
    steps = round(epochs / q). The one schedule of both DP-SGD reference classifiers and the labeller."""
    batch = max(1, min(batch_size, n // 2 or 1))
    q = batch / n
    return batch, q, max(1, round(epochs / q))


@dataclass(frozen=True)
class ClassifierSchedule:
    """Public sizes of one DP-SGD scattering classifier: expected batch, epochs, SGD, clipping, head widths."""

    batch_size: int
    epochs: float
    lr: float
    clip_norm: float = 0.1
    momentum: float = 0.9
    channels: tuple[int, ...] = ()  # () : a linear head on the coefficients; (c1, c2): a small CNN
    hidden: int = 32

    def steps(self, n: int) -> tuple[float, int]:
        """(sample rate q, steps) for N = `n` (public): `poisson_schedule`."""
        _, q, steps = poisson_schedule(n, self.batch_size, self.epochs)
        return q, steps


class ScatterClassifier(nn.Module):
    """Scattering (fixed, no parameters) followed by `ScatterCNN` (the trained head)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...] = (),
                 hidden: int = 32) -> None:
        super().__init__()
        h, w, c = image_shape
        self.scattering = Scattering((h, w), c)
        self.head = ScatterCNN(self.scattering.out_channels, num_classes, self.scattering.out_size,
                               tuple(channels), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scattering(x))

    @torch.no_grad()
    def predict(self, images: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Class labels (N,) int64 for uint8 images (N, H, W, C)."""
        was = self.head.training
        self.head.eval()
        device = next(self.head.parameters()).device
        out = [self(to_unit_range(torch.from_numpy(images[i : i + chunk]), device)).argmax(1).cpu()
               for i in range(0, len(images), chunk)]
        self.head.train(was)
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def _loss(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x), y, reduction="none")  # per example: the engine clips each gradient


def train_scatter_classifier(private: ImageData, schedule: ClassifierSchedule, noise_multiplier: float, *,
                             ledger: PrivacyLedger, noise: NoiseSource, dataset_size: int, label: str,
                             init: AbstractContextManager[None], device: torch.device, progress: bool = True,
                             desc: str = "DP-SGD scattering classifier") -> ScatterClassifier:
    """Train a `ScatterClassifier` on `private` with DP-SGD (see the module docstring); the schedule is reserved
    in `ledger` before any pixel is read. `init`: the seeded-initialisation block of the head."""
    q, steps = schedule.steps(dataset_size)
    with init:
        model = ScatterClassifier(private.image_shape, private.num_classes, schedule.channels,
                                  schedule.hidden).to(device)
    sampler = PoissonSampler(len(private), q, noise, dataset_size=dataset_size)
    engine = DPSGD(model.head, _loss, sampler=sampler, noise_multiplier=noise_multiplier,
                   clip_norm=schedule.clip_norm, ledger=ledger, noise=noise, label=label)
    engine.plan(steps)  # BudgetExceeded here, before any private access
    images = private.to_tensor(device)
    # a fixed per-example map: computed once for all images when the schedule passes over them at least once and
    # they fit in memory (large images: per batch instead)
    size = len(private) * model.scattering.out_channels * math.prod(model.scattering.out_size) * 4
    coefficients = model.scattering.embed(images) if q * steps >= 1 and size <= MAX_PRECOMPUTED_BYTES else None
    labels = private.label_tensor(device)
    opt = torch.optim.SGD(model.head.parameters(), lr=schedule.lr, momentum=schedule.momentum)
    bar = tqdm(total=steps, initial=steps - engine.steps_remaining, disable=not progress, desc=desc, unit="step")
    while engine.steps_remaining > 0:
        idx = sampler.sample().to(device)
        x = coefficients[idx] if coefficients is not None else model.scattering.embed(images[idx])
        engine.step(x, labels[idx])
        opt.step()
        bar.update(1)
    bar.close()
    model.eval()
    return model


def write_heldout_accuracy(classifier: ScatterClassifier, test: ImageData, path: Path) -> dict[str, Any]:
    """The DP classifier's accuracy on held-out real images, written as JSON to `path`, which must lie under
    ``private-eval/``: an exact statistic of real data without noise (evaluation for the owner, never in a
    shareable file)."""
    check_private_eval_path(path, "the classifier's evaluation")
    if test.labels is None:
        raise InputError(f"{test.name}: the classifier's evaluation needs labelled held-out images")
    predicted = classifier.predict(test.images)
    result = {"what": "accuracy of the run's DP classifier (labeller or DP teacher) on held-out real images",
              "test": test.name, "n_test": len(test), "accuracy": float((predicted == test.labels).mean())}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
