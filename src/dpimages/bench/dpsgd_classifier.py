"""Reference row "dpsgd-classifier": a classifier trained with DP-SGD directly on the private data.

This is the ceiling a DP generator chases: the accuracy of `SmallCNN`
(GroupNorm, tanh, ~26k parameters) trained on the private images with
`dpimages.privacy.dpsgd` at the same (epsilon, delta), tested on real test
images.

Privacy contract: the noise multiplier is calibrated from public choices
(dataset size, preset's batch and epochs, epsilon, delta) before any pixel
is read; the engine reserves the whole schedule in the ledger, then every
noisy step is recorded before its noise is drawn. Only the trained model's
test accuracy and the ledger's epsilon are reported: no per-batch loss on
private data. Neighbouring relation: add or remove one image with its label.
Hyper-parameters are fixed in the presets, with no selection on the
private images (SGD momentum 0.9, lr 2 was chosen on 3-epoch runs scored on
the 5,000 held-out Fashion-MNIST validation images, never on the test set).

``dpsgd-classifier+scatter`` (``features="scatter"``): Tramer and Boneh's
(2021) ScatterNet+linear instead, a linear layer on fixed scattering
coefficients trained with DP-SGD (`dpimages.scatter_classifier`, the same
code as the methods' DP labeller; schedule `SCATTER_PRESETS`, chosen on the
validation images with benchmarks/scatter_classifier.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dpimages.data import ImageData, to_unit_range
from dpimages.errors import InputError
from dpimages.nets import SmallCNN, num_parameters
from dpimages.privacy import NoiseSource, PrivacyLedger, calibrate_dpsgd, validate_budget
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.ledger import NEIGHBOURING
from dpimages.scatter_classifier import ClassifierSchedule, poisson_schedule, train_scatter_classifier


@dataclass(frozen=True)
class ClassifierPreset:
    """Sizes of one DP-SGD classifier run; `low_epsilon_*` apply when epsilon <= `low_epsilon`."""

    batch_size: int  # expected Poisson batch size: q = batch_size / N
    epochs: float  # steps = round(epochs / q)
    lr: float
    momentum: float = 0.9
    clip_norm: float = 1.0
    low_epsilon: float = 2.0
    low_epsilon_batch_size: int | None = None
    low_epsilon_epochs: float | None = None
    eval_batch: int = 2048


PRESETS: dict[str, ClassifierPreset] = {
    # seconds; for tests only, no quality claim
    "smoke": ClassifierPreset(batch_size=256, epochs=0.1, lr=2.0),
    # `python -m dpimages.demo`: a short schedule, about a minute per epsilon on 2 cores
    "demo": ClassifierPreset(batch_size=1024, epochs=3, lr=2.0),
    # BENCHMARK.md's prototype schedule: ~10 minutes per epsilon on 2 cores
    "cpu": ClassifierPreset(batch_size=1024, epochs=20, lr=2.0, low_epsilon_batch_size=2048, low_epsilon_epochs=15),
}
# the classifier is small: on a GPU the same schedule as `cpu` takes minutes
PRESETS["gpu"] = PRESETS["gpu-short"] = PRESETS["cpu"]
# features="scatter": batch, epochs, lr, clip (benchmarks/results/scatter_classifier.jsonl)
SCATTER_PRESETS: dict[str, ClassifierSchedule] = {
    "smoke": ClassifierSchedule(256, 0.1, 4.0, 0.1),
    "demo": ClassifierSchedule(4096, 5, 4.0, 0.1),
    "cpu": ClassifierSchedule(8192, 40, 4.0, 0.1),
}
SCATTER_PRESETS["gpu"] = SCATTER_PRESETS["gpu-short"] = SCATTER_PRESETS["cpu"]


def schedule(n: int, epsilon: float, preset: ClassifierPreset) -> tuple[int, float, int]:
    """(expected batch size, sample rate q, steps) from public quantities only."""
    low = epsilon <= preset.low_epsilon
    batch = (preset.low_epsilon_batch_size if low and preset.low_epsilon_batch_size else preset.batch_size)
    epochs = preset.low_epsilon_epochs if low and preset.low_epsilon_epochs else preset.epochs
    return poisson_schedule(n, batch, epochs)


def classifier_loss(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (the engine clips each example's gradient)."""
    return F.cross_entropy(model(x), y, reduction="none")


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, device: torch.device, batch: int = 2048) -> float:
    """Accuracy on (public or test) labelled data."""
    model.eval()
    correct = 0
    y = data.label_tensor(device)
    for start in range(0, len(data), batch):
        x = to_unit_range(torch.from_numpy(data.images[start : start + batch]), device)
        correct += int((model(x).argmax(1) == y[start : start + batch]).sum())
    model.train()
    return correct / len(data)


