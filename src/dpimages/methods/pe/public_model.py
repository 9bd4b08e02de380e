"""Train PE's diffusion API on PUBLIC data and write it to a folder (`dpimages public-model train`).

The model is trained without privacy accounting, so it must never see
private data: the CLI names the data `--data` of a *public* set, and PE uses
the model only through its random and variation APIs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpimages.config import resolve_config
from dpimages.data import ImageData
from dpimages.errors import require_empty_folder
from dpimages.eval.feature_nets import cache_dir
from dpimages.eval.grid import save_grid
from dpimages.methods.pe.config import PublicModelConfig
from dpimages.methods.pe.diffusion_api import model_arch, sample_grid, save_public_model, train_public_model


def public_model_config(preset: str | None, overrides: list[str]) -> PublicModelConfig:
    """The public model's settings at `preset` with KEY=VALUE `overrides` (InputError, exit 2, for a bad key)."""
    return resolve_config(PublicModelConfig, preset, overrides)


def train_and_save_public_model(public: ImageData, cfg: PublicModelConfig, out: str | Path, *, preset: str | None,
                                device: torch.device, log: Callable[..., None] | None = None,
                                progress: bool = False) -> tuple[Path, dict]:
    """Train an EDM U-Net on `public` per `cfg`, save it (+ samples.png) in the new folder `out`; (path, meta)."""
    require_empty_folder(out)
    t0 = time.time()
    model, facts = train_public_model(public, cfg, device=device, log=log, progress=progress)
    meta: dict[str, Any] = {
        "arch": model_arch(cfg, public.image_shape), "image_shape": list(public.image_shape), "trained_on": public.name,
        "public_fingerprint": public.public_id, "public_size": len(public), "preset": preset,
        "config": cfg.to_dict(), **facts, "wall_s": round(time.time() - t0, 1)}
    path = save_public_model(out, model.cpu(), meta)
    save_grid(path / "samples.png", sample_grid(model.cpu(), public.image_shape, cfg.grid_samples, cfg.grid_steps),
              None, 8, per_class=8)
    return path, meta


def cached_public_model(public: ImageData, preset: str, *, device: torch.device,
                        log: Callable[..., None] | None = None, progress: bool = False) -> Path:
    """The public model for `public` at `preset` sizes: trained once, then reused from the cache.

    Cached under ``$DPIMAGES_CACHE/public-models/KEY`` where KEY hashes the public data's fingerprint and the
    training config (public data only: nothing private goes into the key or the model). Written to a temporary
    folder and renamed, so a crash leaves no half-written model.
    """
    cfg = resolve_config(PublicModelConfig, preset)
    blob = json.dumps({"data": public.fingerprint, "config": cfg.to_dict()}, sort_keys=True)
    root = cache_dir() / "public-models"
    path = root / hashlib.sha256(blob.encode()).hexdigest()[:20]
    if (path / "model.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    train_and_save_public_model(public, cfg, tmp, preset=preset, device=device, log=log, progress=progress)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
    return path
