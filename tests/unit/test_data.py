"""Data loaders: real data, every bad input named in one InputError."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from dpimages.data import load
from dpimages.data.loaders import DEBIAN_FASHION_MNIST, read_idx
from dpimages.errors import InputError

HAVE_FMNIST = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists()


def write_idx(path, array: np.ndarray, magic: int | None = None, truncate: int = 0):
    header = struct.pack(">I", magic if magic is not None else (0x0800 | array.ndim)) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.write_bytes(raw[: len(raw) - truncate] if truncate else raw)


def fake_fmnist(tmp_path, n=20, labels_n=None, magic=None, truncate=0):
    d = tmp_path / "fm"
    d.mkdir()
    images = np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8)
    write_idx(d / "t10k-images-idx3-ubyte.gz", images, magic, truncate)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(labels_n or n) % 10)
    return d


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_split_is_seeded_and_disjoint():
    train, val, test = load("fashion-mnist"), load("fashion-mnist:val"), load("fashion-mnist:test")
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.num_classes == 10
    assert load("fashion-mnist").fingerprint == train.fingerprint
    full = load("fashion-mnist:full")
    rows = {r.tobytes() for r in full.images.reshape(len(full), -1)}
    assert len(rows) > 59000
    assert np.bincount(train.labels, minlength=10).min() > 5000


def test_idx_loader_and_explicit_dir(tmp_path):
    d = fake_fmnist(tmp_path)
    data = load(f"fashion-mnist:test@{d}")
    assert len(data) == 20 and data.labels.tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"truncate": 50}, "gzip"), ({"magic": 0x0801}, "magic"), ({"labels_n": 19}, "20 images but 19 labels")],
)
def test_idx_bad_inputs(tmp_path, kwargs, needle):
    d = fake_fmnist(tmp_path, **kwargs)
    with pytest.raises(InputError, match=needle):
        load(f"fashion-mnist:test@{d}")


def test_idx_payload_size_checked(tmp_path):
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 5, 28, 28) + b"\0" * 100))
    with pytest.raises(InputError, match="payload"):
        read_idx(p, 0x803)


def test_missing_files(tmp_path):
    for spec in (
        f"npz:{tmp_path}/none.npz",
        f"folder:{tmp_path}/none",
        f"cifar10:{tmp_path}",
        f"fashion-mnist:test@{tmp_path}",
    ):
        with pytest.raises(InputError, match="not found"):
            load(spec)
    with pytest.raises(InputError, match="unknown data spec"):
        load("imagenet")


def test_npz_valid_and_grayscale_promoted(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, images=np.zeros((30, 16, 16), np.uint8), labels=np.arange(30) % 3)
    d = load(f"npz:{p}")
    assert d.images.shape == (30, 16, 16, 1) and d.num_classes == 3
    assert d.notes.get("classes_from_labels")  # a fit refuses this as private data (see below)


def test_npz_without_classes_needs_num_classes_for_a_fit(tmp_path, capsys):
    """The class count must not come from the private labels silently: `classes` or --num-classes."""
    from dpimages.cli import main

    p = tmp_path / "a.npz"
    np.savez(p, images=np.zeros((30, 16, 16), np.uint8), labels=np.arange(30) % 3)
    d = load(f"npz:{p}", num_classes=5)
    assert d.num_classes == 5 and not d.notes.get("classes_from_labels")
    with pytest.raises(InputError, match="labels must be in"):
        load(f"npz:{p}", num_classes=2)
    with pytest.raises(InputError, match="npz data only"):
        load("digits", num_classes=10)
    argv = ["fit", "dp-mepf", "--data", f"npz:{p}", "--epsilon", "1", "--delta", "1e-3", "--preset", "smoke",
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--num-classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"pixels": np.zeros((5, 16, 16), np.uint8)}, "no array named 'images'"),
        ({"images": np.zeros((5, 16, 16), np.float32)}, "dtype uint8"),
        ({"images": np.full((5, 16, 16), np.nan)}, "dtype uint8"),
        ({"images": np.zeros((5, 16), np.uint8)}, "shape"),
        ({"images": np.zeros((0, 16, 16), np.uint8)}, "no images"),
        ({"images": np.zeros((5, 1, 1), np.uint8)}, "between 8 and 1024"),
        ({"images": np.zeros((5, 16, 16), np.uint8), "labels": np.zeros(4, np.int64)}, "labels have shape"),
        ({"images": np.zeros((5, 16, 16), np.uint8), "labels": np.zeros(5, np.float32)}, "integers"),
        (
            {"images": np.zeros((2, 16, 16), np.uint8), "labels": np.array([0, 5]), "classes": np.array(["a", "b"])},
            "labels must be in",
        ),
    ],
)
def test_npz_bad_inputs(tmp_path, arrays, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(InputError, match=needle):
        load(f"npz:{p}")


def test_npz_corrupt_file(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError, match="not a readable"):
        load(f"npz:{p}")


def make_folder(tmp_path, bad: bool = False):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_loader(tmp_path):
    d = load(f"folder:{make_folder(tmp_path)}")
    assert d.images.shape == (6, 12, 12, 1) and d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_bad_image_named_and_skippable(tmp_path):
    root = make_folder(tmp_path, bad=True)
    with pytest.raises(InputError, match="broken.png"):
        load(f"folder:{root}")
    d = load(f"folder:{root}", skip_bad=True)
    assert len(d) == 6 and d.notes["skipped_bad_files"] == 2


def test_public_sets():
    m = load("mnist-5k")
    assert len(m) == 5000 and m.image_shape == (28, 28, 1) and np.bincount(m.labels).tolist() == [500] * 10
    d = load("digits")
    assert d.image_shape == (28, 28, 1) and len(d) == 1797 and d.images.max() > 200


def test_cifar10_pickles(tmp_path):
    import pickle

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    d = load(f"cifar10:{tmp_path}")
    assert d.images.shape == (20, 32, 32, 3) and d.num_classes == 10
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(__import__("os").system))  # not data: refused
    with pytest.raises(InputError, match="not a CIFAR-10"):
        load(f"cifar10:{tmp_path}")


def test_save_folder_round_trips_labels_even_when_class_names_do_not_sort(tmp_path):
    """`folder:` reads sub-folders in sorted order: names that would reorder the classes get index prefixes."""
    from dpimages.data import ImageData
    from dpimages.data.writers import class_folder_names, save_folder

    assert class_folder_names(["a", "b"]) == ["a", "b"]
    assert class_folder_names(["pullover", "coat", "a/b"]) == ["0_pullover", "1_coat", "2_a_b"]
    images = np.arange(6 * 8 * 8 * 3, dtype=np.uint8).reshape(6, 8, 8, 3)
    data = ImageData(images, np.array([1, 0, 2, 1, 0, 2]), ["zeta", "alpha", "10"], "x")
    back = load(f"folder:{save_folder(data, tmp_path / 'out')}")
    assert back.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [np.array_equal(b, images[i]) for b, i in zip(back.images, [1, 4, 0, 3, 2, 5], strict=True)] == [True] * 6
    with pytest.raises(InputError, match="not an empty folder"):
        save_folder(data, tmp_path / "out")
