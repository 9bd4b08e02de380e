"""DPDFD's privacy-relevant pieces: teacher training, the normalised distillation gradient, its release.

* `train_teacher` reads the private images directly: the documented exception
  to "private data only through mechanisms". Its result is never released,
  logged, reported or written; it only enters `normalised_gradient`.
* `normalised_gradient` computes the student's distillation gradient on one
  synthetic batch and scales it to L2 norm exactly ``clip_norm`` (flattened
  over all student parameters, or over the student's logits on the batch). Whatever the teacher, hence whatever the
  private data, the result lies in the ball of radius C: two data sets' vectors
  differ by at most 2C. It returns a vector only (``torch.autograd.grad``):
  nothing un-noised is left in the student's ``.grad``.
* `release_update` is the only place that vector leaves: one
  `gaussian_release` with sensitivity 2C (the ledger records a Gaussian event
  with noise multiplier std / 2C before the noise is drawn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpimages.privacy import calibrate_gaussian
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger
from dpimages.privacy.mechanisms import gaussian_release
from dpimages.privacy.rng import NoiseSource

RELEASE_LABEL = "dpdfd student step"


def calibrate_steps(epsilon: float, delta: float, steps: int) -> float:
    """Noise multiplier s of each of `steps` Gaussian releases so that their composition meets (epsilon, delta).

    Each release adds N(0, (2 C s)^2): in the notation of METHODS.md (noise
    std sigma * C) sigma = 2 s.
    """
    return calibrate_gaussian(epsilon, delta, count=steps)


def planned_event(noise_multiplier: float, steps: int) -> PrivacyEvent:
    """The run's whole schedule as one ledger event (reserved before any private access)."""
    return PrivacyEvent.gaussian(noise_multiplier, steps, RELEASE_LABEL)


def train_teacher(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                  lr: float, generator: torch.Generator) -> nn.Module:
    """Non-private training on the private data (Adam, cross-entropy); returns the model frozen, in eval mode.

    Nothing about this training (loss, accuracy, weights) is returned or logged.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(images.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    model.requires_grad_(False)
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                      temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature` (batch mean) or the mean absolute logit difference."""
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        log_target=True, reduction="batchmean")
    return (student_logits - teacher_logits).abs().mean()


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def normalise(vector: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """`vector` scaled to L2 norm exactly `clip_norm` (a zero vector stays zero: norm <= C either way)."""
    norm = vector.norm()
    if float(norm) == 0.0:
        return torch.zeros_like(vector)
    return vector * (clip_norm / norm)


def normalised_gradient(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, clip_norm: float,
                        loss: str = "kl", temperature: float = 1.0, space: str = "parameters") -> torch.Tensor:
    """Gradient of the distillation loss, flattened and scaled to norm `clip_norm`: the vector to release.

    `images` is a synthetic batch (generator output: no private data). The
    teacher's outputs are its only data-dependent input. ``space`` says what
    the gradient is taken with respect to: ``parameters`` (all student
    parameters, d entries) or ``outputs`` (the student's logits on the batch,
    B x K entries; the parameter update is then `backprop_released` of the
    noisy vector, post-processing). Either way the norm is C whatever the
    teacher, so two data sets' vectors differ by at most 2C.
    """
    with torch.no_grad():
        teacher_logits = teacher(images)
    if space == "outputs":
        with torch.no_grad():
            logits = student(images)
        wrt = [logits.requires_grad_(True)]
    else:
        logits = student(images)
        wrt = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(distillation_loss(logits, teacher_logits, loss, temperature), wrt)
    return normalise(flat(grads).detach(), clip_norm)


def backprop_released(student: nn.Module, images: torch.Tensor, released: torch.Tensor,
                      clip_norm: float) -> torch.Tensor:
    """The student's parameter update from a released logit gradient: J^T g, flattened, scaled to norm `clip_norm`.

    Uses only the student, the synthetic batch and the released (noisy)
    vector: post-processing. The rescaling to C keeps the step size the same
    at every budget (the direction is what the release determines).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    logits = student(images)
    grads = torch.autograd.grad(logits, params, grad_outputs=released.reshape(logits.shape))
    return normalise(flat(grads).detach(), clip_norm)


def release_update(normalised: torch.Tensor, *, clip_norm: float, noise_multiplier: float, ledger: PrivacyLedger,
                   noise: NoiseSource) -> torch.Tensor:
    """The noisy update: `normalised` + N(0, (2 C s)^2 I), recorded in the ledger first (sensitivity 2C)."""
    return gaussian_release(normalised, sensitivity=2.0 * clip_norm, noise_multiplier=noise_multiplier,
                            ledger=ledger, noise=noise, label=RELEASE_LABEL)


def update_scale(clip_norm: float, noise_multiplier: float, dim: int) -> float:
    """C / sqrt(C^2 + dim (2 C s)^2): the released update times this has expected norm about C.

    A public constant (C, s and the parameter count are fixed before any
    private access); multiplying the released vector by it is post-processing.
    """
    return clip_norm / math.sqrt(clip_norm**2 + dim * (2.0 * clip_norm * noise_multiplier) ** 2)


def set_gradients(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Write a flat (released) vector into the parameters' ``.grad`` for the optimiser."""
    offset = 0
    for p in params:
        p.grad = vector[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters {offset}")
