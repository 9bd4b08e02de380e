"""The generative-model interface of Private Evolution: `random` and `variation`, nothing else.

PE (Lin et al., ICLR 2024) uses a generative model only through two calls,
as Microsoft's ``pe`` library does with its ``API`` base class:

* ``random(n, labels)``: n new images from the model (labels name the class
  each image is meant for; an unconditional model may ignore them);
* ``variation(images, labels, degree)``: one variation of each image, further
  from it the larger ``degree`` in (0, 1] (a fraction of the model's noise
  schedule: ``degree = 1`` is as far as a fresh sample).

Images are float tensors (N, C, H, W) in [-1, 1] on the CPU, at the private
data's size. Implementations here: `dpimages.methods.pe.diffusion_api`
(our own EDM U-Net trained on public data) and
`dpimages.methods.pe.diffusers_api` (a user's local diffusers pipeline).

Privacy contract: an API never sees private data. It receives only
synthetic images (themselves post-processing of noisy releases) and public
facts (class names, labels of synthetic images); its randomness comes from
an explicit ``torch.Generator`` that is independent of the privacy noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from dpimages.errors import InputError
from dpimages.filehash import file_sha256


class ImageAPI(ABC):
    """Base class of PE's generative-model APIs (see the module docstring)."""

    #: short name recorded in reports ("diffusion", "diffusers", ...)
    kind: str = ""

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images this API returns."""

    @abstractmethod
    def random(self, n: int, labels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """n new images (n, C, H, W) in [-1, 1]; `labels` (n,) int64 name the intended classes."""

    @abstractmethod
    def variation(
        self, images: torch.Tensor, labels: torch.Tensor, degree: float, *, generator: torch.Generator
    ) -> torch.Tensor:
        """One variation per image of `images` (N, C, H, W) in [-1, 1]; `degree` in (0, 1]."""

    def describe(self) -> dict[str, Any]:
        """Public facts about the model (what it is, where from, what it was trained on)."""
        return {"kind": self.kind}

    def set_classes(self, classes: list[str]) -> None:  # noqa: B027 - optional hook
        """Told the class names before the first call (text-to-image APIs build prompts from them)."""

    def check_shape(self, image_shape: tuple[int, int, int]) -> None:
        """Refuse private data whose (H, W, C) differs from the API's images."""
        if tuple(image_shape) != tuple(self.image_shape):
            raise InputError(
                f"the {self.kind or 'generative'} API makes images of shape (H, W, C) = {tuple(self.image_shape)}, "
                f"the private data has {tuple(image_shape)}"
            )


def check_degree(degree: float) -> float:
    """A variation degree must be in (0, 1]."""
    d = float(degree)
    if not 0.0 < d <= 1.0:
        raise InputError(f"variation degree must be in (0, 1], got {degree}")
    return d


def check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    """(N, C, H, W) float images with (N,) integer labels (message names shapes and dtypes only)."""
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images must be float (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise InputError(f"labels must be integers of shape ({images.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")


def model_sha256(*paths: Path) -> str:
    """``sha256:`` over the given files' bytes (provenance of a model loaded by path)."""
    return "sha256:" + file_sha256(*paths)


def in_batches(n: int, batch: int) -> list[slice]:
    """Slices covering range(n) in pieces of at most `batch`."""
    return [slice(i, min(n, i + batch)) for i in range(0, n, max(1, batch))]
