"""The privacy ledger: every DP release of a run, its budget and its epsilon.

Contract
--------
* Neighbouring relation: add or remove one image together with its label.
* Events are frozen `PrivacyEvent` objects of two kinds: ``gaussian`` (a
  Gaussian mechanism whose noise std is ``noise_multiplier`` times its L2
  sensitivity, repeated ``steps`` times) and ``subsampled_gaussian`` (the
  same on a Poisson sample with rate ``sample_rate``).
* `spend` checks the budget and writes the event to ``privacy.json``
  *before* the caller draws noise: a killed process can over-count, never
  under-count.
* epsilon is computed by dp-accounting's PLD accountant (add/remove
  relation); the RDP accountant gives a cross-check. Counts are expanded in
  one place (`_compose`), through ``SelfComposedDpEvent``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpimages.errors import BudgetExceeded, InputError
from dpimages.privacy import disk_cache
from dpimages.privacy.noise import SUPPORT_SIGMAS

NEIGHBOURING = "add-remove"
NEIGHBOURING_TEXT = "add or remove one image together with its label"
# What every report and privacy.json states about the relation's public quantity (N) and its scope.
ASSUMPTIONS_TEXT = (
    "add or remove one image together with its label; the data set size N is treated as public (the DP-SGD "
    "sampling rate q = B/N and automatic sizes are computed from it)"
)
# What every run publishes besides its releases and treats as public (listed with its values in privacy.json's
# ``assumptions.public`` and in the report): these facts are not protected by the guarantee.
PUBLIC_FACTS_TEXT = {
    "dataset_size": "N, the number of private images (sets the sampling rates and schedules)",
    "classes": "the class names and their number",
    "image_shape": "the images' height, width and channels",
    "data_name": "the data set's name (the file or folder it was read from)",
    "public_data": "the public data set's name, if any",
    "timings": "whole-run and whole-stage wall times (fit_s, train_s, steps_per_s): they depend on N, the "
               "schedule and the machine; no per-step time, which would depend on a private batch size",
}
NOISE_SOURCES = ("os-csprng", "seeded-insecure")
PLD_INTERVAL = 1e-4  # the interval used for reported epsilons (and by independent checkers)
# A coarser interval: dp-accounting's pessimistic PLD then gives an upper bound on epsilon, ten times cheaper
# (calibration searches with it, and a budget check that passes with it needs no finer one)
COARSE_PLD_INTERVAL = 1e-3
# The smallest noise multiplier served: a release moves by at most 1 / nm = 25.6 noise stds, so a neighbour puts
# at most P(Z > SUPPORT_SIGMAS - 25.6 = 12) < 2e-33 of a coordinate's mass where the secure sampler has none
# (`dpimages.privacy.noise`); a smaller one would leave a delta that no ledger holds.
MIN_NOISE_MULTIPLIER = 1.0 / (SUPPORT_SIGMAS - 12.0)
# Sections that other modules add to privacy.json through `PrivacyLedger.extra` (kept by `from_json`).
EXTRA_SECTIONS = ("budget_book", "tuning")
RDP_ORDERS = [1 + x / 20.0 for x in range(1, 100)] + list(range(6, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024]


@dataclass(frozen=True)
class PrivacyEvent:
    """One kind of release, repeated `steps` times."""

    kind: str
    noise_multiplier: float
    sample_rate: float | None = None
    steps: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "subsampled_gaussian"):
            raise InputError(f"event kind must be 'gaussian' or 'subsampled_gaussian', got {self.kind!r}")
        check_positive("noise_multiplier", self.noise_multiplier)
        if self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise InputError(f"noise_multiplier must be >= {MIN_NOISE_MULTIPLIER:.4f} (the secure Gaussian's support "
                             f"ends at {SUPPORT_SIGMAS:.1f} std: less noise would leave an unaccounted delta), got "
                             f"{self.noise_multiplier:.4g}; lower epsilon")
        if self.kind == "subsampled_gaussian":
            q = self.sample_rate
            if q is None or not (0.0 < q <= 1.0):
                raise InputError(f"sample_rate must be in (0, 1], got {q}")
        elif self.sample_rate is not None:
            raise InputError("a 'gaussian' event has no sample_rate")
        if int(self.steps) != self.steps or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps}")

    @classmethod
    def gaussian(cls, noise_multiplier: float, count: int = 1, label: str = "") -> PrivacyEvent:
        return cls("gaussian", float(noise_multiplier), None, int(count), label)

    @classmethod
    def subsampled_gaussian(
        cls, noise_multiplier: float, sample_rate: float, steps: int = 1, label: str = ""
    ) -> PrivacyEvent:
        return cls("subsampled_gaussian", float(noise_multiplier), float(sample_rate), int(steps), label)

    def release_key(self) -> tuple:
        return (self.kind, self.noise_multiplier, self.sample_rate, self.label)

    def same_release(self, other: PrivacyEvent) -> bool:
        """True when `other` is the same mechanism (so their steps add up)."""
        return self.release_key() == other.release_key()

    def single_dp_event(self) -> dp_accounting.DpEvent:
        g = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.kind == "subsampled_gaussian":
            return dp_accounting.PoissonSampledDpEvent(self.sample_rate, g)
        return g

    def to_json(self) -> dict:
        d = asdict(self)
        if d["sample_rate"] is None:
            del d["sample_rate"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> PrivacyEvent:
        return cls(
            d["kind"], float(d["noise_multiplier"]), d.get("sample_rate"), int(d.get("steps", 1)), d.get("label", "")
        )


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value}")


def validate_budget(epsilon: float, delta: float, dataset_size: int | None = None) -> None:
    """Refuse a budget before any data is touched: epsilon > 0 finite, 0 < delta < 1/N."""
    check_positive("epsilon", epsilon)
    check_positive("delta", delta)
    if delta >= 1.0:
        raise InputError(f"delta must be < 1, got {delta}")
    if dataset_size is not None and delta >= 1.0 / dataset_size:
        raise InputError(f"delta must be < 1/N = {1.0 / dataset_size:.3g} for N = {dataset_size} images, got {delta}")


def merge_events(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Adjacent identical releases merged into one event with summed steps."""
    out: list[PrivacyEvent] = []
    for e in events:
        if out and out[-1].same_release(e):
            out[-1] = replace(out[-1], steps=out[-1].steps + e.steps)
        else:
            out.append(e)
    return out


