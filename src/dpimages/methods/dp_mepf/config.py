"""Configuration of DP-MEPF (`dp-mepf`): feature source, embedding, release and generator training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import LABELLER_SMOKE, Constraint, LabellerKeys, RunControl, at_least, in_range, one_of, positive
from dpimages.errors import InputError


@dataclass
class DPMEPFConfig(RunControl, LabellerKeys):
    """DP-MEPF settings. Presets change sizes only.

    Feature source (``features``): ``random`` (seeded random conv nets, no
    data), ``public`` (a conv net trained at fit time on ``--public``), or
    ``path`` (``feature_path``: a directory from ``dpimages features train``
    or a torchvision-style VGG state dict), ``scatter`` (a scattering
    transform: fixed wavelets, no data) or ``random+scatter`` (both,
    concatenated). Budget weights split the
    precision (1/sigma^2) of the one-shot release between the first-moment
    sums, the second-moment sums and the class counts. ``cell_bits = b > 0``
    (our extension) splits each class into ``2**b`` cells by hyperplanes
    through noisy class centres (released first, weight ``weight_centres``),
    oriented towards the nearest other centres (``cell_directions``
    ``neighbours``) or at random, and releases the sums and counts per
    (class, cell); ``-1`` (default) takes the most cells whose means have an
    expected noise norm <= ``cell_noise`` (from the planned noise, the
    feature dimension and the data set size N, which dpimages treats as
    public), ``0`` is the published method. ``max_minutes`` (0: off) caps
    the generator training time: the learning rate then decays with the
    elapsed share of that time when it is ahead of the step count, and
    training stops when it is spent (post-processing only; no privacy
    effect). ``labeller`` (``none``, ``relabel``, ``filter``) trains a DP
    labeller with ``labeller_share`` of epsilon in the same plan and
    relabels or filters the samples with it (`dpimages.methods.labeller`).
    """

    # feature network
    features: str = "random"
    feature_path: str = ""
    feature_channels: tuple[int, ...] = (32, 64, 128)
    feature_kernel: int = 3
    feature_act: str = "relu"
    feature_nets: int = 1
    feature_seed: int = 1
    feature_layers: tuple[str, ...] = ()
    feature_pool: tuple[int, ...] = (7,)
    feature_tap: str = "post"
    feature_balance: bool = True
    vgg_resize: int = 0
    public_epochs: int = 5
    # release
    second_moment: bool = False
    weight_first: float = 1.0
    weight_second: float = 1.0
    weight_counts: float = 0.05
    project_means: bool = True
    cell_bits: int = -1
    cell_noise: float = 0.2
    cell_directions: str = "neighbours"
    weight_centres: float = 0.25
    # generator and its training (post-processing)
    generator: str = "dcgan"
    gen_channels: int = 64
    z_dim: int = 32
    batch_size: int = 128
    steps: int = 4000
    lr: float = 1e-3
    beta1: float = 0.5
    lr_final: float = 0.1
    ema: float = 0.0
    unbiased: bool = True
    eval_every: int = 250
    eval_per_class: int = 200
    select_best: bool = True
    log_every: int = 50
    grid_every: int = 1000
    checkpoint_every: int = 1000
    embed_chunk: int = 500

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "feature_channels": (8, 16), "public_epochs": 1, "gen_channels": 8, "z_dim": 8, "batch_size": 32,
            "steps": 30, "eval_every": 10, "eval_per_class": 4, "log_every": 5, "grid_every": 20,
            "checkpoint_every": 10, **LABELLER_SMOKE,
        },
        # scattering features and the DP labeller: on Fashion-MNIST (one secure fit each) CNN 79.7% against
        # 75.0 +- 1.0 at epsilon 1 and 79.5% against 78.6 +- 0.2 at epsilon 10, FID 2.4-2.5 against 3.3-3.6
        "cpu": {"gen_channels": 16, "steps": 1500, "max_minutes": 20.0, "features": "random+scatter",
                "labeller": "relabel"},
        "gpu": {"feature_nets": 4, "gen_channels": 128, "batch_size": 512, "steps": 20000, "eval_every": 1000,
                "grid_every": 5000, "checkpoint_every": 2000},
        "gpu-short": {"feature_nets": 4, "gen_channels": 128, "batch_size": 512, "steps": 8000,
                      "eval_every": 1000, "grid_every": 4000, "checkpoint_every": 1000},
    }

    # work per image grows with its area: on larger images these shrink (`MethodConfig.image_scaled`)
    image_scaled: ClassVar[dict[str, int]] = {"batch_size": 16, "eval_per_class": 20, "embed_chunk": 32}
    constraints: ClassVar[dict[str, Constraint]] = {
        "feature_tap": one_of("pre", "post"),
        "feature_act": one_of("relu", "tanh", "lrelu"),
        "generator": one_of("dcgan", "resnet"),
        "cell_directions": one_of("random", "neighbours"),
        **dict.fromkeys(("feature_nets", "feature_kernel", "gen_channels", "z_dim", "batch_size", "steps",
                         "eval_per_class", "embed_chunk"), at_least(1)),
        "vgg_resize": at_least(0),
        "cell_bits": Constraint(lambda v: -1 <= v <= 6, "must be -1 (auto) or 0..6 (1 to 64 cells per class)"),
        "weight_first": positive(), "weight_counts": positive(), "lr": positive(),
        "beta1": in_range(0, 1), "ema": in_range(0, 1), "lr_final": in_range(0, 1, "right"),
    }

    def check(self) -> None:
        if self.cell_bits and not (self.weight_centres > 0 and self.cell_noise > 0):
            raise InputError(f"weight_centres and cell_noise must be > 0 unless cell_bits=0, got "
                             f"{self.weight_centres}, {self.cell_noise}")
        if self.second_moment and not self.weight_second > 0:
            raise InputError(f"weight_second must be > 0 with second_moment=true, got {self.weight_second}")
