"""The method contract: `check_method(cls)` holds any `Synthesizer` subclass to what dpimages promises.

Like scikit-learn's ``check_estimator``: one call, no test code per method. ``tests/methods/test_contract.py``
runs it for every registered method; an outside method is checked the same way::

    from dpimages.testing import check_method
    check_method(MyMethod)                  # raises ContractError (an AssertionError) naming the broken check

Everything runs the method's own code through `dpimages.api.fit_run` at its ``smoke`` preset, on a generated
200-image, 10-class set (`dpimages.data.toy.toy_bars`), with what `Synthesizer.smoke_requirements` says it
needs. The checks, in order (each `Check` below):

1. **fit, sample, reload, report, ledger**: a fit works; sampling gives uint8 images of the data's shape,
   balanced classes by default and the requested labels otherwise; a reload from the run directory samples
   identically; the report names every ledger event; privacy.json recomputes with dp-accounting alone.
2. **accounting**: noise is drawn only inside `NoiseSource.release` (no stray draw); the run's ledger holds
   exactly the releases made, in order (each release one step of its event); every Poisson sample's rate is the
   rate a release records.
3. **neighbours**: a worst-case image (a 0/255 checkerboard, the last class) is added first, in the middle and
   last. Each neighbour is fitted under the first set's public facts (N) with the first fit's Poisson samples
   (the added image in every one), secret keys and released values replayed, so both fits stay on the same
   path; every release's value before noise must move by at most its declared sensitivity (for DP-SGD: each
   step's clipped sum moves by at most C). Per-example randomness keyed by position, missing or wrong
   clipping, or a sensitivity larger than the one the noise is calibrated for, all show here.
4. **other data**: a fit on another private set of the same size, with other pixels, labels and class counts,
   whose releases replay the first fit's values, must write the same model, samples, ledger and metrics:
   anything that reached an output without a release (an exact class count, a statistic in the metrics) shows.
5. **resume**: a run killed after its first checkpoint and resumed ends with the first fit's ledger.
6. **bad key**: an unknown config key exits 2 with one line and writes nothing.
7. **one class**: the private set without labels (a flat folder's shape) is fitted as one class and sampled,
   and its neighbour with the worst-case image added first keeps every release's sensitivity.

Checks 2-4 also run on each extra case of `Synthesizer.contract_cases` (stages a preset leaves off), with the
neighbour that adds the image first (the position that moves every later index).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from dpimages.data import ImageData
from dpimages.data.toy import toy_bars, toy_other_bars
from dpimages.errors import InputError
from dpimages.fit_runner import fit_run, load_synthesizer
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger, merge_events
from dpimages.privacy.noise import NoiseSource
from dpimages.registry import method_class
from dpimages.runs import Run
from dpimages.synthesizer import FitResult, Synthesizer

EPSILON, DELTA = 10.0, 1e-3
TIMING = ("_s", "steps_per_s", "time")  # metrics keys that legitimately differ between fits
SENSITIVITY_TOLERANCE = 1e-4  # relative: float32 sums in another order round differently
CHECKS = ("fit", "accounting", "neighbours", "other-data", "resume", "bad-key", "one-class")

__all__ = ["CHECKS", "ContractError", "RecordingNoise", "ReplayingNoise", "check_method", "neighbour",
           "other_private_set", "private_set", "worst_case_image"]


class ContractError(AssertionError):
    """A method broke the contract: the message names the method, the check and what was seen."""


# -- data -----------------------------------------------------------------------------------------------
def private_set() -> ImageData:
    """The contract's private set: 200 28x28 images in 10 balanced classes (`toy_bars`)."""
    return toy_bars(seed=0)


def other_private_set() -> ImageData:
    """Another private set of the same size: other pixels, other labels and other class counts."""
    return toy_other_bars()


def worst_case_image(data: ImageData) -> tuple[np.ndarray, int]:
    """A 0/255 checkerboard (the largest norm and highest frequency in [-1, 1]) and the last class."""
    h, w, c = data.image_shape
    board = ((np.add.outer(np.arange(h), np.arange(w)) % 2) * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], c, axis=2), data.num_classes - 1


