"""The ledger against independently computed values (dp-accounting used directly)."""

from __future__ import annotations

import json
import logging

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpimages.errors import BudgetExceeded, InputError
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate_dpsgd, calibrate_gaussian, validate_budget
from dpimages.privacy.ledger import epsilon_pld, epsilon_rdp


def independent_pld_epsilon(events: list[dict], delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    for e in events:
        for _ in range(e["steps"]):  # expand counts one by one: independent of our SelfComposed use
            g = dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            if e["kind"] == "subsampled_gaussian":
                g = dp_accounting.PoissonSampledDpEvent(e["sample_rate"], g)
            acc.compose(g)
    return acc.get_epsilon(delta)


def test_pld_delta_matches_reference_value():
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    acc.compose(dp_accounting.SelfComposedDpEvent(PrivacyEvent.subsampled_gaussian(0.5, 0.2).single_dp_event(), 3))
    assert acc.get_delta(1.0) == pytest.approx(0.1559, abs=2e-4)


def test_rdp_matches_opacus_reference():
    # Opacus' RDP accountant: sigma 1.5, q 0.04, 2,250 steps, delta 1e-5 -> about 7.33
    assert epsilon_rdp([PrivacyEvent.subsampled_gaussian(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.33, abs=0.02)


def test_rdp_cross_check_keeps_the_terminal_readable(caplog):
    # q = 1/3 with a small sigma: dp-accounting logs a warning for each order whose series does not converge
    event = PrivacyEvent.subsampled_gaussian(0.6279, 1 / 3, 8)
    caplog.set_level(logging.WARNING)
    direct = rdp_privacy_accountant.RdpAccountant([1.5, 1.7], dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.SelfComposedDpEvent(event.single_dp_event(), 8))
    direct.get_epsilon(1e-3)
    assert [r for r in caplog.records if r.name == "absl"]  # the case does warn
    caplog.clear()
    assert epsilon_rdp([event], 1e-3) > 0
    assert not [r for r in caplog.records if r.name == "absl"]
    assert logging.getLogger("absl").level == logging.NOTSET  # restored


def test_count_expansion_equals_repeated_composition():
    one = [PrivacyEvent.subsampled_gaussian(1.1, 0.1, 1)] * 20
    many = [PrivacyEvent.subsampled_gaussian(1.1, 0.1, 20)]
    assert epsilon_pld(one, 1e-5) == pytest.approx(epsilon_pld(many, 1e-5), rel=1e-9)
    assert epsilon_rdp(one, 1e-5) == pytest.approx(epsilon_rdp(many, 1e-5), rel=1e-9)
    acc = rdp_privacy_accountant.RdpAccountant()
    for _ in range(20):
        acc.compose(one[0].single_dp_event())
    assert epsilon_rdp(many, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)
    g = [PrivacyEvent.gaussian(5.0, 7)]
    assert epsilon_rdp(g, 1e-5) > epsilon_rdp([PrivacyEvent.gaussian(5.0, 1)], 1e-5)


def test_epsilon_monotone_in_steps_and_inverse_sigma():
    eps_steps = [epsilon_pld([PrivacyEvent.subsampled_gaussian(1.0, 0.05, t)], 1e-5) for t in (10, 100, 1000)]
    assert eps_steps == sorted(eps_steps) and eps_steps[0] < eps_steps[-1]
    eps_sigma = [epsilon_pld([PrivacyEvent.subsampled_gaussian(s, 0.05, 100)], 1e-5) for s in (2.0, 1.0, 0.7)]
    assert eps_sigma == sorted(eps_sigma) and eps_sigma[0] < eps_sigma[-1]


def test_ledger_json_recomputes_independently(tmp_path):
    ledger = PrivacyLedger(10.0, 1e-5, path=tmp_path / "privacy.json", dataset_size=1000)
    for _ in range(8):
        ledger.spend(PrivacyEvent.subsampled_gaussian(1.2, 0.05, 1, "dp-sgd"))
    ledger.spend(PrivacyEvent.gaussian(20.0, 1, "class counts"))
    ledger.write()
    d = json.loads((tmp_path / "privacy.json").read_text())
    for key in ("epsilon_budget", "delta", "epsilon", "epsilon_rdp", "neighbouring", "noise_source", "events"):
        assert key in d
    assert d["neighbouring"] == "add-remove" and "N is treated as public" in d["assumptions"]["text"]
    assert d["noise_source"] == "os-csprng" and d["private"] is True
    assert not any("fingerprint" in k for k in d)
    seeded = PrivacyLedger(10.0, 1e-5, noise_source="seeded-insecure").to_json()
    assert seeded["noise_source"] == "seeded-insecure" and seeded["private"] is False
    assert PrivacyLedger.from_json(seeded).noise_source == "seeded-insecure"
    with pytest.raises(InputError, match="noise_source"):
        PrivacyLedger(10.0, 1e-5, noise_source="numpy")
    assert [e["steps"] for e in d["events"]] == [8, 1]
    assert d["events"][0]["sample_rate"] == 0.05 and "sample_rate" not in d["events"][1]
    assert d["epsilon"] == pytest.approx(independent_pld_epsilon(d["events"], d["delta"]), rel=1e-6)
    assert d["epsilon_rdp"] >= d["epsilon"] * 0.95  # RDP is the looser cross-check


def test_spend_is_written_before_return_and_pessimistic(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(10.0, 1e-5, path=path)
    ledger.spend(PrivacyEvent.subsampled_gaussian(0.9, 0.02, 1))
    d = json.loads(path.read_text())
    assert d["events"][0]["steps"] == 1
    assert d["epsilon"] >= epsilon_pld(ledger.events, 1e-5)  # fast per-spend value never under-counts


def test_check_refuses_before_recording(tmp_path):
    ledger = PrivacyLedger(1.0, 1e-5, path=tmp_path / "privacy.json")
    ledger.spend(PrivacyEvent.gaussian(10.0))
    with pytest.raises(BudgetExceeded):
        ledger.spend(PrivacyEvent.gaussian(0.5))
    assert len(ledger.events) == 1
    assert len(json.loads((tmp_path / "privacy.json").read_text())["events"]) == 1
    assert BudgetExceeded.exit_code == 3


def test_reservation_covers_planned_steps_and_refuses_beyond():
    sigma = calibrate_dpsgd(2.0, 1e-5, 0.05, 200)
    ledger = PrivacyLedger(2.0, 1e-5)
    ledger.reserve(PrivacyEvent.subsampled_gaussian(sigma, 0.05, 200))
    for _ in range(200):
        ledger.spend(PrivacyEvent.subsampled_gaussian(sigma, 0.05, 1))
    assert ledger.epsilon() <= 2.0
    with pytest.raises(BudgetExceeded):
        ledger.spend(PrivacyEvent.subsampled_gaussian(sigma, 0.05, 30))
    with pytest.raises(BudgetExceeded):
        PrivacyLedger(1.0, 1e-5).reserve(PrivacyEvent.subsampled_gaussian(sigma, 0.05, 200))


def test_resumed_ledger_counts_spent_steps_towards_reservation(tmp_path):
    sigma = calibrate_dpsgd(3.0, 1e-5, 0.1, 50)
    ledger = PrivacyLedger(3.0, 1e-5, path=tmp_path / "privacy.json")
    ledger.reserve(PrivacyEvent.subsampled_gaussian(sigma, 0.1, 50))
    for _ in range(20):
        ledger.spend(PrivacyEvent.subsampled_gaussian(sigma, 0.1, 1))
    again = PrivacyLedger.load(tmp_path / "privacy.json")
    again.reserve(PrivacyEvent.subsampled_gaussian(sigma, 0.1, 50))  # full plan again: accepted
    for _ in range(30):
        again.spend(PrivacyEvent.subsampled_gaussian(sigma, 0.1, 1))
    assert again.events == [PrivacyEvent.subsampled_gaussian(sigma, 0.1, 50)]


@pytest.mark.parametrize(("target", "count"), [(1.0, 1), (10.0, 1), (4.0, 20)])
def test_calibrated_gaussian_meets_target_tightly(target, count):
    sigma = calibrate_gaussian(target, 1e-5, count)
    assert epsilon_pld([PrivacyEvent.gaussian(sigma, count)], 1e-5) <= target
    assert epsilon_pld([PrivacyEvent.gaussian(sigma * 0.99, count)], 1e-5) > target


def test_calibrated_dpsgd_within_tolerance():
    sigma = calibrate_dpsgd(10.0, 1e-5, 1024 / 55000, 1000)
    eps = epsilon_pld([PrivacyEvent.subsampled_gaussian(sigma, 1024 / 55000, 1000)], 1e-5)
    assert 9.9 <= eps <= 10.0


@pytest.mark.parametrize(
    ("eps", "delta", "n"),
    [
        (0.0, 1e-5, None),
        (-1.0, 1e-5, None),
        (float("inf"), 1e-5, None),
        (float("nan"), 1e-5, None),
        (1.0, 0.0, None),
        (1.0, 1.0, None),
        (1.0, 1e-3, 5000),
    ],
)
def test_budget_validation(eps, delta, n):
    with pytest.raises(InputError):
        validate_budget(eps, delta, n)


def test_event_validation():
    with pytest.raises(InputError):
        PrivacyEvent.subsampled_gaussian(1.0, 1.5)
    with pytest.raises(InputError):
        PrivacyEvent.gaussian(-1.0)
    with pytest.raises(InputError):
        PrivacyEvent("laplace", 1.0)


def test_independent_checker_script_agrees(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ledger = PrivacyLedger(5.0, 1e-5, path=tmp_path / "privacy.json")
    ledger.spend(PrivacyEvent.subsampled_gaussian(1.3, 0.02, 100, "dp-sgd"))
    ledger.spend(PrivacyEvent.gaussian(30.0, 2, "counts"))
    ledger.write()
    script = Path(__file__).parents[2] / "benchmarks" / "recompute_epsilon.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0 and "OK" in res.stdout
    d = json.loads((tmp_path / "privacy.json").read_text())
    d["epsilon"] *= 0.9  # an under-reported ledger is caught
    (tmp_path / "privacy.json").write_text(json.dumps(d))
    assert subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True).returncode == 1
