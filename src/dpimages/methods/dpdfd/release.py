"""DPDFD's privacy-relevant pieces: shards, teachers, the summed normalised distillation gradient, its release.

* `shard_of` assigns every private image to one of T shards by a keyed hash
  of the image and its label: adding or removing one image changes exactly
  one shard.
* `train_teacher` reads (a shard of) the private images directly: the
  documented exception to "private data only through mechanisms". Its
  result is never released, logged, reported or written; it only enters
  `ensemble_gradient`.
* `ensemble_gradient` computes, for every teacher, the student's
  distillation gradient on one synthetic batch, flattened (over all student
  parameters, or over the student's logits on the batch)
  (`teacher_gradients`), scales each to L2 norm exactly ``clip_norm`` and
  sums the T vectors (`aggregate`). Teacher i depends on
  shard i only, so a neighbouring data set moves one term of the sum, from a
  vector of norm <= C to another: the sum moves by at most 2C, whatever T
  (with T = 1: two data sets' vectors differ by at most 2C). It returns a
  vector only (``torch.func``): nothing un-noised is left in the student's
  ``.grad``.
* `release_update` is the only place that vector leaves: one
  `gaussian_release` with sensitivity 2C (the ledger records a Gaussian event
  with noise multiplier std / 2C before the noise is drawn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpimages.privacy import calibrate_gaussian
from dpimages.privacy.keyed import content_digests, keyed_buckets
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger
from dpimages.privacy.mechanisms import gaussian_release, normalise_rows
from dpimages.privacy.noise import NoiseSource

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


def shard_of(images: np.ndarray, labels: np.ndarray, shards: int, key: int) -> np.ndarray:
    """The shard (0 .. shards-1) of every image: a keyed hash of its content digest (pixels, shape, label).

    A function of the image and its label alone (and of the `key`, from a seed stream so that a resumed run
    keeps its shards; `dpimages.privacy.keyed`): adding or removing one image changes the content of exactly
    one shard and moves no other image. A split by position (a permutation of indices) would not have this
    property: removing image j shifts every later index. Identical images with identical labels share a
    shard. Shard sizes are never released (they are exact statistics of the private data).
    """
    return keyed_buckets(content_digests(images, labels), key, shards)


def teacher_steps(epochs: int, dataset_size: int, teachers: int, batch_size: int) -> int:
    """Optimiser steps of every teacher: ``ceil(epochs * N / (teachers * batch_size))``, N the private set's size.

    N is public, so every teacher does the same work whatever its shard's
    size: the run's compute and time do not depend on the shard sizes.
    """
    return max(1, math.ceil(epochs * dataset_size / (teachers * batch_size)))


def train_teacher(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                  lr: float, generator: torch.Generator) -> nn.Module:
    """Non-private training on (a shard of) the private data; returns the model frozen, in eval mode.

    `steps` Adam steps on cross-entropy, each on `batch_size` images drawn
    uniformly with replacement from the shard: the same work for every shard
    size (an empty shard, which has probability about exp(-N / teachers),
    leaves the model as initialised). Nothing about this training (loss,
    accuracy, weights, the number of images) is returned or logged.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = images.shape[0]
    for _ in range(steps if n else 0):
        idx = torch.randint(n, (batch_size,), generator=generator).to(images.device)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.requires_grad_(False)
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                      temperature: float) -> torch.Tensor:
    """Per-teacher loss over the last two dims (batch, classes): KL(teacher || student) at `temperature`
    (batch mean) or the mean absolute logit difference; leading dims (teachers) are kept."""
    if kind == "kl":
        t = temperature
        log_q = F.log_softmax(teacher_logits / t, dim=-1)
        return (log_q.exp() * (log_q - F.log_softmax(student_logits / t, dim=-1))).sum(-1).mean(-1)
    return (student_logits - teacher_logits).abs().mean((-2, -1))


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def normalise(vector: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """`vector` scaled to L2 norm `clip_norm`, in its own dtype (a zero or non-finite vector becomes zero)."""
    return normalise_rows(vector[None], clip_norm)[0].to(vector.dtype)


def teacher_logits(teachers: Sequence[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """(T, B, K): every teacher's logits on the synthetic batch."""
    with torch.no_grad():
        return torch.stack([t(images) for t in teachers])


def ensemble_gradient(student: nn.Module, teachers: Sequence[nn.Module], images: torch.Tensor, *, clip_norm: float,
                      loss: str = "kl", temperature: float = 1.0, space: str = "parameters") -> torch.Tensor:
    """The vector to release: `aggregate` of the `teacher_gradients` (norm <= T C, sensitivity 2C)."""
    return aggregate(teacher_gradients(student, teachers, images, loss=loss, temperature=temperature, space=space),
                     clip_norm)


def aggregate(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Sum over teachers of each teacher's vector scaled to norm exactly C: (T, D) -> (D,).

    Row i depends on the private data through teacher i only, and teacher i
    on shard i only: adding or removing one image moves one row, whose scaled
    version goes from one vector of norm <= C to another, so the sum moves by
    at most 2C whatever T. With one teacher this is the original DPDFD
    release (two data sets' vectors differ by at most 2C).
    """
    return normalise_rows(rows, clip_norm).sum(0)


def teacher_gradients(student: nn.Module, teachers: Sequence[nn.Module], images: torch.Tensor, *, loss: str = "kl",
                      temperature: float = 1.0, space: str = "parameters") -> torch.Tensor:
    """(T, D): for every teacher, the gradient of its distillation loss, flattened (not yet scaled).

    `images` is a synthetic batch (generator output: no private data); the
    teachers' outputs are its only data-dependent input. The gradient is taken
    with respect to ``space``: ``parameters`` (all student parameters, D = d
    entries) or ``outputs`` (the student's logits on the batch, D = B x K;
    the parameter update is then `backprop_released` of the noisy vector,
    post-processing). Nothing is left in the student's ``.grad``.
    """
    t_logits = teacher_logits(teachers, images)
    count = t_logits.shape[0]
    if space == "outputs":
        with torch.no_grad():
            logits = student(images)
        return _logit_gradients(logits, t_logits, loss, temperature).flatten(1)
    params = {k: p.detach() for k, p in student.named_parameters() if p.requires_grad}
    logits, vjp = torch.func.vjp(lambda p: torch.func.functional_call(student, p, (images,)), params)
    grads = torch.func.vmap(vjp)(_logit_gradients(logits.detach(), t_logits, loss, temperature))[0]
    return torch.cat([grads[k].reshape(count, -1) for k in params], dim=1).detach()


def _logit_gradients(logits: torch.Tensor, t_logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """(T, B, K): the gradient of teacher i's distillation loss w.r.t. the student's logits, for every i."""
    with torch.enable_grad():
        rep = logits.detach().expand_as(t_logits).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(distillation_loss(rep, t_logits, kind, temperature).sum(), rep)
    return grad


def distillation_step(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, clip_norm: float,
                      loss: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """The student's update from a DP teacher (``teacher=dp-sgd``): the gradient of the distillation loss on a
    synthetic batch, flattened, scaled to norm `clip_norm` (the step size of the noisy variant). The teacher is a
    DP release and the batch synthetic: post-processing, nothing released or recorded."""
    params = [p for p in student.parameters() if p.requires_grad]
    with torch.no_grad():
        t_logits = teacher(images)
    grads = torch.autograd.grad(distillation_loss(student(images), t_logits, loss, temperature), params)
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
    """The noisy update: `normalised` + N(0, (2 C s)^2 I), recorded in the ledger first (sensitivity 2C).

    `normalised` is `aggregate`'s float64 sum; the noise is drawn in its dtype.
    """
    return gaussian_release(normalised, sensitivity=2.0 * clip_norm, noise_multiplier=noise_multiplier,
                            ledger=ledger, noise=noise, label=RELEASE_LABEL)


def update_scale(clip_norm: float, noise_multiplier: float, dim: int, teachers: int = 1) -> float:
    """C / sqrt((T C)^2 + dim (2 C s)^2): the released update times this has expected norm at most about C.

    A public constant (C, s, the number of teachers T and the parameter count
    are fixed before any private access); multiplying the released vector by
    it is post-processing. T C bounds the norm of the un-noised sum.
    """
    return clip_norm / math.sqrt((teachers * clip_norm) ** 2 + dim * (2.0 * clip_norm * noise_multiplier) ** 2)


def set_gradients(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Write a flat (released) vector into the parameters' ``.grad`` for the optimiser."""
    offset = 0
    for p in params:
        p.grad = vector[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters {offset}")
