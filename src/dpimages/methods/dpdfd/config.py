"""Configuration of DPDFD (`dpdfd`): teacher, student, noisy distillation steps, generator.

Presets change sizes only (never code paths):

* ``smoke``: tiny networks and a handful of steps; for tests, no quality claim.
* ``cpu``: the whole fit within 30 minutes on 2 CPU cores (Fashion-MNIST,
  55,000 images): 400 teachers (SmallCNN (16, 32), hidden 32, 40 epochs on
  about 138 images each), 1,000 noisy student steps releasing the logit
  gradient of synthetic batches of 16 from a small generator. T and the
  teacher size were chosen on Fashion-MNIST (teacher curve on its validation
  split, student test accuracy of short runs: docs/dpdfd.md).
* ``gpu``: the ``cpu`` ensemble, a larger generator, 4,000 steps (not yet run
  on a GPU).
* ``gpu-short``: the ``gpu`` settings as resumable runs of at most 9 minutes
  each (every resumption retrains the teachers first).

The number of student steps is fixed before any private access: it sets the
noise multiplier (each step is one Gaussian release).

``teacher=dp-sgd`` (our variant; METHODS.md's teacher is non-private)
replaces the shard teachers and the noisy steps: one classifier on
scattering coefficients is trained with DP-SGD on the whole budget (the
``labeller_*`` schedule of `dpimages.methods.labeller`; ``labeller_share``
does not apply, nothing else is released) and the student is distilled from
it without noise, which is post-processing. ``labeller=relabel|filter`` then
lets that teacher relabel or filter the samples too (also post-processing);
with ``teacher=shards`` there is no DP teacher to label them and a labeller
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import LABELLER_SMOKE, Constraint, LabellerKeys, RunControl, at_least, in_range, one_of, positive
from dpimages.errors import InputError

LOSSES = ("kl", "l1")
_TWO_CHANNELS = Constraint(lambda v: len(v) == 2 and all(int(c) == c and c >= 1 for c in v),  # SmallCNN's convs
                           "must be two positive ints (conv1, conv2)")


@dataclass
class DPDFDConfig(RunControl, LabellerKeys):
    """DPDFD settings (defaults: the ``cpu`` preset)."""

    # "shards": non-private teachers on disjoint shards, noisy student steps (the method); "dp-sgd": one DP-SGD
    # teacher on scattering coefficients (labeller_* keys, the whole budget), student steps without noise
    teacher: str = "shards"
    # teachers: non-private, in memory only (dpimages.nets.classifiers.SmallCNN), one per disjoint shard
    teachers: int = 400  # M shards of the private data (keyed hash of each image), one teacher each
    teacher_channels: tuple[int, ...] = (16, 32)
    teacher_hidden: int = 32
    teacher_epochs: int = 40  # passes over a shard's worth: every teacher takes ceil(epochs N / (teachers batch))
    teacher_batch: int = 64  # steps of this many images drawn with replacement from its shard (same work per shard)
    teacher_lr: float = 2e-3
    # student: the DP classifier (SmallCNN, GroupNorm)
    student_channels: tuple[int, ...] = (16, 32)
    student_hidden: int = 32
    student_lr: float = 0.01
    student_momentum: float = 0.9
    # the released update: distillation gradient normalised to clip_norm, Gaussian noise
    steps: int = 1000  # student steps = Gaussian releases (sets the noise multiplier)
    clip_norm: float = 1.0
    # "outputs": release the gradient w.r.t. the student's logits on the batch (B x K entries) and backpropagate
    # the noisy vector; "parameters": release the gradient w.r.t. all student parameters (d entries)
    release_space: str = "outputs"
    loss: str = "kl"  # "kl": KL(teacher || student) at `temperature`; "l1": mean |logit difference|
    temperature: float = 1.0
    batch_size: int = 16  # synthetic images per student step and per generator step
    # generator: label-conditional (dpimages.nets.generators), trained against the fixed student only
    generator: str = "dcgan"
    gen_channels: int = 8
    z_dim: int = 32
    gen_lr: float = 1e-3
    gen_beta1: float = 0.5
    gen_every: int = 1  # one generator phase after every `gen_every` student steps
    gen_steps: int = 1  # generator updates per phase
    w_ce: float = 1.0  # cross-entropy of the student's prediction against the conditioning label
    w_entropy: float = 0.5  # reward for per-image student entropy (hard examples near its boundaries)
    w_balance: float = 1.0  # reward for the entropy of the batch-mean prediction (all classes used)
    w_diversity: float = 2.0  # mode-seeking reward: image distance / latent distance for the same label
    # evaluation of the student on the public test set (Fashion-MNIST only)
    student_eval: bool = True
    eval_every: int = 500
    # run control
    steps_per_run: int = 0  # > 0: checkpoint and stop after this many steps in one process
    log_every: int = 25
    checkpoint_every: int = 250
    sample_batch: int = 1000

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "teachers": 3, "teacher_channels": (4, 8), "teacher_hidden": 16, "teacher_epochs": 1, "teacher_batch": 32,
            "student_channels": (4, 8), "student_hidden": 8, "steps": 8, "batch_size": 16, "gen_channels": 4,
            "z_dim": 8, "eval_every": 4, "log_every": 2, "grid_every": 4, "checkpoint_every": 3, **LABELLER_SMOKE,
        },
        "cpu": {},
        "gpu": {
            "steps": 4000, "gen_channels": 64, "eval_every": 1000, "grid_every": 1000, "checkpoint_every": 500,
        },
        "gpu-short": {
            "steps": 4000, "gen_channels": 64, "max_minutes": 9.0, "eval_every": 1000, "grid_every": 1000,
            "checkpoint_every": 500,
        },
    }

    # work per image grows with its area: on larger images these shrink (`MethodConfig.image_scaled`)
    image_scaled: ClassVar[dict[str, int]] = {"teachers": 8, "batch_size": 8, "teacher_batch": 16}
    constraints: ClassVar[dict[str, Constraint]] = {
        **dict.fromkeys(("teachers", "teacher_hidden", "teacher_epochs", "teacher_batch", "student_hidden", "steps",
                         "batch_size", "gen_channels", "z_dim", "gen_every", "gen_steps"), at_least(1)),
        **dict.fromkeys(("teacher_channels", "student_channels"), _TWO_CHANNELS),
        **dict.fromkeys(("teacher_lr", "student_lr", "clip_norm", "temperature", "gen_lr"), positive()),
        **dict.fromkeys(("w_ce", "w_entropy", "w_balance", "w_diversity"), at_least(0)),
        **dict.fromkeys(("student_momentum", "gen_beta1"), in_range(0.0, 1.0)),
        "release_space": one_of("parameters", "outputs"),
        "teacher": one_of("shards", "dp-sgd"),
        "loss": one_of(*LOSSES),
        "generator": one_of("dcgan", "resnet"),
    }

    def check(self) -> None:
        if self.labeller != "none" and self.teacher != "dp-sgd":
            raise InputError(f"dpdfd: labeller={self.labeller} needs teacher=dp-sgd (the DP teacher labels the "
                             "samples; the shard teachers are not private)")
