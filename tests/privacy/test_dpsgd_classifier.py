"""The dpsgd-classifier reference row."""

from __future__ import annotations

import numpy as np
import pytest

from dpimages.bench.dpsgd_classifier import PRESETS, schedule, train_dpsgd_classifier
from dpimages.data import ImageData, load
from dpimages.errors import BudgetExceeded, InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger


@pytest.fixture(scope="module")
def digits() -> tuple[ImageData, ImageData]:
    d = load("digits")
    order = np.random.default_rng(0).permutation(len(d))
    return d.subset(order[:1400], "digits:train"), d.subset(order[1400:], "digits:test")


def test_smoke_run_records_one_release_and_meets_epsilon(digits) -> None:
    private, test = digits
    ledger = PrivacyLedger(4.0, 1e-4, dataset_size=len(private))
    noise = NoiseSource(0)
    r = train_dpsgd_classifier(private, test, epsilon=2.0, delta=1e-4, preset="smoke", ledger=ledger, noise=noise,
                               progress=False)
    batch, q, steps = schedule(len(private), 2.0, PRESETS["smoke"])
    assert (r["steps"], r["sample_rate"], r["batch_size"]) == (steps, q, batch)
    assert ledger.events == [PrivacyEvent.subsampled_gaussian(r["sigma"], q, steps, "dpsgd-classifier")]
    assert noise.gaussian_draws == steps
    assert r["epsilon"] <= 2.0 + 1e-9 and r["epsilon"] > 1.5  # calibrated to the target, not the ledger budget
    assert 0.0 <= r["accuracy"] <= 1.0 and r["epsilon_rdp"] >= r["epsilon"] * 0.9
    assert r["neighbouring"] == "add-remove" and r["fit_s"] > 0


def test_bad_input_and_budget_refused_before_private_access(digits) -> None:
    private, test = digits
    noise = NoiseSource(0)
    kw = dict(epsilon=1.0, delta=1e-4, noise=noise, progress=False)
    with pytest.raises(InputError, match="unknown preset"):
        train_dpsgd_classifier(private, test, preset="huge", ledger=PrivacyLedger(1, 1e-4), **kw)
    unlabeled = ImageData(test.images, None, test.classes, "nolabels")
    with pytest.raises(InputError, match="needs labels"):
        train_dpsgd_classifier(private, unlabeled, preset="smoke", ledger=PrivacyLedger(1, 1e-4), **kw)
    with pytest.raises(InputError, match="delta"):
        train_dpsgd_classifier(private, test, preset="smoke", ledger=PrivacyLedger(1, 1e-4),
                               **{**kw, "delta": 0.01})
    small = PrivacyLedger(0.5, 1e-4)
    with pytest.raises(BudgetExceeded):
        train_dpsgd_classifier(private, test, preset="smoke", ledger=small, **kw)
    assert small.events == [] and noise.gaussian_draws == 0
