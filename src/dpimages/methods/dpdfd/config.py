"""Configuration of DPDFD (`dpdfd`): teacher, student, noisy distillation steps, generator.

Presets change sizes only (never code paths):

* ``smoke``: tiny networks and a handful of steps; for tests, no quality claim.
* ``cpu``: the whole fit within 60 minutes on 2 CPU cores (Fashion-MNIST,
  55,000 images): a 2-epoch teacher, 2,000 noisy student steps with
  synthetic batches of 64 from a small generator (measured: see docs/dpdfd.md).
* ``gpu``: larger teacher and generator, batches of 256, 20,000 steps.
* ``gpu-short``: the ``gpu`` networks with 5,000 steps, as resumable runs of at
  most 9 minutes each (every resumption retrains the teacher first).

The number of student steps is fixed before any private access: it sets the
noise multiplier (each step is one Gaussian release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import MethodConfig
from dpimages.errors import InputError

LOSSES = ("kl", "l1")


@dataclass
class DPDFDConfig(MethodConfig):
    """DPDFD settings (defaults: the ``cpu`` preset)."""

    # teacher: non-private, in memory only (dpimages.nets.classifiers.SmallCNN)
    teacher_channels: tuple[int, ...] = (32, 64)
    teacher_hidden: int = 64
    teacher_epochs: int = 2
    teacher_batch: int = 128
    teacher_lr: float = 2e-3
    # student: the DP classifier (SmallCNN, GroupNorm)
    student_channels: tuple[int, ...] = (16, 32)
    student_hidden: int = 32
    student_lr: float = 0.01
    student_momentum: float = 0.9
    # the released update: distillation gradient normalised to clip_norm, Gaussian noise
    steps: int = 2000  # student steps = Gaussian releases (sets the noise multiplier)
    clip_norm: float = 1.0
    # "outputs": release the gradient w.r.t. the student's logits on the batch (B x K entries) and backpropagate
    # the noisy vector; "parameters": release the gradient w.r.t. all student parameters (d entries)
    release_space: str = "parameters"
    loss: str = "kl"  # "kl": KL(teacher || student) at `temperature`; "l1": mean |logit difference|
    temperature: float = 1.0
    batch_size: int = 64  # synthetic images per student step and per generator step
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
    max_minutes: float = 0.0  # > 0: checkpoint and stop after this many minutes (continue with --resume)
    steps_per_run: int = 0  # > 0: checkpoint and stop after this many steps in one process
    log_every: int = 25
    grid_every: int = 500
    checkpoint_every: int = 250
    sample_batch: int = 1000

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "teacher_channels": (4, 8), "teacher_hidden": 16, "teacher_epochs": 1, "teacher_batch": 32,
            "student_channels": (4, 8), "student_hidden": 8, "steps": 8, "batch_size": 16, "gen_channels": 4,
            "z_dim": 8, "eval_every": 4, "log_every": 2, "grid_every": 4, "checkpoint_every": 3,
        },
        "cpu": {},
        "gpu": {
            "teacher_channels": (64, 128), "teacher_hidden": 128, "teacher_epochs": 10, "steps": 20000,
            "batch_size": 256, "gen_channels": 64, "eval_every": 1000, "grid_every": 2000, "checkpoint_every": 1000,
        },
        "gpu-short": {
            "teacher_channels": (64, 128), "teacher_hidden": 128, "teacher_epochs": 5, "steps": 5000,
            "batch_size": 256, "gen_channels": 64, "max_minutes": 9.0, "eval_every": 1000, "grid_every": 1000,
            "checkpoint_every": 500,
        },
    }

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), so config.yaml round-trips and --resume compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in super().to_dict().items()}

    def __post_init__(self) -> None:
        for name in ("teacher_hidden", "teacher_epochs", "teacher_batch", "student_hidden", "steps", "batch_size",
                     "gen_channels", "z_dim", "gen_every", "gen_steps", "eval_every", "log_every", "grid_every",
                     "checkpoint_every", "sample_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("teacher_channels", "student_channels"):
            ch = getattr(self, name)
            if len(ch) != 2 or any(c < 1 for c in ch):
                raise InputError(f"{name} must be two positive ints (conv1, conv2), got {list(ch)}")
        for name in ("teacher_lr", "student_lr", "clip_norm", "temperature", "gen_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InputError(f"{name} must be a finite number > 0, got {v}")
        for name in ("w_ce", "w_entropy", "w_balance", "w_diversity"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.student_momentum < 1.0 or not 0.0 <= self.gen_beta1 < 1.0:
            raise InputError(f"student_momentum and gen_beta1 must be in [0, 1), got {self.student_momentum}, "
                             f"{self.gen_beta1}")
        if self.release_space not in ("outputs", "parameters"):
            raise InputError(f"release_space must be 'outputs' or 'parameters', got {self.release_space!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.generator not in ("dcgan", "resnet"):
            raise InputError(f"generator must be 'dcgan' or 'resnet', got {self.generator!r}")
        if self.max_minutes < 0 or not math.isfinite(self.max_minutes):
            raise InputError(f"max_minutes must be >= 0 (0: no limit), got {self.max_minutes}")
        if self.steps_per_run < 0:
            raise InputError(f"steps_per_run must be >= 0 (0: no limit), got {self.steps_per_run}")
