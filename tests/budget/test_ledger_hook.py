"""The ledger's `on_reserve` hook: what the budget book (and a tuning plan) sees, and when."""

from __future__ import annotations

import pytest

from dpimages.errors import BudgetExceeded
from dpimages.privacy import PrivacyEvent, PrivacyLedger


def test_the_hook_sees_the_whole_plan_at_each_reservation_and_each_spend_beyond_it():
    """Guards the two hook calls in `PrivacyLedger.reserve` and `PrivacyLedger.spend`."""
    seen: list[list[PrivacyEvent]] = []
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.on_reserve = lambda plan: seen.append(list(plan))
    a, b = PrivacyEvent.gaussian(5.0, 3, "a"), PrivacyEvent.gaussian(8.0, 1, "b")
    ledger.reserve(a)
    assert seen == [[a]]
    ledger.spend(PrivacyEvent.gaussian(5.0, 1, "a"))  # inside the reservation: no call
    assert len(seen) == 1
    ledger.reserve(b)  # a later reservation: the plan with what was spent and everything still reserved
    assert seen[-1] == [PrivacyEvent.gaussian(5.0, 1, "a"), PrivacyEvent.gaussian(5.0, 2, "a"), b]
    extra = PrivacyEvent.gaussian(9.0, 1, "c")
    ledger.spend(extra)  # beyond every reservation: the hook first
    assert seen[-1][-1] == extra and len(seen) == 3


def test_a_refusing_hook_leaves_the_ledger_as_it_was():
    """Guards the roll-back in `reserve` and the order in `spend` (hook before the event is recorded)."""
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.reserve(PrivacyEvent.gaussian(5.0, 1, "a"))
    reserved, bound = list(ledger._reserved), ledger._bound

    def refuse(plan: list[PrivacyEvent]) -> None:
        raise BudgetExceeded("the book says no")

    ledger.on_reserve = refuse
    with pytest.raises(BudgetExceeded):
        ledger.reserve(PrivacyEvent.gaussian(4.0, 2, "b"))
    assert ledger._reserved == reserved and ledger._bound == bound
    with pytest.raises(BudgetExceeded):
        ledger.spend(PrivacyEvent.gaussian(4.0, 1, "b"))
    assert ledger.events == []
    ledger.spend(PrivacyEvent.gaussian(5.0, 1, "a"))  # within the reservation: the hook is not asked
    assert ledger.steps() == 1


def test_extra_sections_round_trip_through_privacy_json(tmp_path):
    ledger = PrivacyLedger(2.0, 1e-5, path=tmp_path / "privacy.json")
    ledger.extra["budget_book"] = {"budget": "d", "epsilon_total": 1.5}
    ledger.extra["not_a_section"] = 1
    ledger.write()
    back = PrivacyLedger.load(tmp_path / "privacy.json")
    assert back.extra == {"budget_book": {"budget": "d", "epsilon_total": 1.5}}
    assert back.on_reserve is None  # a loaded ledger is hooked again by whoever loads it