def neighbour(data: ImageData, position: int) -> ImageData:
    """`data` with `worst_case_image` added at `position` (0 .. N): the add/remove neighbour."""
    image, label = worst_case_image(data)
    images = np.concatenate([data.images[:position], image[None], data.images[position:]])
    labels = None if data.labels is None else np.concatenate(
        [data.labels[:position], np.array([label], dtype=data.labels.dtype), data.labels[position:]])
    return ImageData(images, labels, list(data.classes), f"{data.name} + 1 at {position}")


# -- noise sources that record and replay ----------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseRecord:
    """One call of `NoiseSource.release`: its event, declared sensitivity, value before noise and output."""

    event: PrivacyEvent
    sensitivity: float
    value: torch.Tensor
    output: torch.Tensor

    @property
    def std(self) -> float:
        return self.event.noise_multiplier * self.sensitivity


class RecordingNoise(NoiseSource):
    """A seeded `NoiseSource` that records every release, Poisson sample and secret key, and stray draws."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.releases: list[ReleaseRecord] = []
        self.samples: list[tuple[int, float, torch.Tensor]] = []
        self.keys: list[int] = []
        self.stray_draws = 0
        self._inside = False

    def release(self, value: torch.Tensor, *, sensitivity: float, event: PrivacyEvent, ledger: PrivacyLedger,
                draw: bool = True) -> torch.Tensor:
        before = value.detach().clone()
        self._inside = True
        try:
            out = super().release(value, sensitivity=sensitivity, event=event, ledger=ledger, draw=draw)
        finally:
            self._inside = False
        self.releases.append(ReleaseRecord(event, float(sensitivity), before, out.detach().clone()))
        return out

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if not self._inside:
            self.stray_draws += 1
        return super().standard_normal(shape)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        mask = super().bernoulli(n, p)
        self.samples.append((int(n), float(p), mask.clone()))
        return mask

    def secret_key(self) -> int:
        key = super().secret_key()
        self.keys.append(key)
        return key


class ReplayingNoise(NoiseSource):
    """Replays a `RecordingNoise` on other private data: the same samples, keys and released values.

    With `added_at`, the data is the recording's plus one image at that position: each Poisson sample gets the
    recorded decisions of the other images and includes the added one (the worst case). Every release returns
    the recorded output (so the fit stays on the recorded path) and keeps this fit's value before noise in
    `values`, for comparison with the recording's.
    """

    def __init__(self, recording: RecordingNoise, added_at: int | None = None, what: str = "") -> None:
        super().__init__(0)
        self.added_at = added_at
        self.what = what
        self.values: list[torch.Tensor] = []
        self._releases: Iterator[ReleaseRecord] = iter(recording.releases)
        self._samples = iter(recording.samples)
        self._keys = iter(recording.keys)

    def _fail(self, message: str) -> ContractError:
        return ContractError(f"{self.what}: {message}")

    def release(self, value: torch.Tensor, *, sensitivity: float, event: PrivacyEvent, ledger: PrivacyLedger,
                draw: bool = True) -> torch.Tensor:
        i = len(self.values)
        rec = next(self._releases, None)
        if rec is None:
            raise self._fail(f"release {i} ({event.label!r}) was not made on the first data set: the number of "
                             "releases depends on the private data")
        if event != rec.event or float(sensitivity) != rec.sensitivity or value.shape != rec.value.shape:
            raise self._fail(f"release {i} differs from the first data set's: {event} (sensitivity {sensitivity}, "
                             f"shape {tuple(value.shape)}) against {rec.event} (sensitivity {rec.sensitivity}, "
                             f"shape {tuple(rec.value.shape)})")
        ledger.spend(event)
        self.values.append(value.detach().clone())
        return rec.output.to(device=value.device, dtype=value.dtype)

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        raise self._fail("noise drawn outside NoiseSource.release")

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        recorded = next(self._samples, None)
        if recorded is None:
            raise self._fail("a Poisson sample the first data set did not draw")
        rn, rp, mask = recorded
        if p != rp:
            raise self._fail(f"a Poisson sample at rate {p} where the first data set's was {rp}")
        if n == rn:
            return mask.clone()
        if self.added_at is not None and n == rn + 1:
            return torch.cat([mask[: self.added_at], torch.ones(1, dtype=torch.bool), mask[self.added_at :]])
        raise self._fail(f"a Poisson sample over {n} examples where the first data set's was over {rn}")

    def secret_key(self) -> int:
        key = next(self._keys, None)
        if key is None:
            raise self._fail("a secret key the first data set did not draw")
        return key

    def check_all_replayed(self) -> None:
        if next(self._releases, None) is not None:
            raise self._fail("fewer releases than on the first data set: the number of releases depends on the "
                             "private data")


# -- the checks ------------------------------------------------------------------------------------------
@dataclass
class _Case:
    """One configuration of a method under check: its fit arguments and its other private set."""

    name: str
    overrides: list[str]
    public: ImageData | None
    other: ImageData


class _Checker:
    def __init__(self, cls: type[Synthesizer], workdir: Path) -> None:
        self.cls = cls
        self.workdir = workdir
        self.requirements = cls.smoke_requirements(workdir / "requirements")
        self._dirs = 0

    def fail(self, check: str, message: str) -> ContractError:
        return ContractError(f"check_method({self.cls.name}) {check}: {message}")

    def run_dir(self, tag: str) -> Path:
        self._dirs += 1
        return self.workdir / f"{self._dirs:03d}-{tag}"

    def fit(self, case: _Case, tag: str, data: ImageData | None = None, **kw: Any) -> FitResult:
        kw.setdefault("noise_source", NoiseSource(0))
        return fit_run(self.cls, data or private_set(), epsilon=EPSILON, delta=DELTA, run_dir=self.run_dir(tag),
                       preset="smoke", public=case.public, overrides=list(case.overrides), seed=0,
                       progress=False, **kw)

    def cases(self) -> list[_Case]:
        base = _Case("smoke", list(self.requirements.get("overrides", [])), self.requirements.get("public"),
                     other_private_set())
        extra = [_Case(c.get("name", f"case-{i}"), list(c.get("overrides", [])), c.get("public", base.public),
                       c.get("other", base.other))
                 for i, c in enumerate(self.cls.contract_cases(self.workdir / "cases"))]
        return [base, *extra]

    # 1 --------------------------------------------------------------------------------------------------
    def check_fit(self, res: FitResult) -> None:
        synth, run = res.synthesizer, res.run.path
        h, w, c = private_set().image_shape
        s = synth.sample(20, seed=0)
        if s.images.dtype != np.uint8 or s.images.shape != (20, h, w, c):
            raise self.fail("fit", f"sample(20) gave {s.images.dtype} {s.images.shape}, not uint8 (20, {h}, {w}, {c})")
        if s.labels is None or np.bincount(s.labels, minlength=10).tolist() != [2] * 10:
            raise self.fail("fit", "sample(20) without labels is not balanced over the 10 classes")
        wanted = np.full(6, 3, np.int64)
        got = synth.sample(6, wanted, seed=1).labels
        if got is None or got.tolist() != wanted.tolist():
            raise self.fail("fit", "sample(6, labels) did not return the requested labels")
        again = load_synthesizer(run, "cpu", method=self.cls).sample(20, seed=0)
        if not (np.array_equal(again.images, s.images) and np.array_equal(again.labels, s.labels)):
            raise self.fail("fit", "a reload from the run directory samples other images")
        report = (run / "report.md").read_text()
        privacy = json.loads((run / "privacy.json").read_text())
        if not privacy["events"] or not 0 < privacy["epsilon"] <= EPSILON * (1 + 1e-9):
            raise self.fail("fit", f"privacy.json records no events or epsilon {privacy['epsilon']} outside "
                                   f"(0, {EPSILON}]")
        for e in privacy["events"]:
            if f"| {e['label']} |" not in report:
                raise self.fail("fit", f"report.md does not name the ledger event {e['label']!r}")
        recomputed = _recompute(privacy)
        if abs(recomputed - privacy["epsilon"]) > 1e-6 * privacy["epsilon"]:
            raise self.fail("fit", f"privacy.json's epsilon {privacy['epsilon']} recomputes to {recomputed}")

    # 2 --------------------------------------------------------------------------------------------------
    def check_accounting(self, res: FitResult, noise: RecordingNoise, case: _Case) -> None:
        what = f"accounting ({case.name})"
        if noise.stray_draws:
            raise self.fail(what, f"{noise.stray_draws} Gaussian draw(s) outside NoiseSource.release: noise "
                                  "without a ledger event")
        if not noise.releases:
            raise self.fail(what, "no release went through NoiseSource.release")
        made = merge_events(r.event for r in noise.releases)
        if made != res.ledger.events:
            raise self.fail(what, f"the ledger holds {_summary(res.ledger.events)} but the run released "
                                  f"{_summary(made)}")
        rates = {round(p, 12) for _, p, _ in noise.samples}
        recorded = {round(r.event.sample_rate, 12) for r in noise.releases if r.event.sample_rate is not None}
        if rates != recorded:
            raise self.fail(what, f"Poisson samples were drawn at rates {sorted(rates)} but releases record "
                                  f"{sorted(recorded)}")

    # 3 --------------------------------------------------------------------------------------------------
    def check_neighbours(self, case: _Case, noise: RecordingNoise, base: ImageData | None = None,
                         positions: tuple[int, ...] | None = None) -> None:
        base = base or private_set()
        for position in positions or (0, len(base) // 2, len(base)):
            what = f"neighbours ({case.name}, one image added at {position})"
            replay = ReplayingNoise(noise, added_at=position, what=f"check_method({self.cls.name}) {what}")
            self.fit(case, f"neighbour-{position}", neighbour(base, position), noise_source=replay,
                     dataset_size=len(base))
            replay.check_all_replayed()
            for i, (rec, moved) in enumerate(zip(noise.releases, replay.values, strict=True)):
                diff = float((moved.double().cpu() - rec.value.double().cpu()).norm())
                bound = rec.sensitivity * (1 + SENSITIVITY_TOLERANCE) + 1e-6
                if not diff <= bound:
                    raise self.fail(what, f"release {i} ({rec.event.label!r}) moved by {diff:.6g}, more than its "
                                          f"declared sensitivity {rec.sensitivity:.6g}")

    # 4 --------------------------------------------------------------------------------------------------
    def check_other_data(self, case: _Case, first: FitResult, noise: RecordingNoise) -> None:
        what = f"other data ({case.name})"
        other = case.other
        if len(other) != len(private_set()) or np.array_equal(other.images, private_set().images):
            raise self.fail(what, "the other private set must have the same size and other pixels")
        replay = ReplayingNoise(noise, what=f"check_method({self.cls.name}) {what}")
        second = self.fit(case, "other-data", other, noise_source=replay)
        replay.check_all_replayed()
        sa, sb = first.synthesizer.state_dict(), second.synthesizer.state_dict()
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
            raise self.fail(what, "the model differs although every release was the same: private data reached "
                                  "it outside a release")
        samples = [r.synthesizer.sample(20, seed=0).images for r in (first, second)]
        if not np.array_equal(*samples):
            raise self.fail(what, "the samples differ although every release was the same")
        pa, pb = (json.loads((r.run.path / "privacy.json").read_text()) for r in (first, second))
        for p in (pa, pb):  # the data set's name is a public fact that differs by construction
            p["assumptions"]["public"].pop("data_name", None)
        if pa != pb:
            raise self.fail(what, "privacy.json differs although every release was the same")
        if _public_metrics(first.run.path) != _public_metrics(second.run.path):
            raise self.fail(what, "metrics.jsonl differs although every release was the same: a logged value "
                                  "comes from the private data without noise")

    # 5 --------------------------------------------------------------------------------------------------
    def check_resume(self, case: _Case, straight: FitResult) -> None:
        class Killed(Exception):
            pass

        original = Run.save_checkpoint

        def save_then_die(run: Run, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
            original(run, tensors, state)
            if not state.get("finished"):
                raise Killed

        killed = self.run_dir("killed")
        kw = {"epsilon": EPSILON, "delta": DELTA, "run_dir": killed, "preset": "smoke", "public": case.public,
              "overrides": list(case.overrides), "seed": 0, "progress": False}
        try:
            with mock.patch.object(Run, "save_checkpoint", save_then_die):
                fit_run(self.cls, private_set(), noise_source=NoiseSource(0), **kw)
            was_killed = False  # the first checkpoint was the final one
        except Killed:
            was_killed = True
        if was_killed:
            fit_run(self.cls, private_set(), noise_source=NoiseSource(0), resume=True, **kw)
        ledger = json.loads((killed / "privacy.json").read_text())
        if ledger["events"] != [e.to_json() for e in straight.ledger.events]:
            raise self.fail("resume", f"a killed and resumed run's ledger {ledger['events']} differs from an "
                                      f"uninterrupted run's {[e.to_json() for e in straight.ledger.events]}")

    # 7 --------------------------------------------------------------------------------------------------
    def check_one_class(self, case: _Case) -> None:
        flat = private_set()
        flat = ImageData(flat.images, None, [], "flat toy bars")  # what a flat folder or an npz without labels gives
        noise = RecordingNoise(0)
        if not self.cls.unconditional:  # a method that needs classes must refuse one class with one clear line
            try:
                self.fit(case, "one-class", flat, noise_source=noise)
            except InputError as err:
                if "\n" in str(err) or "class" not in str(err):
                    raise self.fail("one-class", f"one class was refused with an unclear message: {err}") from None
                return
            raise self.fail("one-class", "the method says it is not unconditional but fitted one class")
        res = self.fit(case, "one-class", flat, noise_source=noise)
        if res.synthesizer.num_classes != 1 or not res.notes:
            raise self.fail("one-class", "unlabelled data was not read as one class with a note")
        s = res.synthesizer.sample(8, seed=0)
        if s.images.shape != (8, *flat.image_shape) or s.labels is None or set(s.labels.tolist()) != {0}:
            raise self.fail("one-class", f"sampling one class gave {s.images.shape} with labels {s.labels}")
        self.check_neighbours(replace(case, name=f"{case.name}, one class"), noise, flat, (0,))

    # 6 --------------------------------------------------------------------------------------------------
    def check_bad_key(self) -> None:
        target = self.run_dir("bad-key")
        try:
            fit_run(self.cls, private_set(), epsilon=1.0, delta=1e-4, run_dir=target, preset="smoke",
                    overrides=["no_such_key=1"], progress=False)
        except InputError as err:
            if "unknown config key 'no_such_key'" not in str(err) or "\n" in str(err):
                raise self.fail("bad-key", f"an unknown key gave another message: {err}") from None
        else:
            raise self.fail("bad-key", "an unknown config key was accepted")
        if target.exists():
            raise self.fail("bad-key", "a refused fit left a run directory behind")

    def run(self, checks: tuple[str, ...]) -> None:
        for i, case in enumerate(self.cases()):
            noise = RecordingNoise(0)
            first = self.fit(case, f"first-{case.name}", noise_source=noise)
            if i == 0 and "fit" in checks:
                self.check_fit(first)
            if "accounting" in checks:
                self.check_accounting(first, noise, case)
            if "neighbours" in checks:  # an extra case's stage: the image added first, the position that bites
                self.check_neighbours(case, noise, positions=None if i == 0 else (0,))
            if "other-data" in checks:
                self.check_other_data(case, first, noise)
            if i == 0 and "resume" in checks:
                self.check_resume(case, first)
            if i == 0 and "one-class" in checks:
                self.check_one_class(case)
        if "bad-key" in checks:
            self.check_bad_key()


def check_method(method: type[Synthesizer] | str, *, checks: tuple[str, ...] = CHECKS,
                 workdir: str | Path | None = None) -> None:
    """Hold `method` (a `Synthesizer` subclass or a registered name) to the contract; see the module docstring.

    Raises `ContractError` at the first broken check. `checks`: a subset of `CHECKS`. `workdir`: where run
    directories go (a temporary folder by default, removed afterwards).
    """
    cls = method_class(method) if isinstance(method, str) else method
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise InputError(f"unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    with _workdir(workdir) as path, torch_threads(1):
        _Checker(cls, path).run(tuple(checks))


# -- helpers ---------------------------------------------------------------------------------------------
@contextmanager
def _workdir(workdir: str | Path | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="dpimages-check-") as tmp:
        yield Path(tmp)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One torch thread inside the block (bitwise-repeatable float sums), the old setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _public_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith(TIMING)} for m in Run(run).read_metrics()]


def _summary(events: list[PrivacyEvent]) -> str:
    return ", ".join(f"{e.label or e.kind} x{e.steps}" for e in events) or "nothing"


def _recompute(privacy: dict) -> float:
    """privacy.json's epsilon recomputed by benchmarks/recompute_epsilon.py's method (dp-accounting alone)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    for e in privacy["events"]:
        g: Any = dp_accounting.GaussianDpEvent(float(e["noise_multiplier"]))
        if e["kind"] == "subsampled_gaussian":
            g = dp_accounting.PoissonSampledDpEvent(float(e["sample_rate"]), g)
        acc.compose(dp_accounting.SelfComposedDpEvent(g, int(e.get("steps", 1))))
    return float(acc.get_epsilon(float(privacy["delta"])))
