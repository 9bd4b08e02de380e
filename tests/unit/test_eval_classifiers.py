"""Downstream classifiers: real images learn, shuffled labels do not, selection never reads the test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpimages.eval.classifiers import (
    CNN,
    MLP,
    LogReg,
    ResNet,
    TrainSpec,
    WideResNet,
    default_specs,
    train_classifier,
    wrn_specs,
)


@pytest.fixture(scope="module")
def real():  # noqa: ANN201
    from dpimages.eval import load_real

    return load_real("fashion-mnist")


def _pairs(real, n_train: int, n_val: int, n_test: int):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    tr = rng.choice(len(real.train), n_train, replace=False)
    return ((real.train.images[tr], real.train.labels[tr]), (real.val.images[:n_val], real.val.labels[:n_val]),
            (real.test.images[:n_test], real.test.labels[:n_test]))


def test_cnn_on_real_images_reaches_high_accuracy(real) -> None:  # noqa: ANN001
    train, val, test = _pairs(real, 10000, 2000, 2000)
    r = train_classifier(TrainSpec("cnn", CNN, 3, 1e-3), train, val, test, 10, seed=0)
    assert r.test_acc >= 0.8, r  # 0.83 here; 0.91 on all 55,000 images with 10 epochs (the slow test below)
    assert 1 <= r.best_epoch <= r.epochs_run <= 3 and r.n_train == 10000


def test_shuffled_labels_score_near_chance(real) -> None:  # noqa: ANN001
    (x, y), val, test = _pairs(real, 5000, 2000, 2000)
    shuffled = np.random.default_rng(1).permutation(y)
    r = train_classifier(TrainSpec("cnn", CNN, 2, 1e-3), (x, shuffled), val, test, 10, seed=0)
    assert r.test_acc < 0.2, r


def test_model_selection_ignores_test_labels(real) -> None:  # noqa: ANN001
    train, val, (xt, yt) = _pairs(real, 3000, 1000, 1000)
    spec = TrainSpec("logreg", LogReg, 4, 1e-3, patience=None)
    a = train_classifier(spec, train, val, (xt, yt), 10, seed=0)
    b = train_classifier(spec, train, val, (xt, (yt + 1) % 10), 10, seed=0)  # every test label wrong
    assert (a.best_epoch, a.val_acc) == (b.best_epoch, b.val_acc)
    assert b.test_acc < 0.2 < a.test_acc


@pytest.mark.parametrize("net_cls", [CNN, MLP, LogReg, WideResNet, ResNet])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_networks_map_images_to_logits(net_cls, shape) -> None:  # noqa: ANN001
    net = net_cls(shape, 10).eval()
    x = torch.zeros(2, shape[2], shape[0], shape[1])
    assert net(x).shape == (2, 10)


def test_wrn_40_4_size_and_protocols() -> None:
    n_params = sum(p.numel() for p in WideResNet((32, 32, 3), 10).parameters())
    assert 8.5e6 < n_params < 9.2e6  # WRN-40-4 has about 8.9M parameters on CIFAR-10
    assert [s.name for s in default_specs()] == ["cnn", "mlp", "logreg"]
    wrn = wrn_specs()
    assert [s.name for s in wrn] == ["wrn", "resnet"]
    assert all(s.lr == 0.01 and s.epochs == 50 and s.patience is None for s in wrn)


@pytest.mark.slow
def test_full_cnn_about_90_percent(real) -> None:  # noqa: ANN001
    r = train_classifier(default_specs()[0], (real.train.images, real.train.labels),
                         (real.val.images, real.val.labels), (real.test.images, real.test.labels), 10, seed=0)
    assert r.test_acc >= 0.89, r
