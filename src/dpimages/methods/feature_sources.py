"""Fixed feature networks built from public information only (dp-mepf's matching features, pe's vote features),
and their part of a checkpoint.

Privacy contract: nothing here reads private data. A trunk is seeded random
(``features=random``, public seeds ``feature_seed + i``), a scattering
transform (``features=scatter``: fixed wavelets, no parameters and no data;
``random+scatter``: both, concatenated), trained on the
labelled public set (``features=public``) or loaded from a path
(``features=path``, recorded by its SHA-256 so that a resumed run refuses
changed weights). The private images only meet these trunks inside a
method's release code. A config needs ``features``, ``feature_seed``,
``feature_channels``, ``feature_path`` and ``public_epochs``; ``feature_nets``,
``feature_kernel``, ``feature_act``, ``feature_tap`` and ``vgg_resize`` are
optional (defaults 1, 3, relu, post, 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpimages.config import MethodConfig
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.filehash import file_sha256
from dpimages.nets.feature_extractors import (
    ConvTrunk,
    ScatterTrunk,
    Trunk,
    load_trunk,
    random_conv_trunk,
    train_conv_trunk,
    trunk_from_config,
)
from dpimages.runs import prefixed, unprefixed


def path_sha256(path: Path) -> str:
    """Provenance of a feature net loaded by path: ``sha256:`` over its weights and features.json (or the file)."""
    files = [path / "weights.safetensors", path / "features.json"] if path.is_dir() else [path]
    return "sha256:" + file_sha256(*files)


def _arch(cfg: MethodConfig) -> tuple[int, str, str, int]:
    """(kernel, activation, tap, vgg resize) of `cfg`'s trunks, with the defaults of configs that do not set them."""
    return (getattr(cfg, "feature_kernel", 3), getattr(cfg, "feature_act", "relu"), getattr(cfg, "feature_tap", "post"),
            getattr(cfg, "vgg_resize", 0))


SCATTER_SCALES = 2  # J: 2^J-pixel blocks (7x7 maps at 28x28)
SCATTER_ORIENTATIONS = 8  # L


def _scatter_trunk(channels: int, image_size: tuple[int, int]) -> ScatterTrunk:
    return ScatterTrunk(channels, image_size, SCATTER_SCALES, SCATTER_ORIENTATIONS)


def build_trunks(cfg: MethodConfig, channels: int, public: ImageData | None,
                 log: Callable[..., None] | None = None,
                 image_size: tuple[int, int] | None = None) -> tuple[list[Trunk], dict[str, Any]]:
    """The feature trunks for images of `channels` channels, and their public facts (``train_info["features"]``).

    `log` receives the public training's per-epoch values (``features=public``). `image_size` (H, W) is
    needed by the scattering sources (their filters are built for one size).
    """
    kernel, act, tap, resize = _arch(cfg)
    if cfg.features in ("random", "random+scatter", "scatter"):
        seeds = ([] if cfg.features == "scatter" else
                 [cfg.feature_seed + i for i in range(getattr(cfg, "feature_nets", 1))])
        trunks: list[Trunk] = [random_conv_trunk(s, channels, cfg.feature_channels, kernel, act, tap) for s in seeds]
        facts: dict[str, Any] = {"source": cfg.features, "seeds": seeds}
        if cfg.features != "random":
            if image_size is None:
                raise ValueError("scattering features need the image size")
            trunks.append(_scatter_trunk(channels, image_size))
            facts["scattering"] = trunks[-1].config()
        return trunks, facts
    if cfg.features == "public":
        if public is None:
            raise InputError("features=public needs public data: pass --public SPEC (e.g. mnist-5k)")
        if public.labels is None:
            raise InputError(f"{public.name}: features=public needs a labelled public set")
        if public.image_shape[2] != channels:
            raise InputError(f"public images have {public.image_shape[2]} channels, private images {channels}")
        trunk, facts = train_conv_trunk(
            public.to_tensor(), public.label_tensor(), public.num_classes, channels=cfg.feature_channels,
            kernel=kernel, act=act, epochs=cfg.public_epochs, seed=cfg.feature_seed, log=log,
        )
        trunk.tap = tap
        return [trunk], {"source": "public", "public": public.name, "public_fingerprint": public.public_id, **facts}
    path = Path(cfg.feature_path)
    trunk, meta = load_trunk(path, tap=tap, resize=resize)
    in_ch = trunk.in_channels
    if in_ch != channels and not (channels == 1 and in_ch == 3 and trunk.arch == "vgg"):
        raise InputError(f"feature network {path} takes {in_ch}-channel images, the data has {channels} channels")
    return [trunk], {"source": "path", "path": str(path), "sha256": path_sha256(path),
                     **{k: v for k, v in meta.items() if k != "layout"}}


def trunk_tensors(cfg: MethodConfig, trunks: list[Trunk]) -> tuple[dict[str, torch.Tensor], int]:
    """The trunks' weights for a checkpoint (``feat{i}.*``) and their number; none with ``features=path``."""
    if cfg.features == "path":
        return {}, 0
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(trunks):
        tensors.update(prefixed(f"feat{i}", t.state_dict()))
    return tensors, len(trunks)


def restore_trunks(cfg: MethodConfig, channels: int, tensors: dict[str, torch.Tensor], count: int,
                   features: dict[str, Any]) -> list[Trunk]:
    """The feature trunks of a checkpoint (weights saved there, or the same file by path and hash)."""
    kernel, act, tap, resize = _arch(cfg)
    if cfg.features == "path":
        path = Path(cfg.feature_path)
        if path_sha256(path) != features.get("sha256"):
            raise InputError(f"--resume: feature weights {path} changed since the run started")
        trunk, _ = load_trunk(path, tap=tap, resize=resize)
        return [trunk]
    scatter = features.get("scattering")
    trunks: list[Trunk] = []
    for i in range(count - (scatter is not None)):
        t = ConvTrunk(channels, cfg.feature_channels, kernel, act, tap)
        t.load_state_dict(unprefixed(f"feat{i}", tensors))
        trunks.append(t)
    if scatter is not None:  # no weights: rebuilt from its public settings
        trunks.append(trunk_from_config(scatter, tap))
    return trunks
