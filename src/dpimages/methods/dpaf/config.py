"""Configuration of DPAF (`dpaf`): networks, the private schedule and its budget split, post-processing.

The private schedule is fixed before any private pixel is read. It runs in
``cycles``; each cycle is

* phase A: ``agg_steps`` aggregation releases (Poisson rate ``agg_batch / N``),
  each followed by ``f2_steps`` updates of f2 and ``g_steps`` updates of the
  generator (post-processing), f1 fixed;
* phase B: ``f1_steps`` DP-SGD updates of f1 (Poisson rate ``f1_batch / N``,
  clip ``grad_clip``): few updates on large batches, while f2 and G take
  many updates from small-batch aggregates (asymmetric training).

With ``aggregation=false`` (the ablation) there is no f1/f2 split at
training time: the whole discriminator is trained with DP-SGD, one step per
iteration (Poisson rate ``plain_batch / N``), ``cycles * agg_steps``
iterations, each followed by ``g_steps`` generator updates.

Budget split: ``f1_share`` and ``counts_share`` are the (approximate) shares of
the budget spent on f1's DP-SGD steps and on the one-time noisy class counts;
the aggregation releases get the rest (see `dpimages.methods.dpaf.release.noise_plan`).

Presets change sizes only (never code paths):

* ``smoke``: a handful of steps on tiny networks; for tests, no quality claim.
* ``cpu``: the whole fit within 60 minutes on 2 CPU cores on Fashion-MNIST
  (55,000 images), sized from measured throughput (docs/dpaf.md).
* ``gpu``: larger networks and a longer schedule.
* ``gpu-short``: the ``gpu`` networks, a schedule for about 20 minutes of one
  H100, as resumable runs of at most 10 minutes (``max_minutes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import Constraint, MethodConfig, at_least, in_range, one_of, positive, positive_ints
from dpimages.errors import InputError


@dataclass
class DPAFConfig(MethodConfig):
    """DPAF settings (defaults: the ``cpu`` preset's sizes)."""

    # networks
    d_channels: tuple[int, ...] = (32, 64)  # f1: stride-2 conv blocks (GroupNorm)
    feature_channels: int = 16  # f1: 1x1 conv at the end; feature dim = feature_channels * (H/4) * (W/4)
    f2_channels: tuple[int, ...] = (32, 64)  # f2: two conv layers, then the projection head
    generator: str = "dcgan"
    gen_channels: int = 16
    z_dim: int = 32
    # privacy: mechanism, clipping, schedule, budget split
    aggregation: bool = True  # false: the ablation, the whole discriminator trained with DP-SGD
    feature_clip: float = 1.0  # C_f: L2 clip of each image's f1 feature vector
    grad_clip: float = 1.0  # C: per-example gradient clip of the DP-SGD steps (f1, or D in the ablation)
    cycles: int = 16
    agg_steps: int = 150  # aggregation releases per cycle (phase A)
    agg_batch: int = 1100  # expected Poisson batch of one aggregation release
    agg_groups: int = 1  # disjoint random groups per class in one release (K * groups aggregates per release)
    center: bool = True  # subtract a per-class reference feature (mean over generated images) before clipping
    f1_steps: int = 5  # f1 DP-SGD steps per cycle (phase B)
    f1_batch: int = 2750  # expected Poisson batch of one f1 step
    plain_batch: int = 256  # ablation: expected Poisson batch of one discriminator DP-SGD step
    f1_share: float = 0.25
    counts_share: float = 0.02
    # post-processing: optimisers and updates per release
    f2_steps: int = 1
    f2_replay: int = 4  # earlier released aggregates of the phase replayed in each f2 update (post-processing)
    g_steps: int = 1
    fake_per_class: int = 32  # generated images per class per iteration (G and f2 updates)
    lr_g: float = 2e-4
    lr_f1: float = 1e-3
    lr_f2: float = 5e-4
    beta1: float = 0.5
    ema: float = 0.995
    physical_batch: int = 256  # examples per physical chunk in the DP-SGD steps (memory only)
    per_example: str = "auto"  # DP-SGD per-example path: auto, book-keeping or torch.func (speed only)
    sample_batch: int = 1000
    # run control
    max_minutes: float = 0.0  # > 0: checkpoint and stop after this many minutes (dpaf: at the next cycle end)
    cycles_per_run: int = 0  # > 0: checkpoint and stop after this many cycles in one process (--resume goes on)
    log_every: int = 25
    grid_every: int = 5  # cycles

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "d_channels": (8, 8), "feature_channels": 4, "f2_channels": (8, 8), "gen_channels": 8, "z_dim": 8,
            "cycles": 2, "agg_steps": 3, "agg_batch": 40, "f1_steps": 1, "f1_batch": 40, "plain_batch": 32,
            "fake_per_class": 2, "physical_batch": 32, "sample_batch": 64, "log_every": 2, "grid_every": 1,
        },
        "cpu": {},
        "gpu": {"d_channels": (64, 128), "feature_channels": 32, "f2_channels": (64, 128), "gen_channels": 64,
                "cycles": 50, "agg_steps": 400, "agg_batch": 1100, "f1_steps": 10, "f1_batch": 5500,
                "plain_batch": 512, "fake_per_class": 64, "physical_batch": 1024, "log_every": 100,
                "grid_every": 10},
        "gpu-short": {"d_channels": (64, 128), "feature_channels": 32, "f2_channels": (64, 128), "gen_channels": 64,
                      "cycles": 30, "agg_steps": 300, "agg_batch": 1100, "f1_steps": 8, "f1_batch": 5500,
                      "plain_batch": 512, "fake_per_class": 64, "physical_batch": 1024, "max_minutes": 9.0,
                      "log_every": 100, "grid_every": 10},
    }

    # work per image grows with its area: on larger images these shrink (`MethodConfig.image_scaled`)
    image_scaled: ClassVar[dict[str, int]] = {"agg_batch": 16, "f1_batch": 16, "plain_batch": 16, "fake_per_class": 2,
                                               "physical_batch": 8}
    constraints: ClassVar[dict[str, Constraint]] = {
        **{name: at_least(1) for name in (
            "feature_channels", "gen_channels", "z_dim", "cycles", "agg_steps", "agg_batch", "agg_groups",
            "f1_steps", "f1_batch", "plain_batch", "f2_steps", "g_steps", "fake_per_class")},
        "d_channels": positive_ints(),
        "f2_channels": Constraint(lambda v: len(v) == 2 and all(int(c) == c and c >= 1 for c in v),
                                  "must be two positive ints"),
        "generator": one_of("dcgan", "resnet"),
        **{name: positive() for name in ("feature_clip", "grad_clip", "lr_g", "lr_f1", "lr_f2")},
        "f1_share": in_range(0, 1, "neither"),
        "counts_share": in_range(0, 1, "neither"),
        "beta1": in_range(0, 1),
        "ema": in_range(0, 1),
        "f2_replay": at_least(0),
        "cycles_per_run": at_least(0, "(0: no limit)"),
    }

    def check(self) -> None:
        super().check()
        if self.f1_share + self.counts_share >= 1:
            raise InputError(f"f1_share + counts_share must be < 1 (the aggregation gets the rest), got "
                             f"{self.f1_share} + {self.counts_share}")


@dataclass
class DPAFNoAggConfig(DPAFConfig):
    """The ablation `dpaf-noagg`: DPAF's networks and schedule with a plain DP-SGD discriminator."""

    aggregation: bool = False

    def check(self) -> None:
        super().check()
        if self.aggregation:
            raise InputError("dpaf-noagg is DPAF without forward-phase aggregation: use method dpaf for "
                             "aggregation=true")
