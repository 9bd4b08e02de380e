"""DPDFD's student outputs: its weights file and its accuracy on a public test set.

Post-processing only: the student is a function of the released (noisy)
updates and public randomness. Its accuracy is measured on public test images
(Fashion-MNIST's test split) and never on the private data; the teacher's
accuracy is never measured at all (it would be an unaccounted release).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dpimages.data import ImageData, load
from dpimages.errors import InputError

STUDENT_FILE = "student.safetensors"
PUBLIC_TEST_SPEC = "fashion-mnist:test"


def public_test_set(private: ImageData) -> tuple[ImageData | None, str]:
    """The public test set on which the student is scored, or None and why not.

    Only Fashion-MNIST's training images as private data qualify (their test
    split is public evaluation data, never private); any other data set, or
    Fashion-MNIST's own test split as private data, is skipped.
    """
    name = private.name.split("@", 1)[0]
    if not name.startswith("fashion-mnist") or name == PUBLIC_TEST_SPEC:
        return None, f"private data {private.name!r} is not Fashion-MNIST training data"
    try:
        test = load(PUBLIC_TEST_SPEC)
    except InputError as e:
        return None, f"{PUBLIC_TEST_SPEC} not available ({e})"
    if test.image_shape != private.image_shape or test.num_classes != private.num_classes:
        return None, f"{PUBLIC_TEST_SPEC} has shape {test.image_shape}, the private data {private.image_shape}"
    return test, PUBLIC_TEST_SPEC


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: ImageData, device: torch.device, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` on labelled (public) `data`; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        part = data.subset(np.arange(i, min(i + batch, len(data))))
        pred = model(part.to_tensor(device)).argmax(1)
        correct += int((pred == part.label_tensor(device)).sum())
    model.train(was)
    return correct / max(1, len(data))


def save_student(student: torch.nn.Module, path: str | Path, meta: dict[str, str]) -> Path:
    """The student's weights as safetensors with `meta` (architecture, classes, image shape), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