def train_dpsgd_classifier(
    private: ImageData,
    test: ImageData,
    *,
    epsilon: float,
    delta: float,
    preset: str = "cpu",
    ledger: PrivacyLedger,
    noise: NoiseSource,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    features: str = "pixels",
) -> dict:
    """Train `SmallCNN` with DP-SGD on `private` at (epsilon, delta); test on `test`.

    Returns accuracy on `test`, the schedule (epochs, steps, sample rate,
    batch), the calibrated sigma, epsilon (PLD) and epsilon (RDP) from the
    ledger, and the fit time in seconds. Raises InputError for bad input
    and BudgetExceeded (before any private access) if the ledger cannot hold
    the schedule.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} for dpsgd-classifier; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    validate_budget(epsilon, delta, len(private))
    for d, what in ((private, "private"), (test, "test")):
        if d.labels is None:
            raise InputError(f"{d.name}: {what} data needs labels for the dpsgd-classifier")
    if test.image_shape != private.image_shape or test.num_classes != private.num_classes:
        raise InputError(
            f"test data {test.name} has images {test.image_shape} / {test.num_classes} classes, "
            f"private {private.image_shape} / {private.num_classes} classes"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = len(private)
    if features == "scatter":
        return _scatter_classifier(private, test, epsilon, delta, preset, ledger, noise, progress, dev, seed)
    batch, q, steps = schedule(n, epsilon, p)
    sigma = calibrate_dpsgd(epsilon, delta, q, steps)  # public quantities only

    h, w, c = private.image_shape
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=c, num_classes=private.num_classes, image_size=(h, w)).to(dev)
    sampler = PoissonSampler(n, q, noise)
    engine = DPSGD(model, classifier_loss, sampler=sampler, noise_multiplier=sigma, clip_norm=p.clip_norm,
                   ledger=ledger, noise=noise, label="dpsgd-classifier")
    engine.plan(steps)  # BudgetExceeded here, before any private access
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum)

    t0 = time.time()
    x_all = private.to_tensor(dev)
    y_all = private.label_tensor(dev)
    bar = tqdm(total=steps, initial=steps - engine.steps_remaining, disable=not progress,
               desc=f"DP-SGD classifier eps={epsilon:g}", unit="step")
    while engine.steps_remaining > 0:
        idx = sampler.sample().to(dev)
        info = engine.step(x_all[idx], y_all[idx])
        opt.step()
        bar.update(1)
        bar.set_postfix(noisy_grad_norm=f"{info.noisy_grad_norm:.3f}")
    bar.close()
    fit_s = time.time() - t0
    del x_all, y_all
    acc = accuracy(model, test, dev, p.eval_batch)
    return {
        "method": "dpsgd-classifier",
        "model": f"SmallCNN ({num_parameters(model)} parameters, GroupNorm, tanh)",
        "preset": preset,
        "accuracy": acc,
        "test": test.name,
        "private": private.name,
        "dataset_size": n,
        "epochs": steps * q,
        "steps": steps,
        "batch_size": batch,
        "sample_rate": q,
        "sigma": sigma,
        "clip_norm": p.clip_norm,
        "epsilon_target": epsilon,
        "epsilon": ledger.epsilon(),
        "epsilon_rdp": ledger.epsilon_rdp(),
        "delta": delta,
        "neighbouring": NEIGHBOURING,
        "fit_s": fit_s,
        "hyperparameters": asdict(p),
    }


def _scatter_classifier(private: ImageData, test: ImageData, epsilon: float, delta: float, preset: str,
                        ledger: PrivacyLedger, noise: NoiseSource, progress: bool, device: torch.device,
                        seed: int) -> dict:
    """``features="scatter"``: ScatterNet+linear trained with DP-SGD (same return value as the pixel CNN)."""
    from dpimages.seeds import seeded_init

    sched = SCATTER_PRESETS[preset]
    n = len(private)
    q, steps = sched.steps(n)
    sigma = calibrate_dpsgd(epsilon, delta, q, steps)  # public quantities only
    t0 = time.time()
    model = train_scatter_classifier(private, sched, sigma, ledger=ledger, noise=noise, dataset_size=n,
                                     label="dpsgd-classifier+scatter", init=seeded_init(seed), device=device,
                                     progress=progress, desc=f"DP-SGD scattering classifier eps={epsilon:g}")
    fit_s = time.time() - t0
    acc = float((model.predict(test.images) == test.labels).mean())
    return {
        "method": "dpsgd-classifier+scatter", "preset": preset, "accuracy": acc, "test": test.name,
        "model": f"ScatterNet+linear ({num_parameters(model)} parameters, GroupNorm; scattering J=2, L=8)",
        "private": private.name, "dataset_size": n, "epochs": steps * q, "steps": steps, "batch_size": sched.batch_size,
        "sample_rate": q, "sigma": sigma, "clip_norm": sched.clip_norm, "epsilon_target": epsilon,
        "epsilon": ledger.epsilon(), "epsilon_rdp": ledger.epsilon_rdp(), "delta": delta,
        "neighbouring": NEIGHBOURING, "fit_s": fit_s, "hyperparameters": asdict(sched),
    }
