"""PE's `diffusion` API: our own EDM U-Net, trained without privacy on a public data set.

* Training (`train_public_model`, the command ``dpimages public-model
  train``): an unconditional `dpimages.nets.unet.UNet` with EDM
  preconditioning (`dpimages.nets.edm.EDMDenoiser`), EDM's loss and noise
  levels, Adam and an EMA of the weights, on *public* images only (e.g.
  ``mnist-5k``). Saved as ``model.safetensors`` (the EMA weights) plus
  ``model.json`` (architecture, image shape, what it was trained on).
* ``random``: EDM sampling from pure noise (``sample_steps`` solver steps).
* ``variation``: SDEdit (Meng et al., ICLR 2022) via `EDMDenoiser.vary`:
  noise each image to ``sigma(degree)`` and solve the probability-flow ODE
  back to 0. ``sigma(degree)`` is the point at fraction ``degree`` of EDM's
  sampling schedule (Eq. 5), counted from its low end:
  ``(sigma_min^(1/rho) + degree (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``,
  so ``degree = 1`` starts from pure noise (sigma_max = 80), like
  diffusers' img2img ``strength``. It takes ``ceil(degree x
  variation_steps)`` solver steps.

Privacy contract: the model never sees private data (it is trained on the
public set before any private access, or by a separate command); PE calls it
only on synthetic images. The API is unconditional: the labels of PE's
population only say which class's votes a sample competes for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpimages import __version__
from dpimages.data import ImageData, to_uint8
from dpimages.errors import InputError
from dpimages.methods.pe.config import PublicModelConfig
from dpimages.methods.pe.image_api import ImageAPI, check_degree, check_images, in_batches, model_sha256
from dpimages.methods.pretrain import PretrainSchedule, train_denoiser
from dpimages.nets.edm import EDMDenoiser, get_sampler
from dpimages.nets.unet import UNet, fit_levels, num_parameters
from dpimages.seeds import seeded_init

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "dpimages-edm-unet-v1"
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def degree_to_sigma(degree: float, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                    rho: float = RHO) -> float:
    """The SDEdit start level for a variation degree in (0, 1] (see the module docstring)."""
    d = check_degree(degree)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return float((lo + d * (hi - lo)) ** rho)


def build_model(arch: dict[str, Any], image_shape: tuple[int, int, int]) -> EDMDenoiser:
    """An unconditional EDM denoiser with the U-Net described by `arch` (see `PublicModelConfig`)."""
    h, w, c = image_shape
    net = UNet((h, w), c, 0, int(arch["channels"]), tuple(arch["channel_mult"]), int(arch["num_res_blocks"]),
               tuple(arch["attn_resolutions"]), 0.0, int(arch.get("num_heads", 1)))
    return EDMDenoiser(net)


def model_arch(cfg: PublicModelConfig, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The U-Net architecture keys of `cfg` for images of `image_shape` (as stored in model.json): the levels
    follow the image size (`fit_levels`)."""
    return {"channels": cfg.channels, "channel_mult": list(fit_levels(cfg.channel_mult, image_shape[:2])),
            "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
            "num_heads": cfg.num_heads}


def train_public_model(
    public: ImageData,
    cfg: PublicModelConfig,
    *,
    device: torch.device | str = "cpu",
    log: Callable[..., None] | None = None,
    progress: bool = False,
    desc: str = "public model (public data, no privacy cost)",
) -> tuple[EDMDenoiser, dict[str, Any]]:
    """Train the EMA denoiser on PUBLIC images (never call this on private data; no privacy accounting).

    Returns the EMA model (eval mode) and facts for ``model.json``. `progress`: a tqdm bar over the steps.
    """
    dev = torch.device(device)
    g = torch.Generator().manual_seed(int(cfg.seed))
    with seeded_init(cfg.seed):
        model = build_model(model_arch(cfg, public.image_shape), public.image_shape).to(dev)
        ema = build_model(model_arch(cfg, public.image_shape), public.image_shape).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    schedule = PretrainSchedule(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, ema=cfg.ema,
                                max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, log_every=cfg.log_every)
    facts = train_denoiser(model, ema, public.to_tensor(), None, schedule, g, device=dev, log=log,
                           progress=progress, desc=desc)
    ema.eval()
    facts = {"epochs": cfg.epochs, **{k: facts[k] for k in ("steps", "epochs_done", "final_loss_ema", "train_s")},
             "parameters": num_parameters(model)}
    return ema, facts