def _compose(accountant: dp_accounting.PrivacyAccountant, events: Sequence[PrivacyEvent]) -> None:
    for e in merge_events(events):
        accountant.compose(dp_accounting.SelfComposedDpEvent(e.single_dp_event(), e.steps))


@lru_cache(maxsize=4096)
def _pld_epsilon(events: tuple[PrivacyEvent, ...], delta: float, interval: float) -> float:
    """PLD epsilon of `events`, cached in memory and (a pure function of public inputs) on disk."""
    if not events:
        return 0.0
    key = json.dumps([[e.to_json() for e in events], delta, interval])
    cached = disk_cache.load("epsilon").get(key)
    if cached is not None:
        return float(cached)
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    _compose(acc, events)
    eps = float(acc.get_epsilon(delta))
    disk_cache.store("epsilon", key, eps)
    return eps


@lru_cache(maxsize=4096)
def _rdp_epsilon(events: tuple[PrivacyEvent, ...], delta: float) -> float:
    if not events:
        return 0.0
    # dp-accounting logs a warning for every order whose series does not converge (large sampling rates)
    # and leaves that order out, which only loosens the cross-check; keep the user's terminal readable.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        acc = rdp_privacy_accountant.RdpAccountant(RDP_ORDERS, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        _compose(acc, events)
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def epsilon_pld(events: Iterable[PrivacyEvent], delta: float, interval: float = PLD_INTERVAL) -> float:
    return _pld_epsilon(tuple(merge_events(events)), float(delta), float(interval))


def epsilon_rdp(events: Iterable[PrivacyEvent], delta: float) -> float:
    return _rdp_epsilon(tuple(merge_events(events)), float(delta))


