"""PE's `diffusers` API: an adapter for a user's local diffusers pipeline, loaded from a directory.

Optional extra: ``pip install 'dpimages[diffusers]'``. Nothing is downloaded:
the pipeline is read with ``DiffusionPipeline.from_pretrained(path,
local_files_only=True)`` from a directory written by ``save_pretrained``.

Two kinds of pipeline:

* **text-to-image** (a pipeline with a text encoder, e.g. Stable Diffusion):
  ``random`` calls the pipeline with one prompt per image,
  ``prompt_template.format(name=<class name>)``; ``variation`` is img2img
  (``AutoPipelineForImage2Image.from_pipe``) with ``strength = degree``.
* **unconditional or class-conditional U-Net** (a pipeline with ``unet`` and
  ``scheduler`` and no text encoder, e.g. ``DDPMPipeline``): ``random`` runs
  the scheduler's loop from pure noise (class labels go to the U-Net when it
  has ``num_class_embeds``); ``variation`` is the same img2img/SDEdit
  procedure as diffusers' img2img pipelines: noise the image to the
  timestep at fraction ``degree`` of the schedule (``scheduler.add_noise``)
  and run the remaining ``ceil(degree x steps)`` steps.

Images are converted between the private data's (H, W, C) and the
pipeline's size and channels (bilinear resize; grey <-> RGB by repeating or
averaging channels). Privacy contract: the pipeline only ever receives
synthetic images and public class names; its randomness is PE's explicit
generator, independent of the privacy noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpimages.errors import InputError
from dpimages.methods.pe.image_api import ImageAPI, check_degree, check_images, in_batches, model_sha256


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise InputError("api=diffusers needs the optional extra: pip install 'dpimages[diffusers]'") from None
    return diffusers


def pipeline_sha256(path: Path) -> str:
    """SHA-256 over every file of the pipeline directory (sorted by relative path)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return model_sha256(*files)