def save_public_model(out_dir: str | Path, model: EDMDenoiser, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights) and ``model.json`` (architecture and provenance) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out / MODEL_FILE))
    (out / META_FILE).write_text(json.dumps({"format": FORMAT, "dpimages": __version__, **meta}, indent=1) + "\n")
    return out


def load_public_model(path: str | Path) -> tuple[EDMDenoiser, dict[str, Any]]:
    """Load a model written by `save_public_model`; returns (model in eval mode, its model.json + sha256)."""
    p = Path(path)
    meta_path, weights = p / META_FILE, p / MODEL_FILE
    if not p.is_dir() or not meta_path.exists() or not weights.exists():
        raise InputError(f"api_path {p}: expected a directory with {MODEL_FILE} and {META_FILE} "
                         "(from `dpimages public-model train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise InputError(f"{meta_path}: not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{meta_path}: format must be {FORMAT!r}, got {meta.get('format')!r}")
    try:
        model = build_model(meta["arch"], tuple(meta["image_shape"]))
        model.load_state_dict(load_file(str(weights)))
    except (KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"{p}: weights do not match the architecture in {META_FILE} ({type(e).__name__})") from None
    except Exception as e:  # safetensors raises several types on a bad header
        raise InputError(f"{weights}: not a readable safetensors file ({type(e).__name__})") from None
    model.requires_grad_(False)
    return model.eval(), {**meta, "sha256": model_sha256(weights, meta_path)}


class DiffusionAPI(ImageAPI):
    """`ImageAPI` over a public EDM denoiser: EDM sampling for `random`, SDEdit for `variation`."""

    kind = "diffusion"

    def __init__(
        self,
        model: EDMDenoiser,
        image_shape: tuple[int, int, int],
        *,
        sample_steps: int = 8,
        variation_steps: int = 8,
        sampler: str = "heun",
        batch: int = 500,
        device: torch.device | str = "cpu",
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self._shape = tuple(int(v) for v in image_shape)
        self.sample_steps, self.variation_steps = int(sample_steps), int(variation_steps)
        self.sampler = sampler
        get_sampler(sampler)
        self.batch = int(batch)
        self.device = torch.device(device)
        self.info = dict(info or {})

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> DiffusionAPI:
        """The model in directory `path` (from `dpimages public-model train`)."""
        model, meta = load_public_model(path)
        info = {"path": str(path), "sha256": meta["sha256"], "trained_on": meta.get("trained_on"),
                "public_fingerprint": meta.get("public_fingerprint"), "arch": meta.get("arch"),
                "parameters": meta.get("parameters"), "epochs": meta.get("epochs")}
        return cls(model, tuple(meta["image_shape"]), info=info, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "sampler": self.sampler, "sample_steps": self.sample_steps,
                "variation_steps": self.variation_steps, **self.info}

    @torch.no_grad()
    def random(self, n: int, labels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        h, w, c = self._shape
        out = []
        for b in in_batches(int(n), self.batch):
            x = self.model.generate(None, (c, h, w), n=b.stop - b.start, steps=self.sample_steps,
                                    sampler=self.sampler, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO,
                                    generator=generator)
            out.append(x.clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.zeros(0, c, h, w)

    @torch.no_grad()
    def variation(self, images: torch.Tensor, labels: torch.Tensor, degree: float, *,
                  generator: torch.Generator) -> torch.Tensor:
        check_images(images, labels)
        d = check_degree(degree)
        sigma = degree_to_sigma(d)
        steps = max(1, math.ceil(d * self.variation_steps))
        out = []
        for b in in_batches(images.shape[0], self.batch):
            x = self.model.vary(images[b].to(self.device), None, sigma, steps=steps, sampler=self.sampler,
                                sigma_min=SIGMA_MIN, rho=RHO, generator=generator)
            out.append(x.clamp(-1, 1).cpu())
        return torch.cat(out) if out else images.clone()


def sample_grid(model: EDMDenoiser, image_shape: tuple[int, int, int], n: int = 64, steps: int = 18,
                seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, C) fresh samples of a public model (to look at after training)."""
    h, w, c = image_shape
    g = torch.Generator().manual_seed(seed)
    x = model.generate(None, (c, h, w), n=n, steps=steps, generator=g)
    return to_uint8(x)

