"""The real data an evaluation compares against: private training, validation and test splits.

``--real fashion-mnist`` (the benchmark): training = the 55,000-image
private split a generator sees, validation = the 5,000 held-out images
(``fashion-mnist:val``, model selection only), test = the 10,000 test images
(``fashion-mnist:test``, final accuracies only).

``--real cifar10:PATH``: training = the 50,000 training images, test =
``cifar10:PATH:test``. Any other spec needs ``--test SPEC``. For those, the
validation images are ``--val SPEC`` or, if not given, a seeded half (at most
5,000) of the test set, the rest staying the test set: validation is never
carved from the images a generator was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpimages.data import ImageData, load, split_train_val
from dpimages.errors import InputError


@dataclass
class RealData:
    """Training (the generator's private data), validation and test images of one data set."""

    train: ImageData
    val: ImageData
    test: ImageData
    spec: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def _check_compatible(real: RealData) -> RealData:
    for part in (real.train, real.val, real.test):
        if part.labels is None:
            raise InputError(f"{part.name}: real data needs labels for evaluation")
        if part.image_shape != real.train.image_shape:
            raise InputError(f"{part.name}: images have shape {part.image_shape}, "
                             f"but the training images {real.train.name} have {real.train.image_shape}")
        if part.num_classes != real.train.num_classes:
            raise InputError(f"{part.name}: {part.num_classes} classes, but {real.train.name} has "
                             f"{real.train.num_classes}")
    return real


def load_real(spec: str | ImageData, test_spec: str | ImageData | None = None,
              val_spec: str | None = None) -> RealData:
    """Resolve `spec` (the generator's training data) to training, validation and test splits; `spec` and
    `test_spec` may also be `ImageData` (e.g. the two parts of `dpimages.data.held_out_split`)."""
    if isinstance(spec, ImageData):
        if not isinstance(test_spec, ImageData):
            raise InputError("real data given as images needs its test images as images too")
        test, val = split_train_val(test_spec, n_val=min(5000, len(test_spec) // 2))
        return _check_compatible(RealData(spec, val, test, spec.name))
    if not isinstance(spec, str) or not spec:
        raise InputError("--real needs a data spec, e.g. fashion-mnist")
    head = spec.split("@", 1)[0]
    if head.startswith("fashion-mnist"):
        directory = spec.split("@", 1)[1] if "@" in spec else None
        split = head.partition(":")[2] or "train"
        if split != "train":
            raise InputError(f"--real must name the training split (fashion-mnist), got {spec!r}")
        suffix = f"@{directory}" if directory else ""
        # one read of the 60,000 images, split exactly as the loader's `train` and `val` specs split them
        train, val = split_train_val(load(f"fashion-mnist:full{suffix}"))
        train.name, val.name = "fashion-mnist", "fashion-mnist:val"
        if val_spec:
            val = load(val_spec)
        test = load(test_spec) if test_spec else load(f"fashion-mnist:test{suffix}")
        return _check_compatible(RealData(train, val, test, spec))
    if head.startswith("cifar10:") and not test_spec:
        rest = spec.partition(":")[2]
        if rest.endswith(":test"):
            raise InputError(f"--real must name the training split, got {spec!r}")
        test_spec = f"cifar10:{rest}:test"
    if not test_spec:
        raise InputError(f"--real {spec}: give the real test images with --test SPEC")
    train = load(spec)
    test = load(test_spec)
    if val_spec:
        val = load(val_spec)
    else:
        test, val = split_train_val(test, n_val=min(5000, len(test) // 2))
    return _check_compatible(RealData(train, val, test, spec))