class PrivacyLedger:
    """Budget, events and epsilon of one run; optionally written to `path`.

    Use `reserve` once with the whole planned schedule (it checks the budget
    with the exact accountant); spends inside a reservation are then cheap.
    A spend beyond every reservation is checked on its own.

    `on_reserve` (optional): called with the run's whole plan (the recorded
    events plus every unspent reservation) whenever the plan grows, at each
    `reserve` and at a spend beyond the reservations, after this ledger's own
    check and before anything is recorded or released. If it raises (e.g. the
    owner's budget book refuses with `BudgetExceeded`), the reservation or
    spend is refused and the ledger is left as it was. `extra`: sections
    (`EXTRA_SECTIONS`) that other modules add to privacy.json.
    """

    def __init__(
        self,
        epsilon: float,
        delta: float,
        *,
        path: str | os.PathLike | None = None,
        dataset_size: int | None = None,
        noise_source: str = "os-csprng",
    ) -> None:
        validate_budget(epsilon, delta, dataset_size)
        if noise_source not in NOISE_SOURCES:
            raise InputError(f"noise_source must be one of {', '.join(NOISE_SOURCES)}, got {noise_source!r}")
        self.epsilon_budget = float(epsilon)
        self.delta = float(delta)
        self.path = Path(path) if path is not None else None
        self.noise_source = noise_source
        self.dataset_size = dataset_size
        # the public facts of the run's data (`PUBLIC_FACTS_TEXT` keys); fit_run fills them
        self.public_facts: dict = {} if dataset_size is None else {"dataset_size": dataset_size}
        self.events: list[PrivacyEvent] = []
        self._reserved: list[PrivacyEvent] = []
        # (PLD, RDP) epsilon of an event list that contains every recorded event:
        # reported between exact writes, so a per-step write costs no accounting.
        self._bound: tuple[float, float] = (0.0, 0.0)
        self.on_reserve: Callable[[list[PrivacyEvent]], None] | None = None
        self.extra: dict[str, Any] = {}

    # -- accounting ------------------------------------------------------------
    def epsilon(self, extra: Sequence[PrivacyEvent] = ()) -> float:
        """PLD epsilon at `delta` of the recorded events plus `extra`."""
        return epsilon_pld([*self.events, *extra], self.delta)

    def epsilon_rdp(self, extra: Sequence[PrivacyEvent] = ()) -> float:
        return epsilon_rdp([*self.events, *extra], self.delta)

    def steps(self, label: str | None = None, *, like: PrivacyEvent | None = None) -> int:
        """Steps recorded: all of them, those labelled `label`, or those of the same release as `like`.

        The one place that counts a release's steps (a public counter that only grows): resume logic and
        schedules use it to run only what the ledger still lacks.
        """
        if like is not None:
            return sum(e.steps for e in self.events if e.same_release(like))
        return sum(e.steps for e in self.events if label is None or e.label == label)

    def remaining(self) -> float:
        return max(0.0, self.epsilon_budget - self.epsilon())

    def check(self, *events: PrivacyEvent) -> float:
        """Raise BudgetExceeded if recording `events` would exceed the budget; else return an upper bound on that
        epsilon (the coarse pessimistic PLD when it already fits, else the exact one)."""
        coarse = epsilon_pld([*self.events, *events], self.delta, COARSE_PLD_INTERVAL)
        if coarse <= self.epsilon_budget * (1 + 1e-9):
            return coarse
        eps = self.epsilon(events)
        if eps > self.epsilon_budget * (1 + 1e-9):
            what = ", ".join(f"{e.label or e.kind} x{e.steps}" for e in events)
            raise BudgetExceeded(
                f"privacy budget exceeded: releasing {what} would bring epsilon to {eps:.4g} "
                f"> budget {self.epsilon_budget:.4g} (delta {self.delta:g}); nothing was released"
            )
        return eps

    def reserve(self, *events: PrivacyEvent) -> None:
        """Check a whole planned schedule at once (before any private access).

        A reservation declares the planned total of each release (kind,
        noise, rate, label): reserving a release again keeps the larger of
        the two totals instead of adding them, so a resumed run, or a stage
        of a joint plan that its caller has already reserved, declares its
        plan again without counting it twice. Steps already spent of a
        release count towards its reservation. Reservations only move the
        budget check earlier: every spend beyond them is checked on its own.
        """
        before, bound = list(self._reserved), self._bound
        totals: dict[tuple, PrivacyEvent] = {}
        for e in events:
            k = e.release_key()
            totals[k] = replace(e, steps=totals[k].steps + e.steps) if k in totals else e
        for k, e in totals.items():
            i = next((j for j, r in enumerate(self._reserved) if r.release_key() == k), None)
            if i is None:
                self._reserved.append(e)
            elif e.steps > self._reserved[i].steps:
                self._reserved[i] = e
        try:
            planned = self._unspent_reservations()
            self._bound = (self.check(*planned), self.epsilon_rdp(planned))
            if self.on_reserve is not None:
                self.on_reserve([*self.events, *planned])
        except Exception:
            self._reserved, self._bound = before, bound
            raise

    def _unspent_reservations(self) -> list[PrivacyEvent]:
        spent: dict[tuple, int] = {}
        for e in self.events:
            spent[e.release_key()] = spent.get(e.release_key(), 0) + e.steps
        left: list[PrivacyEvent] = []
        for r in self._reserved:
            taken = min(spent.get(r.release_key(), 0), r.steps)
            spent[r.release_key()] = spent.get(r.release_key(), 0) - taken
            if r.steps > taken:
                left.append(replace(r, steps=r.steps - taken))
        return left

    def _within_reservation(self, event: PrivacyEvent) -> bool:
        reserved = sum(r.steps for r in self._reserved if r.same_release(event))
        used = sum(e.steps for e in self.events if e.same_release(event))
        return used + event.steps <= reserved

    def spend(self, event: PrivacyEvent) -> None:
        """Check, record and write `event`; call this *before* drawing its noise."""
        if not self._within_reservation(event):
            planned = [*self._unspent_reservations(), event]
            bound = (self.check(*planned), self.epsilon_rdp(planned))
            if self.on_reserve is not None:
                self.on_reserve([*self.events, *planned])
            self._bound = bound
        self.events = merge_events([*self.events, event])
        self.write(exact=False)

    # -- persistence -----------------------------------------------------------
    def to_json(self, exact: bool = True) -> dict:
        """The privacy.json object.

        With ``exact=False`` (every spend) epsilon is an upper bound: the
        epsilon of the planned schedule that contains the recorded events.
        """
        eps, eps_rdp = (self.epsilon(), self.epsilon_rdp()) if exact else self._bound
        return {
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "epsilon": eps,
            "epsilon_rdp": eps_rdp,
            "epsilon_exact": exact,
            "accountant": f"dp-accounting PLD (add/remove, value_discretization_interval={PLD_INTERVAL:g}); "
            "RDP as cross-check",
            "neighbouring": NEIGHBOURING,
            "neighbouring_text": NEIGHBOURING_TEXT,
            "assumptions": {"text": ASSUMPTIONS_TEXT, "public": dict(self.public_facts),
                            "public_meaning": {k: PUBLIC_FACTS_TEXT[k] for k in self.public_facts}},
            "noise_source": self.noise_source,
            "private": self.noise_source == "os-csprng",
            "dataset_size": self.dataset_size,
            "events": [e.to_json() for e in self.events],
            **{k: self.extra[k] for k in EXTRA_SECTIONS if k in self.extra},
        }

    def write(self, exact: bool = True) -> None:
        """Atomically write privacy.json (no-op without a path).

        ``exact=False`` (used on every spend) reports the planned schedule's
        epsilon, which is never below the exact value of the recorded events.
        """
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(exact), indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def from_json(cls, d: dict, path: str | os.PathLike | None = None) -> PrivacyLedger:
        ledger = cls(d["epsilon_budget"], d["delta"], path=path, noise_source=d.get("noise_source", "seeded-insecure"))
        ledger.dataset_size = d.get("dataset_size")
        assumptions = d.get("assumptions")
        ledger.public_facts = dict(assumptions.get("public", {})) if isinstance(assumptions, dict) else (
            {} if ledger.dataset_size is None else {"dataset_size": ledger.dataset_size})
        ledger.events = merge_events(PrivacyEvent.from_json(e) for e in d.get("events", []))
        ledger.extra = {k: d[k] for k in EXTRA_SECTIONS if k in d}
        return ledger

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrivacyLedger:
        return cls.from_json(json.loads(Path(path).read_text()), path=path)
