"""DPAF's networks and optimisers: what trains, how it is built and how it is checkpointed.

The discriminator is split, ``D(x, y) = f2(f1(x), y)``: f1 (`FrontFeatures`: conv blocks with GroupNorm)
maps each image to a feature vector; f2 (`BackHead`: later conv layers and a label-conditional projection
head) scores feature vectors. Nothing here reads private data: the weights and optimiser states are DP
outputs or post-processing of them (`dpimages.methods.dpaf.release`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from dpimages.methods.dpaf.config import DPAFConfig
from dpimages.nets.discriminators import BackHead, FrontFeatures
from dpimages.nets.generators import ConditionalGenerator
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed


def new_generator(cfg: DPAFConfig, image_shape: tuple[int, int, int], num_classes: int) -> ConditionalGenerator:
    """The label-conditional generator for (H, W, C) images."""
    h, w, c = image_shape
    return ConditionalGenerator((c, h, w), num_classes, cfg.z_dim, cfg.gen_channels, cfg.generator)


def new_discriminator(cfg: DPAFConfig, image_shape: tuple[int, int, int],
                      num_classes: int) -> tuple[FrontFeatures, BackHead]:
    """f1 and f2; f2's input scale sqrt(d) / C_f makes clipped features of norm C_f unit-scale per entry."""
    h, w, c = image_shape
    f1 = FrontFeatures(c, (h, w), cfg.d_channels, cfg.feature_channels)
    f2 = BackHead(f1.feature_shape, num_classes, cfg.f2_channels,  # type: ignore[arg-type]
                  input_scale=math.sqrt(f1.dim) / cfg.feature_clip)
    return f1, f2


@dataclass
class Nets:
    """Everything that trains (and is checkpointed), with the training generator (public randomness)."""

    f1: FrontFeatures
    f2: BackHead
    gen: ConditionalGenerator
    ema: ConditionalGenerator
    opt_d: torch.optim.Optimizer  # f1 (aggregation) or the whole discriminator (ablation)
    opt_f2: torch.optim.Optimizer | None
    opt_g: torch.optim.Optimizer
    rng: torch.Generator

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"opt_d": self.opt_d, "opt_f2": self.opt_f2, "opt_g": self.opt_g}
        return {name: opt for name, opt in named.items() if opt is not None}

    def param_counts(self) -> dict[str, int]:
        return {f"params_{name}": sum(p.numel() for p in net.parameters())
                for name, net in (("f1", self.f1), ("f2", self.f2), ("g", self.gen))}

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights, optimiser states and the training generator's state, as ``(tensors, state)``."""
        tensors = {**prefixed("f1", self.f1.state_dict()), **prefixed("f2", self.f2.state_dict()),
                   **prefixed("gen", self.gen.state_dict()), **prefixed("ema", self.ema.state_dict())}
        state: dict[str, Any] = {"train_rng": rng_state(self.rng)}
        for name, opt in self.optimizers().items():
            t, groups = optimizer_tensors(name, opt)
            tensors.update(t)
            state[name] = groups
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], device: torch.device) -> None:
        """Load what `checkpoint` saved."""
        for name in ("f1", "f2", "gen", "ema"):
            getattr(self, name).load_state_dict(unprefixed(name, tensors))
        for name, opt in self.optimizers().items():
            load_optimizer(name, opt, tensors, state[name], device)
        set_rng_state(self.rng, state["train_rng"])


def build_nets(cfg: DPAFConfig, image_shape: tuple[int, int, int], num_classes: int, device: torch.device,
               rng: torch.Generator) -> Nets:
    """Fresh networks on `device` (initialised from torch's global generator, f1 and f2 first) and Adam
    optimisers: f1 and f2 apart with aggregation, one optimiser for the whole discriminator in the ablation."""
    f1, f2 = new_discriminator(cfg, image_shape, num_classes)
    f1.to(device)
    f2.to(device)
    gen = new_generator(cfg, image_shape, num_classes).to(device)
    ema = copy.deepcopy(gen).requires_grad_(False)
    betas = (cfg.beta1, 0.999)
    opt_d = torch.optim.Adam(f1.parameters() if cfg.aggregation else [*f1.parameters(), *f2.parameters()],
                             lr=cfg.lr_f1, betas=betas)
    opt_f2 = torch.optim.Adam(f2.parameters(), lr=cfg.lr_f2, betas=betas) if cfg.aggregation else None
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=betas)
    return Nets(f1, f2, gen, ema, opt_d, opt_f2, opt_g, rng)
