"""Configuration of Private Evolution (`pe`) and of the public diffusion model it can use.

`PEConfig` presets change sizes only (never code paths):

* ``smoke``: a handful of samples and two iterations; for tests, no quality claim.
* ``cpu``: the whole fit within 60 minutes on 2 CPU cores (Fashion-MNIST,
  55,000 private images, the ``cpu`` public model): 200 samples per class,
  T = 8 iterations, lookahead k = 1, 8-step solvers (sized from a measured
  ~120 U-Net evaluations/s on one busy core: about 35 minutes).
* ``gpu``: the paper's CIFAR-10 sizes: 2,000 samples per class, T = 20,
  lookahead k = 8, 18-step solvers.

`PublicModelConfig` sizes the U-Net that ``dpimages public-model train``
trains, without privacy, on a public data set (e.g. ``mnist-5k``); its
``cpu`` preset trains in about 20 minutes on one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dpimages.config import Constraint, MethodConfig, at_least, in_range, one_of, positive, positive_ints
from dpimages.errors import InputError
from dpimages.nets.edm import SAMPLERS

APIS = ("diffusion", "diffusers", "dp-prior")
NN_BACKENDS = ("torch", "faiss")


@dataclass
class PEConfig(MethodConfig):
    """PE settings (defaults: the ``cpu`` preset's sizes).

    API: ``api=diffusion`` loads a model written by ``dpimages public-model
    train`` from ``api_path``; ``api=diffusers`` loads a user's local
    diffusers pipeline directory from ``api_path`` (``pip install
    dpimages[diffusers]``); ``api=dp-prior`` trains the diffusion API on
    ``prior_images`` samples of a DP prior (dp-mepf) fitted first with
    ``prior_share`` of epsilon, in the same calibrated plan as the votes.
    Votes are cast in the space of a feature network
    never trained on private data: ``features=public`` (a conv net trained
    at fit time on ``--public``), ``features=path`` (``feature_path``: a
    directory from ``dpimages features train`` or a torchvision-style VGG
    state dict) or ``features=random`` (seeded random conv net).

    Schedule: T = ``iterations`` noisy vote histograms; the variation degree
    goes linearly from ``degree_start`` to ``degree_end``; bins whose noisy
    count is below H = ``threshold_sigmas`` x (the noise standard deviation)
    are set to zero before resampling. Labels of the synthetic population
    are uniform (``population_per_class`` per class): class sizes of the
    private data are not released.
    """

    # generative-model API
    api: str = "diffusion"
    api_path: str = ""  # empty with api=diffusion and --public: train the public model first (cached)
    public_model_preset: str = "cpu"  # the PublicModelConfig preset of that first stage (and of api=dp-prior's)
    # api=dp-prior: the diffusion API is trained on samples of a DP prior (dpimages.methods.prior) fitted first
    prior_share: float = 0.3  # the prior's share of epsilon; the votes are calibrated jointly over the rest
    prior_preset: str = "cpu"  # the prior's (dp-mepf's) preset
    prior_images: int = 5000  # prior samples the API is trained on (the size of mnist-5k: same training time)
    api_batch: int = 500
    sampler: str = "heun"
    sample_steps: int = 8  # solver steps of `random` (a fresh sample)
    variation_steps: int = 8  # steps of the full schedule; a variation of degree d takes ceil(d * this)
    guidance: float = 0.0  # diffusers text pipelines: guidance scale (0: pipeline default)
    prompt_template: str = "{name}"  # diffusers text pipelines: prompt of class `name`
    # feature network for the votes (public, path or random; never trained on private data)
    features: str = "public"
    feature_path: str = ""
    feature_channels: tuple[int, ...] = (32, 64, 128)
    feature_layers: tuple[str, ...] = ()
    feature_pool: tuple[int, ...] = (2,)
    feature_seed: int = 1
    public_epochs: int = 3
    embed_chunk: int = 1000
    # evolution
    population_per_class: int = 200
    iterations: int = 8
    lookahead: int = 1
    # degree of our mnist-5k model's SDEdit (measured on Fashion-MNIST test images): 0.2 is nearly a copy,
    # 0.3 changes texture, 0.45 keeps only the silhouette, 0.6 and above give a fresh digit-like sample
    degree_start: float = 0.45
    degree_end: float = 0.25
    threshold_sigmas: float = 2.0
    # nearest neighbours
    nn_backend: str = "torch"
    nn_chunk: int = 2048
    # outputs
    grid_per_class: int = 10

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {
            "public_model_preset": "smoke", "prior_preset": "smoke", "prior_images": 64,
            "api_batch": 64, "sample_steps": 2, "variation_steps": 2,
            "feature_channels": (8, 16),
            "public_epochs": 1, "population_per_class": 4, "iterations": 2, "lookahead": 1, "grid_per_class": 4,
        },
        "cpu": {"population_per_class": 200, "iterations": 8, "lookahead": 1, "sample_steps": 8,
                "variation_steps": 8},
        "gpu": {"public_model_preset": "gpu", "population_per_class": 2000, "iterations": 20, "lookahead": 8,
                "sample_steps": 18, "variation_steps": 18, "api_batch": 2000},
        "gpu-short": {"public_model_preset": "gpu", "population_per_class": 1000, "iterations": 10,
                      "lookahead": 4, "sample_steps": 18, "variation_steps": 12, "api_batch": 2000},
    }

    # work per image grows with its area: on larger images these shrink (`MethodConfig.image_scaled`)
    image_scaled: ClassVar[dict[str, int]] = {"population_per_class": 10, "api_batch": 16, "prior_images": 500}
    constraints: ClassVar[dict[str, Constraint]] = {
        "api": one_of(*APIS), "nn_backend": one_of(*NN_BACKENDS), "sampler": one_of(*SAMPLERS),
        "public_model_preset": one_of("smoke", "cpu", "gpu"),
        "prior_preset": one_of("smoke", "cpu", "gpu", "gpu-short"), "prior_share": in_range(0, 1, "neither"),
        "prior_images": at_least(1),
        **dict.fromkeys(("api_batch", "sample_steps", "variation_steps", "embed_chunk", "population_per_class",
                         "iterations", "nn_chunk", "grid_per_class"), at_least(1)),
        "lookahead": at_least(0),
        "degree_start": in_range(0, 1, "right"), "degree_end": in_range(0, 1, "right"),
        "threshold_sigmas": at_least(0), "guidance": at_least(0),
        "prompt_template": Constraint(lambda v: "{name}" in v, "must contain {name}"),
    }

    def degrees(self) -> list[float]:
        """The variation degree of each iteration: linear from degree_start to degree_end."""
        t = self.iterations
        if t == 1:
            return [self.degree_start]
        return [self.degree_start + (self.degree_end - self.degree_start) * i / (t - 1) for i in range(t)]

    def check(self) -> None:
        if self.features == "random+scatter":
            raise InputError("pe votes in one feature network: use features=random or features=scatter, "
                             "not random+scatter")


@dataclass
class PublicModelConfig(MethodConfig):
    """The public EDM U-Net for ``api=diffusion`` (trained without privacy on public data only)."""

    channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    num_heads: int = 1
    epochs: int = 12
    max_steps: int = 0  # > 0: stop after this many optimiser steps (smoke tests)
    max_minutes: float = 0.0  # > 0: stop at the first step boundary after this many minutes (shared machines)
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0
    log_every: int = 50
    grid_samples: int = 64  # samples.png written next to the model (to look at)
    grid_steps: int = 18

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"channels": 8, "channel_mult": (1, 2), "epochs": 1, "max_steps": 10, "batch_size": 32,
                  "log_every": 5, "grid_samples": 8, "grid_steps": 2},
        "cpu": {"channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (),
                "epochs": 12, "batch_size": 64},
        "gpu": {"channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (7,),
                "epochs": 200, "batch_size": 256, "lr": 3e-4, "ema": 0.9995},
    }

    constraints: ClassVar[dict[str, Constraint]] = {
        **dict.fromkeys(("channels", "num_res_blocks", "num_heads", "epochs", "batch_size", "grid_samples",
                         "grid_steps"), at_least(1)),
        "channel_mult": positive_ints(), "max_steps": at_least(0, "(0: no limit)"), "lr": positive(),
        "ema": in_range(0, 1),
    }

    def check(self) -> None:
        if self.channels % self.num_heads:
            raise InputError(f"channels ({self.channels}) must be divisible by num_heads ({self.num_heads})")
