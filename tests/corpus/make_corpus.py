"""Regenerate the bad-input corpus in this folder (deterministic; each file a few KB at most).

    .venv/bin/python tests/corpus/make_corpus.py

README.md lists each file and the message fragment `dpimages` must print for it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def idx(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def bars(n: int) -> np.ndarray:
    """n 28x28x1 images with a horizontal bar (compress to a few hundred bytes)."""
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for i in range(n):
        images[i, 4 + (i % 5) * 4 : 8 + (i % 5) * 4, 4:24] = 200
    return images


def main() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    good_labels = gzip.compress(idx(labels), mtime=0)

    d = HERE / "idx-truncated"
    d.mkdir(exist_ok=True)
    raw = gzip.compress(idx(images[:10]), mtime=0)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(good_labels)

    d = HERE / "idx-wrong-magic"
    d.mkdir(exist_ok=True)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images[:4], magic=0x0801), mtime=0))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(good_labels)

    d = HERE / "idx-huge-dims"  # header only: claims 60000 images of 40000x40000
    d.mkdir(exist_ok=True)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 60000, 40000, 40000),
                                                                mtime=0))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(good_labels)

    np.savez_compressed(HERE / "nan-float.npz", images=np.full((4, 28, 28, 1), np.nan, np.float32),
                        labels=np.arange(4) % 2)
    np.savez_compressed(HERE / "nan-labels.npz", images=bars(4), labels=np.array([0.0, np.nan, 1.0, 0.0]))
    np.savez_compressed(HERE / "zero-images.npz", images=np.zeros((0, 28, 28, 1), np.uint8),
                        labels=np.zeros(0, np.int64))
    np.savez_compressed(HERE / "one-class.npz", images=bars(40), labels=np.zeros(40, np.int64),
                        classes=np.array(["0"]))
    np.savez_compressed(HERE / "small-valid.npz", images=bars(40), labels=np.arange(40) % 2,
                        classes=np.array(["0", "1"]))
    np.savez_compressed(HERE / "one-by-one.npz", images=rng.integers(0, 255, (10, 1, 1, 1), dtype=np.uint8),
                        labels=np.arange(10) % 2, classes=np.array(["0", "1"]))
    np.savez_compressed(HERE / "huge-dims.npz", images=np.zeros((2, 2000, 2000, 1), np.uint8), labels=np.arange(2),
                        classes=np.array(["0", "1"]))

    d = HERE / "folder-non-image"
    for c in ("a", "b"):
        (d / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(bars(5)[i + 2 * (c == "b"), ..., 0]).save(d / c / f"{i}.png")
    (d / "a" / "notes.txt").write_text("not an image\n")
    (d / "b" / "fake.png").write_text("text pretending to be a PNG\n")

    d = HERE / "folder-huge-png" / "a"  # a PNG whose header claims 10000x10000 (PIL warns, does not refuse)
    d.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    (d / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in ((b"IHDR", ihdr), (b"IDAT", idat))))

    (HERE / "bad.yaml").write_text("steps: [1, 2\nbatch_size: : 3\n")
    (HERE / "unknown-key.yaml").write_text("foo: 1\n")


if __name__ == "__main__":
    main()
