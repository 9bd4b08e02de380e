"""The methods' shared base classes and helpers (dpimages.methods.base)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpimages.api import FitContext
from dpimages.config import MethodConfig
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.methods.base import TrainedSynthesizer, load_frozen
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.runs import prefixed


def _synth() -> TrainedSynthesizer:
    s = TrainedSynthesizer(MethodConfig())
    s.num_classes = 3
    return s


def test_checked_labels_balanced_and_refusals():
    s = _synth()
    assert s.checked_labels(5, None).tolist() == [0, 1, 2, 0, 1]
    assert s.checked_labels(2, np.array([2, 0], np.int32)).dtype == np.int64
    for n, labels, needle in [(0, None, "positive integer"), (2.5, None, "positive integer"),
                              (2, np.array([0]), "shape"), (2, np.array([0.0, 1.0]), "integer array"),
                              (2, np.array([0, 3]), r"in \[0, 3\)")]:
        with pytest.raises(InputError, match=needle):
            s.checked_labels(n, labels)


def test_begin_fit_takes_public_facts_and_resume_state():
    images = np.zeros((4, 8, 8, 1), np.uint8)
    data = ImageData(images, np.array([0, 1, 0, 1]), ["a", "b"], "toy")
    ctx = FitContext(PrivacyLedger(1.0, 1e-5), NoiseSource(0), device=torch.device("cpu"))
    s = _synth()
    assert s.begin_fit(data, ctx) == ({}, {})
    assert (s.num_classes, s.image_shape, s.classes) == (2, (8, 8, 1), ["a", "b"])
    s.train_info = {"steps": 3}
    ctx.resume_state = ({"w": torch.ones(1)}, {"step": 2})
    assert s.begin_fit(data, ctx)[1] == {"step": 2}
    again = _synth()
    again.restore_meta(s.meta())
    assert again.train_info == {"steps": 3} and again.classes == ["a", "b"]


def test_load_frozen():
    net = torch.nn.Linear(2, 2)
    loaded = load_frozen(lambda: torch.nn.Linear(2, 2), "ema", prefixed("ema", net.state_dict()), "toy",
                         torch.device("cpu"))
    assert torch.equal(loaded.weight, net.weight) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(InputError, match="toy checkpoint has no 'ema.\\*' weights"):
        load_frozen(lambda: torch.nn.Linear(2, 2), "ema", prefixed("gen", net.state_dict()), "toy", torch.device("cpu"))


def test_to_moves_the_named_sampling_networks_that_exist():
    class Moved(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moved_to: list[torch.device] = []

        def to(self, device):  # noqa: ANN001, ANN202 - records the call
            self.moved_to.append(device)
            return self

    class Two(TrainedSynthesizer):
        device_modules = ("ema_model", "student")

    s = Two(MethodConfig())
    s.ema_model, s.student = Moved(), None  # a network not built yet is skipped
    assert s.to("cpu") is s and s.device == torch.device("cpu")
    assert s.ema_model.moved_to == [torch.device("cpu")]
