"""Configuration of DPDM (`dpdm`): U-Net size, EDM settings, DP-SGD schedule, sampling.

Presets change sizes only, except that ``cpu`` and ``gpu-short`` turn on the dp-mepf warm start:

* ``smoke``: a tiny U-Net and a handful of steps; for tests, no quality claim.
* ``cpu``: the whole fit within 60 minutes on 2 CPU cores (Fashion-MNIST,
  55,000 images). Before issue 22 (random start): 756 DP steps of expected
  batch 2,400 as two single-thread torchrun processes, ~55 minutes
  extrapolated from 0.269 steps/s at batch 2,048
  (benchmarks/results/dpdm_cores.json, 2026-12-05; book-keeping
  clipping, physical batch 512), ~61 as one process with 2 threads: a
  ~0.18 M-parameter U-Net (channels 8, multipliers 1,2,4, attention at 7x7),
  K = 1, 33 epochs, Adam lr 1e-3. Chosen on the benchmark
  (benchmarks/results/fmnist.md, epsilon 10): lr 3e-4 left the denoiser
  grainy at 750 steps (68.3% against 73.2% CNN at batch 512, K = 2); at the
  same compute batch 1,024 with K = 1 gave 73.9%; twice that compute spent on
  batch 2,048 over the same ~750 steps (noise norm in the averaged gradient
  0.17 instead of 0.26) gave 75.3% CNN, 78.7% MLP, FID 1.36. The faster
  DP-SGD engine (issue 21: 1.30x under torchrun) is spent the same way: batch
  2,400 over the same ~750 steps. Since issue 22 the preset warm-starts
  (``warm_start=dp-mepf``, share 0.2): a dp-mepf fit (~4 min), 5 passes of
  pretraining on 60,000 of its samples (~8 min), then 24 epochs (550 DP
  steps) of DP-SGD: 59 minutes in all, 79.3% CNN and FID 0.95 at epsilon 10
  against 76.3% and 1.48 from a random start (benchmarks/results/fmnist.md).
* ``gpu``: the DPDM paper's (F)MNIST setting: ~1.75 M-parameter U-Net
  (channels 32, multipliers 1,2,2, attention at 7x7), expected batch 4,096
  (virtual batches), K = 32, 300 epochs; resumable.
* ``gpu-short``: the paper's U-Net with a schedule meant to finish in about 20
  minutes of one H100, as resumable runs of at most 10 minutes each
  (``max_minutes`` stops a run at a step boundary after a checkpoint;
  ``--resume`` continues it; ``steps_per_run`` does the same by step count).
  The number of steps is fixed in advance (it sets the noise multiplier);
  these limits only split the work between processes.
  It warm-starts like the cpu preset (dp-mepf at its gpu-short preset,
  share 0.2, pretraining batch 512); the first process runs that stage
  before its ``max_minutes`` of DP-SGD start. Not yet run on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import (
    LABELLER_SMOKE,
    Constraint,
    LabellerKeys,
    RunControl,
    at_least,
    in_range,
    one_of,
    positive,
    positive_ints,
)
from dpimages.errors import InputError
from dpimages.nets.edm import SAMPLERS

PAPER_UNET: dict[str, Any] = {"channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (7,)}


@dataclass
class DPDMConfig(RunControl, LabellerKeys):
    """DPDM settings (defaults: the paper's (F)MNIST setting, as the ``gpu`` preset)."""

    # U-Net (dpimages.nets.unet.UNet)
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 1
    # EDM (dpimages.nets.edm)
    sigma_data: float = math.sqrt(1.0 / 3.0)
    p_mean: float = -1.2
    p_std: float = 1.2
    # DP-SGD (dpimages.privacy.dpsgd); the schedule fixes the noise multiplier before training
    batch_size: int = 4096  # expected Poisson batch size: sample rate q = batch_size / N
    epochs: float = 300.0  # steps = round(epochs * N / batch_size)
    multiplicity: int = 32  # K noise draws per example, averaged before clipping
    clip_norm: float = 1.0
    physical_batch: int = 256  # examples per physical chunk (virtual batches); memory only
    per_example: str = "auto"  # DP-SGD per-example path: auto, book-keeping or torch.func (speed only)
    # warm start (dpimages.methods.dpdm.warm): a first stage whose images pretrain the U-Net before DP-SGD
    warm_start: str = "none"  # none, central (DP-FETA), dp-mepf (ours) or public (--public images)
    warm_share: float = 0.2  # the stage's share of epsilon (its own calibration); DP-SGD gets the rest jointly
    warm_preset: str = "cpu"  # dp-mepf's preset for warm_start=dp-mepf
    warm_images: int = 60000  # samples drawn from the DP prior for pretraining
    warm_epochs: float = 5.0  # pretraining passes over the stage's images (no privacy cost)
    warm_batch: int = 256
    warm_lr: float = 1e-3
    warm_ema: float = 0.999
    # warm_start=public with labelled public images of other classes (PrivImage's selection): pretrain on the
    # top public_classes of one noisy histogram of the private images' predicted public classes (-1: half of
    # the public classes, rounded up; 0: all public images, no release); the classifier is trained on the public
    # images alone, for select_epochs
    public_classes: int = -1
    select_epochs: int = 3
    central_batch: int = 11000  # expected Poisson batch of each central-image release (rate central_batch / N)
    central_releases: int = 10  # central images per class
    central_size: int = 14  # central images are released at central_size x central_size pixels
    central_kappa: float = 7.0  # the counting coordinate of each row (sets the counts' share of the noise)
    # optimiser (post-processing of the noisy gradients)
    lr: float = 3e-4
    ema: float = 0.999
    ema_warmup: bool = True  # decay min(ema, (1 + t) / (10 + t)) at step t
    label_dropout: float = 0.1  # probability of training a draw with the null label (for guidance)
    # sampling (EMA weights)
    sampler: str = "heun"
    sample_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance: float = 0.0
    sample_batch: int = 500
    # run control
    max_steps: int = 0  # > 0: cap on the DP-SGD steps that `epochs` gives (planned and accounted)
    steps_per_run: int = 0  # > 0: checkpoint and stop after this many steps in one process (--resume goes on)

    sampling_keys: ClassVar[tuple[str, ...]] = (
        "sampler", "sample_steps", "sigma_min", "sigma_max", "rho", "guidance", "sample_batch",
    )
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (), "batch_size": 32,
            "epochs": 1.0, "max_steps": 12, "multiplicity": 2, "physical_batch": 16, "sample_steps": 4,
            "sample_batch": 64,
            "log_every": 2, "grid_every": 3, "checkpoint_every": 2,
            "warm_preset": "smoke", "warm_images": 64, "warm_epochs": 5.0, "warm_batch": 16, "central_batch": 32,
            "central_releases": 2, "central_size": 7, **LABELLER_SMOKE,
        },
        "cpu": {
            "channels": 8, "channel_mult": (1, 2, 4), "num_res_blocks": 1, "attn_resolutions": (7,),
            "batch_size": 2400, "epochs": 24.0, "multiplicity": 1, "physical_batch": 512, "sample_steps": 8, "lr": 1e-3,
            "warm_start": "dp-mepf",
            "log_every": 10, "grid_every": 100, "checkpoint_every": 50,
        },
        "gpu": {**PAPER_UNET, "batch_size": 4096, "epochs": 300.0, "multiplicity": 32, "physical_batch": 256,
                "log_every": 10, "grid_every": 500, "checkpoint_every": 100},
        "gpu-short": {**PAPER_UNET, "batch_size": 2048, "epochs": 30.0, "multiplicity": 8, "physical_batch": 512,
                      "max_minutes": 9.0, "log_every": 10, "grid_every": 200, "checkpoint_every": 50,
                      "warm_start": "dp-mepf", "warm_preset": "gpu-short", "warm_batch": 512},
    }

    # work per image grows with its area: on larger images these shrink (`MethodConfig.image_scaled`)
    image_scaled: ClassVar[dict[str, int]] = {"batch_size": 16, "physical_batch": 4, "multiplicity": 1,
                                               "warm_images": 1000, "warm_batch": 16, "central_batch": 16}
    constraints: ClassVar[dict[str, Constraint]] = {
        **dict.fromkeys(("channels", "num_res_blocks", "num_heads", "batch_size", "multiplicity", "sample_steps"),
                        at_least(1)),
        "channel_mult": positive_ints(),
        **dict.fromkeys(("sigma_data", "p_std", "epochs", "clip_norm", "lr", "sigma_min", "sigma_max", "rho"),
                        positive()),
        "ema": in_range(0.0, 1.0),
        "label_dropout": in_range(0.0, 1.0),
        "max_steps": at_least(0, "(0: no cap)"),
        **dict.fromkeys(("warm_images", "warm_batch", "central_batch", "central_releases", "central_size"),
                        at_least(1)),
        **dict.fromkeys(("warm_epochs", "warm_lr", "central_kappa"), positive()),
        "warm_share": in_range(0.0, 1.0, "neither"),
        "public_classes": at_least(-1, "(-1: half the public classes; 0: all, no release)"),
        "select_epochs": at_least(1),
        "warm_ema": in_range(0.0, 1.0),
        "warm_start": one_of("none", "central", "dp-mepf", "public"),
        "warm_preset": one_of("smoke", "cpu", "gpu", "gpu-short"),
        "sampler": one_of(*SAMPLERS),
    }

    def check(self) -> None:
        if not self.sigma_min < self.sigma_max:
            raise InputError(f"sigma_min must be < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.channels % self.num_heads:
            raise InputError(f"channels ({self.channels}) must be divisible by num_heads ({self.num_heads})")
