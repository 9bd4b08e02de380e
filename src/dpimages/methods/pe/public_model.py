"""Train PE's diffusion API on PUBLIC data and write it to a folder (`dpimages public-model train`).

The model is trained without privacy accounting, so it must never see
private data: the CLI names the data `--data` of a *public* set, and PE uses
the model only through its random and variation APIs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.eval.grid import save_grid
from dpimages.methods.pe.config import PublicModelConfig
from dpimages.methods.pe.diffusion_api import model_arch, sample_grid, save_public_model, train_public_model


def train_and_save_public_model(public: ImageData, cfg: PublicModelConfig, out: str | Path, *, preset: str | None,
                                device: torch.device, log: Callable[..., None] | None = None) -> tuple[Path, dict]:
    """Train an EDM U-Net on `public` per `cfg`, save it (+ samples.png) in the new folder `out`; (path, meta)."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise InputError(f"--out {out} exists and is not empty: choose a new directory")
    t0 = time.time()
    model, facts = train_public_model(public, cfg, device=device, log=log)
    meta: dict[str, Any] = {
        "arch": model_arch(cfg), "image_shape": list(public.image_shape), "trained_on": public.name,
        "public_fingerprint": public.public_id, "public_size": len(public), "preset": preset,
        "config": cfg.to_dict(), **facts, "wall_s": round(time.time() - t0, 1)}
    path = save_public_model(out, model.cpu(), meta)
    save_grid(path / "samples.png", sample_grid(model.cpu(), public.image_shape, cfg.grid_samples, cfg.grid_steps),
              None, 8, per_class=8)
    return path, meta
