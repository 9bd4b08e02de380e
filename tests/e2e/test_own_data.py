"""A new user's path on their own data: a folder of RGB images -> fit -> PNG folder of synthetic images -> evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import dpimages
import dpimages.data
from dpimages.cli import main
from dpimages.data import load
from dpimages.data.toy import SHAPE_CLASSES, toy_shapes
from dpimages.data.writers import save_folder

CLASSES = SHAPE_CLASSES


def rgb_folder(root: Path, per_class: int, seed: int) -> Path:
    """32x32 RGB PNGs in one sub-folder per class: a red disc, a green square, blue stripes, with noise."""
    return save_folder(toy_shapes(per_class, 32, seed), root)


def test_folder_of_rgb_images_to_shareable_pngs_and_back(tmp_path, capsys):
    torch.set_num_threads(1)
    train = rgb_folder(tmp_path / "train", 60, seed=0)
    test = rgb_folder(tmp_path / "test", 20, seed=1)
    run = tmp_path / "run"

    res = dpimages.fit("dp-mepf", f"folder:{train}", epsilon=10.0, delta=1e-3, run_dir=str(run), preset="smoke",
                       progress=False)
    assert res.ledger.epsilon() <= 10.0 * (1 + 1e-9)

    out = tmp_path / "synthetic"
    assert main(["sample", str(run), "--n", "30", "--out", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == list(CLASSES)
    back = load(f"folder:{out}")
    assert back.images.shape == (30, 32, 32, 3) and back.classes == list(CLASSES)
    assert np.bincount(back.labels).tolist() == [10, 10, 10]
    synth = dpimages.load(str(run))
    direct = synth.sample(30, synth.balanced_labels(30), seed=0)
    order = np.argsort(direct.labels, kind="stable")  # the folder lists each class's images in turn
    assert np.array_equal(back.images, direct.images[order])  # PNG round trip is exact
    assert "epsilon" in synth.report() and "os-csprng" in synth.report()

    scores = dpimages.evaluate(f"folder:{out}", real=f"folder:{train}", test=f"folder:{test}", smoke=True)
    assert 0.0 <= scores["acc_cnn"] <= 1.0 and scores["n_synthetic"] == 30

    capsys.readouterr()
    assert main(["sample", str(run), "--n", "5", "--out", str(out)]) == 2  # not an empty folder: refused
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "share")]) == 0


def test_a_flat_folder_of_mixed_size_jpegs_fits_as_one_class_with_image_size(tmp_path, capsys):
    """The commonest "my data": a flat folder of JPEGs of mixed sizes. Refused with one line that names
    --image-size; with it, the images are resized and centre-cropped, read as one class with a note, and fitted."""
    from PIL import Image

    torch.set_num_threads(1)
    flat = tmp_path / "photos"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = (40, 56) if i % 2 else (48, 36)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(flat / f"img{i:03d}.jpg")
    common = ["fit", "dp-mepf", "--data", f"folder:{flat}", "--epsilon", "10", "--delta", "1e-3", "--preset",
              "smoke", "--threads", "1"]
    assert main([*common, "--run-dir", str(tmp_path / "r0")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-size" in err[0] and not (tmp_path / "r0").exists()
    data = load(f"folder:{flat}", image_size=32)
    assert data.images.shape == (40, 32, 32, 3) and data.classes == ["photos"] and "one_class" in data.notes
    assert main([*common, "--image-size", "32", "--run-dir", str(tmp_path / "r1"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "note: folder:photos: no class sub-folders: read as one class" in captured.err
    out = tmp_path / "synthetic"
    assert main(["sample", str(tmp_path / "r1"), "--n", "6", "--out", str(out)]) == 0
    assert load(f"folder:{out}").images.shape == (6, 32, 32, 3)
    assert main([*common, "--threads", "0", "--image-size", "32", "--run-dir", str(tmp_path / "r2")]) == 2


def test_the_readme_example_holds_out_by_content_and_evaluates_against_it(tmp_path):
    """README's three lines on the user's own data: `split` puts each image by its content (inserting one image first
    moves no other between the parts), `fit` on the training part, `evaluate` against the held-out part."""
    torch.set_num_threads(1)
    data = toy_shapes(60, 32, 0)
    train, held_out = dpimages.split(data, held_out=0.1)
    assert len(train) + len(held_out) == len(data) and 5 <= len(held_out) <= 40
    extra = toy_shapes(1, 32, 7)
    bigger = dpimages.data.ImageData(np.concatenate([extra.images[:1], data.images]),
                                     np.concatenate([extra.labels[:1], data.labels]), data.classes, data.name)
    train2, held2 = dpimages.split(bigger, held_out=0.1)
    as_set = lambda d: {im.tobytes() for im in d.images}  # noqa: E731
    assert as_set(held2) - as_set(held_out) <= as_set(extra) and as_set(train2) - as_set(train) <= as_set(extra)
    res = dpimages.fit("dp-mepf", train, epsilon=1.0, run_dir=str(tmp_path / "run"), preset="smoke", progress=False)
    scores = dpimages.evaluate(res.synthesizer.sample(300), real=train, test=held_out, smoke=True)
    assert 0.0 <= scores["acc_cnn"] <= 1.0 and scores["n_synthetic"] == 300