class DiffusersAPI(ImageAPI):
    """`ImageAPI` over a local diffusers pipeline (see the module docstring)."""

    kind = "diffusers"

    def __init__(
        self,
        pipe: Any,
        *,
        steps: int = 8,
        guidance: float = 0.0,
        prompt_template: str = "{name}",
        batch: int = 64,
        image_shape: tuple[int, int, int] | None = None,
        device: torch.device | str = "cpu",
        info: dict[str, Any] | None = None,
    ) -> None:
        self.pipe = pipe
        self.steps, self.guidance, self.prompt_template = int(steps), float(guidance), prompt_template
        self.batch = int(batch)
        self.device = torch.device(device)
        self.text = getattr(pipe, "text_encoder", None) is not None or getattr(pipe, "tokenizer", None) is not None
        unet = getattr(pipe, "unet", None)
        if not self.text and (unet is None or getattr(pipe, "scheduler", None) is None):
            raise InputError(f"diffusers pipeline {type(pipe).__name__}: need a text-to-image pipeline or one with "
                             "a unet and a scheduler")
        if self.text:
            size = int(getattr(pipe, "default_sample_size", 64) * getattr(pipe, "vae_scale_factor", 8))
            self.native = (size, size, 3)
        else:
            s = unet.config.sample_size
            h, w = (s, s) if isinstance(s, int) else tuple(s)
            self.native = (int(h), int(w), int(unet.config.in_channels))
        self._shape = tuple(image_shape) if image_shape is not None else self.native
        self.classes: list[str] = []
        self._i2i: Any = None
        self.info = dict(info or {})

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> DiffusersAPI:
        """The pipeline saved in directory `path` (``save_pretrained``); never downloads."""
        diffusers = _import_diffusers()
        p = Path(path)
        if not p.is_dir() or not (p / "model_index.json").exists():
            raise InputError(f"api_path {p}: expected a diffusers pipeline directory with model_index.json")
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # diffusers raises many types for a bad directory
            raise InputError(f"{p}: could not load a diffusers pipeline ({type(e).__name__})") from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(torch.device(kwargs.get("device", "cpu")))
        info = {"path": str(p), "sha256": pipeline_sha256(p), "pipeline": type(pipe).__name__}
        return cls(pipe, info=info, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def set_classes(self, classes: list[str]) -> None:
        self.classes = list(classes)

    def describe(self) -> dict[str, Any]:
        mode = "text-to-image with prompts " + repr(self.prompt_template) if self.text else (
            "class-conditional U-Net" if self._num_class_embeds() else "unconditional U-Net")
        return {"kind": self.kind, "random_mode": mode, "steps": self.steps, "guidance": self.guidance,
                "native_shape": list(self.native), **self.info}

    # -- conversions ---------------------------------------------------------------------------------
    def _to_native(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self.native
        if x.shape[1] != c:
            x = x.repeat(1, c, 1, 1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True).repeat(1, c, 1, 1)
        if tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x

    def _from_native(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self._shape
        x = x.float().cpu()
        if tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] != c:
            x = x.mean(dim=1, keepdim=True) if c == 1 else x[:, :1].repeat(1, c, 1, 1)
        return x.clamp(-1, 1)

    def _num_class_embeds(self) -> int:
        unet = getattr(self.pipe, "unet", None)
        return int(getattr(unet.config, "num_class_embeds", None) or 0) if unet is not None else 0

    def _prompts(self, labels: torch.Tensor) -> list[str]:
        if not self.classes:
            raise InputError("diffusers text-to-image API: class names are needed for prompts (set_classes)")
        return [self.prompt_template.format(name=self.classes[int(y)]) for y in labels]

    def _class_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        n = self._num_class_embeds()
        if not n:
            return None
        if labels.numel() and int(labels.max()) >= n:
            raise InputError(f"the pipeline's U-Net has {n} classes, labels go up to {int(labels.max())}")
        return labels.long().to(self.device)

    # -- U-Net pipelines: the scheduler loop (random) and img2img (variation) -----------------------
    @torch.no_grad()
    def _unet_loop(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
        unet, sched = self.pipe.unet, self.pipe.scheduler
        cls = self._class_labels(labels)
        for t in timesteps:
            inp = sched.scale_model_input(x, t)
            eps = unet(inp, t, class_labels=cls).sample
            x = sched.step(eps, t, x, generator=generator).prev_sample
        return x

    def _unet_random(self, n: int, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w, c = self.native
        sched = self.pipe.scheduler
        sched.set_timesteps(self.steps)
        x = torch.randn((n, c, h, w), generator=generator).to(self.device) * sched.init_noise_sigma
        return self._unet_loop(x, sched.timesteps, labels, generator)

    def _unet_variation(self, x: torch.Tensor, labels: torch.Tensor, degree: float,
                        generator: torch.Generator) -> torch.Tensor:
        sched = self.pipe.scheduler
        sched.set_timesteps(self.steps)
        k = min(self.steps, max(1, math.ceil(degree * self.steps)))
        timesteps = sched.timesteps[(self.steps - k) * getattr(sched, "order", 1):]
        noise = torch.randn(x.shape, generator=generator).to(self.device)
        x_t = sched.add_noise(x.to(self.device), noise, timesteps[:1].repeat(x.shape[0]))
        return self._unet_loop(x_t, timesteps, labels, generator)

    # -- text pipelines ------------------------------------------------------------------------------
    def _text_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_inference_steps": self.steps, "output_type": "np"}
        if self.guidance > 0:
            kw["guidance_scale"] = self.guidance
        return kw

    @staticmethod
    def _np_to_tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0

    # -- the API -------------------------------------------------------------------------------------
    def random(self, n: int, labels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        out = []
        for b in in_batches(int(n), self.batch):
            y = labels[b]
            if self.text:
                res = self.pipe(prompt=self._prompts(y), generator=generator, **self._text_kwargs())
                out.append(self._from_native(self._np_to_tensor(res.images)))
            else:
                out.append(self._from_native(self._unet_random(len(y), y, generator)))
        h, w, c = self._shape
        return torch.cat(out) if out else torch.zeros(0, c, h, w)

    def variation(self, images: torch.Tensor, labels: torch.Tensor, degree: float, *,
                  generator: torch.Generator) -> torch.Tensor:
        check_images(images, labels)
        d = check_degree(degree)
        out = []
        for b in in_batches(images.shape[0], self.batch):
            x, y = self._to_native(images[b].float()), labels[b]
            if self.text:
                if self._i2i is None:
                    self._i2i = _import_diffusers().AutoPipelineForImage2Image.from_pipe(self.pipe)
                    self._i2i.set_progress_bar_config(disable=True)
                res = self._i2i(prompt=self._prompts(y), image=(x + 1.0) / 2.0, strength=d, generator=generator,
                                **self._text_kwargs())
                out.append(self._from_native(self._np_to_tensor(res.images)))
            else:
                out.append(self._from_native(self._unet_variation(x, y, d, generator)))
        return torch.cat(out) if out else images.clone()
