"""`ImageData`: the one in-memory form of an image collection."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import numpy as np
import torch

from dpimages.errors import InputError

MIN_SIDE, MAX_SIDE = 8, 1024  # pixels per image side that every loader accepts


@dataclass
class ImageData:
    """uint8 images (N, H, W, C), int64 labels (N,) or None, class names, a name.

    `fingerprint` is an unkeyed SHA-256 of shapes, pixels and labels. Of
    private data it is never written to a file a user may share (anyone with
    a candidate data set could confirm it): runs keep only `keyed_digest`
    under ``checkpoints/`` and compare fingerprints in memory. `public_id`
    (a shortened fingerprint) names PUBLIC data sets in shareable files.
    """

    images: np.ndarray
    labels: np.ndarray | None
    classes: list[str]
    name: str
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_arrays(self.images, self.labels, len(self.classes), self.name)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        if "_fingerprint" not in self.notes:
            h = hashlib.sha256()
            h.update(repr((self.images.shape, self.labels is None)).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
            if self.labels is not None:
                h.update(np.ascontiguousarray(self.labels).tobytes())
            self.notes["_fingerprint"] = "sha256:" + h.hexdigest()
        return self.notes["_fingerprint"]

    @property
    def public_id(self) -> str:
        """A short identifier (16 hex digits of `fingerprint`) of a PUBLIC data set, for shareable files."""
        return self.fingerprint[: len("sha256:") + 16]

    def keyed_digest(self, key: bytes) -> str:
        """HMAC-SHA256 under `key` of shapes, pixels, labels and class names (the run's keyed data check)."""
        h = hmac.new(key, digestmod=hashlib.sha256)
        h.update(repr((self.images.shape, self.labels is None, self.classes)).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()

    def as_one_class(self) -> ImageData:
        """Unlabelled images as one class (named "all"), so every method fits them unconditionally; the note in
        ``notes["one_class"]`` says so. Labelled data is returned as it is."""
        if self.labels is not None:
            return self
        return ImageData(self.images, np.zeros(len(self), np.int64), ["all"], self.name,
                         {**self.notes, "one_class": f"{self.name}: no labels: read as one class (an unconditional "
                                                     "fit)"})

    def subset(self, index: np.ndarray, name: str | None = None) -> ImageData:
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], labels, list(self.classes), name or self.name)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float (N, C, H, W) in [-1, 1]: the single place pixels become floats."""
        return to_unit_range(torch.from_numpy(self.images), device)

    def label_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.labels is None:
            raise InputError(f"data set {self.name} has no labels")
        return torch.from_numpy(self.labels).to(device)


def to_unit_range(images_nhwc_uint8: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    x = images_nhwc_uint8.to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images_nchw: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) numpy."""
    x = ((images_nchw.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def validate_arrays(images: object, labels: object, num_classes: int, name: str) -> None:
    """Shape, dtype and range checks; messages show shapes and dtypes only."""
    if not isinstance(images, np.ndarray):
        raise InputError(f"{name}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise InputError(f"{name}: images must have dtype uint8 (N, H, W, C), got {images.dtype}")
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise InputError(f"{name}: images must have shape (N, H, W, C) with C in (1, 3), got {images.shape}")
    if images.shape[0] == 0:
        raise InputError(f"{name}: the data set has no images")
    h, w = images.shape[1:3]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise InputError(f"{name}: image size must be between {MIN_SIDE} and {MAX_SIDE} pixels per side, got {h}x{w}")
    if labels is None:
        return
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64:
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise InputError(f"{name}: labels must be an int64 array, got {dtype}")
    if labels.shape != (images.shape[0],):
        raise InputError(f"{name}: {images.shape[0]} images but labels have shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{name}: labels must be in [0, {num_classes}) for {num_classes} classes")
