"""Write labelled images as a folder of PNGs, one sub-folder per class, in the layout `folder:PATH` reads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dpimages.data.imagedata import ImageData
from dpimages.errors import InputError, require_empty_folder


def class_folder_names(classes: list[str]) -> list[str]:
    """File-system-safe sub-folder names that sort in class order (so `folder:` reads the same labels back).

    Class names are kept when they are safe, distinct and already sorted; otherwise each gets its index as a
    zero-padded prefix (``03_coat``).
    """
    safe = [re.sub(r"[^\w.+-]", "_", c).lstrip(".") or "class" for c in classes]
    if safe == sorted(safe) and len(set(safe)) == len(safe):
        return safe
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}_{s}" for i, s in enumerate(safe)]


def save_folder(data: ImageData, out_dir: str | os.PathLike) -> Path:
    """Write `data` (labelled) as ``OUT/<class>/<index>.png``; OUT must be new or empty. Returns OUT."""
    if data.labels is None:
        raise InputError("writing a class folder needs labelled images")
    out = require_empty_folder(out_dir)
    names = class_folder_names(list(data.classes))
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(data) - 1, 1)))
    for i, (img, y) in enumerate(zip(data.images, data.labels, strict=True)):
        arr = img[..., 0] if img.shape[-1] == 1 else img
        Image.fromarray(np.ascontiguousarray(arr)).save(out / names[int(y)] / f"{i:0{width}d}.png")
    return out
