"""evaluate(): input checks, and the sanity the harness must pass (smoke mode)."""

from __future__ import annotations

import numpy as np
import pytest

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.eval import RESULT_KEYS, EvalOptions, evaluate, load_real, validate_synthetic

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def real():  # noqa: ANN201
    return load_real("fashion-mnist")


@pytest.fixture(scope="module")
def results(real, tmp_path_factory):  # noqa: ANN001, ANN201
    """Smoke evaluations of real held-out images and of uniform noise (the evaluation network is cached)."""
    out = tmp_path_factory.mktemp("eval") / "private-eval"  # closest pairs show private images: owner only
    out.mkdir()
    noise = ImageData(np.random.default_rng(0).integers(0, 256, (3000, 28, 28, 1), dtype=np.uint8),
                      np.arange(3000, dtype=np.int64) % 10, CLASSES, "noise")
    opts = EvalOptions(smoke=True)
    return {"real": evaluate(real.test, real, artifacts=out / "real", options=opts),
            "noise": evaluate(noise, real, artifacts=out / "noise", options=opts)}


def test_result_has_the_results_line_keys(results) -> None:  # noqa: ANN001
    r = results["real"]
    assert list(r)[: len(RESULT_KEYS)] == list(RESULT_KEYS)
    assert all(0.0 <= r[k] <= 1.0 for k in ("acc_cnn", "acc_mlp", "acc_logreg", "precision", "recall"))
    assert r["feature_net"].startswith("evalcnn-v") and r["mode"] == "smoke"
    assert r["classifiers"]["cnn"]["n_test"] == 2000 and r["val_set"] == "fashion-mnist:val"
    for key in ("grid_png",):
        assert r[key].endswith(".png")
    assert r["memorization"]["pairs_png"].endswith(".closest_pairs.png")


def test_real_images_score_well_and_noise_badly(results) -> None:  # noqa: ANN001
    r, n = results["real"], results["noise"]
    assert r["acc_cnn"] > 0.7  # smoke: 5,000 images, 2 epochs
    assert n["acc_cnn"] < 0.3
    assert r["fid"] < 1.0
    assert n["fid"] > 50 * r["fid"]
    assert n["kid"] > 50 * max(r["kid"], 1e-4)
    assert r["recall"] > 0.5 and n["recall"] < 0.1
    assert not r["memorization"]["flagged"] and not n["memorization"]["flagged"]


def test_copy_of_private_set_is_flagged(real) -> None:  # noqa: ANN001
    copy = real.train.subset(np.arange(3000))
    r = evaluate(copy, real, options=EvalOptions(smoke=True))
    assert r["memorization"]["flagged"] and r["memorization"]["frac_closer_than_heldout_p1"] == 1.0
    assert r["grid_png"] is None and r["memorization"]["pairs_png"] is None  # no artifacts asked for


def _data(n: int = 200, shape: tuple = (28, 28, 1), labels: object = "balanced") -> ImageData:
    lab = np.arange(n, dtype=np.int64) % 10 if isinstance(labels, str) else labels
    return ImageData(np.zeros((n, *shape), np.uint8), lab, CLASSES if lab is None or lab.max() < 10 else
                     [str(i) for i in range(int(lab.max()) + 1)], "npz:x.npz")


@pytest.mark.parametrize(("data", "match"), [
    (_data(labels=None), "labels missing"),
    (_data(shape=(32, 32, 1)), r"shape \(H, W, C\) = \(32, 32, 1\)"),
    (_data(shape=(28, 28, 3)), r"\(28, 28, 3\)"),
    (_data(labels=np.arange(200, dtype=np.int64) % 11), r"labels must be in \[0, 10\)"),
    (_data(n=95), "class 5 has 9 images; evaluation needs at least 10"),
])
def test_validate_synthetic_refuses_bad_input(data, match) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match=match) as e:
        validate_synthetic(data, (28, 28, 1), 10, "fashion-mnist")
    assert "\n" not in str(e.value)


def test_unknown_classifier_set_is_refused(real) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match="--classifiers"):
        evaluate(real.test, real, options=EvalOptions(classifiers="vgg"))


def test_real_spec_must_be_a_training_split() -> None:
    with pytest.raises(InputError, match="training split"):
        load_real("fashion-mnist:test")
    with pytest.raises(InputError, match="--test SPEC"):
        load_real("digits")
