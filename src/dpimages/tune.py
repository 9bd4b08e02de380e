"""Private hyper-parameter tuning that pays for itself: `dpimages tune METHOD KEY=a,b ...`.

The candidates are the cartesian product of the given ``KEY=v1,v2`` lists over the method's preset. Each is
fitted on a training split and scored on a held-out split of the private data; the chosen one is the
argmax of the noisy scores (report-noisy-max).

Privacy contract (neighbouring relation: add or remove one image with its label)
--------------------------------------------------------------------------------
* **The plan comes first.** Before any private read, the whole cost is planned from public facts (N, image
  shape, class names, the configs): each of the k candidates' fits is calibrated to the largest epsilon
  ``e`` such that the PLD composition of all k fits is at most ``(1 - score_share) x epsilon`` (bisection
  on `epsilon_pld`), and the noise multiplier of the k score releases by `dpimages.privacy.calibrate` over
  the full event list, so that every fit and every score composed meet ``epsilon``. The whole list is
  reserved in the tuning's ledger and, with ``budget``, in the owner's budget book (refused: exit 3,
  nothing read or written). Each candidate's fit reserves its own plan in that ledger again
  (`StageBudget`): a fit that would go beyond the plan is refused before its release.
* **The split is keyed by content, never by position.** An image is held out when a keyed BLAKE2b of its
  content digest (`dpimages.privacy.keyed`), under a key drawn once from the tuning's `NoiseSource`,
  falls in the first ``heldout`` fraction of the buckets. Adding or removing one image moves no other
  image between the splits. The held-out fraction is public; the split's sizes are not published: the
  candidates are fitted under the public N_train = N - round(heldout x N) (the sample rates and
  schedules use it), and scores are shown as noisy counts over the public round(heldout x N).
* **The score.** A small classifier (`dpimages.eval.classifiers`, trained and early-stopped on the
  candidate's synthetic samples only) counts the held-out images it classifies correctly. Adding or
  removing one held-out image moves that count by at most 1; it is released once per candidate through
  `gaussian_release` (sensitivity 1) into the tuning's ledger. The count itself is never written.
* **Selection is post-processing.** The argmax of the noisy counts. Report-noisy-max with Gaussian noise
  is accounted as k Gaussian releases (dp-accounting has no event for Papernot and Steinke's random
  stopping, and dpimages writes no accountant of its own).
* **Sequential, not parallel, composition.** The splits are disjoint, so each image touches either the
  fits or the scores; the ledger still composes everything (an over-count: safe, and computed by
  dp-accounting alone).
* **One ledger.** The chosen run's privacy.json holds every candidate's events (labels ``cI: ...``) and
  every score release, with the tuning's epsilon as its budget: its epsilon is the whole tuning's. The
  other candidates' run directories are removed once the choice is made (their noisy scores stay in
  privacy.json's ``tuning`` section).

A crashed tuning leaves its reservation counted in the book; it is not resumed (tune again into a new
folder).
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpimages.budget.runner import BookBudget, StageBudget, prefixed_events
from dpimages.config import MethodConfig, resolve_config
from dpimages.data import ImageData, load
from dpimages.errors import InputError, require_empty_folder
from dpimages.eval.classifiers import default_specs, train_classifier
from dpimages.fit_runner import fit_run, load_synthesizer
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger, calibrate, validate_budget
from dpimages.privacy.keyed import content_digests, keyed_buckets
from dpimages.privacy.ledger import epsilon_pld
from dpimages.privacy.mechanisms import gaussian_release
from dpimages.registry import method_class, methods
from dpimages.report import render_report
from dpimages.runs import Run
from dpimages.synthesizer import Synthesizer

SPLIT_BUCKETS = 10_000
SCORE_LABEL = "tune: held-out correct count (report-noisy-max)"
MAX_CANDIDATES = 64
SEARCH_RTOL = 1e-3


@dataclass
class TuneOptions:
    """Public choices of a tuning (none of them reads private data)."""

    heldout: float = 0.1  # fraction of the data held out to score the candidates
    score_share: float = 0.1  # the fits alone compose to (1 - score_share) x epsilon; the scores fill the rest
    score_samples: int | None = None  # synthetic images per score classifier (default 5000; smoke 500)
    score_classifier: str = "logreg"  # logreg, mlp or cnn (`dpimages.eval.classifiers.default_specs`)
    seed: int = 0  # initialisation, sampling and the classifiers; never the privacy noise
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        if not (0.0 < self.heldout <= 0.5):
            raise InputError(f"--heldout must be in (0, 0.5], got {self.heldout}")
        if not (0.0 < self.score_share < 1.0):
            raise InputError(f"--score-share must be in (0, 1), got {self.score_share}")
        if self.score_samples is not None and self.score_samples < 20:
            raise InputError(f"--score-samples must be >= 20, got {self.score_samples}")
        if self.score_classifier not in ("logreg", "mlp", "cnn"):
            raise InputError(f"--score-classifier must be logreg, mlp or cnn, got {self.score_classifier!r}")


@dataclass
class TunePlan:
    """The whole tuning's cost, fixed before any private read."""

    epsilon_per_candidate: float
    score_noise_multiplier: float
    candidate_events: list[list[PrivacyEvent]]  # each candidate's planned events, labels prefixed "cI: "
    events: list[PrivacyEvent]  # every candidate's events, then the k score releases


@dataclass
class TuneResult:
    run_dir: Path
    epsilon: float
    ledger: PrivacyLedger
    tuning: dict[str, Any]
    budget_book: dict[str, Any] | None


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """``KEY=v1,v2`` (or ``KEY=v1|v2`` when values are lists) -> the candidates' overrides, their product."""
    keys: list[str] = []
    values: list[list[str]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"a tuning grid item must look like KEY=v1,v2,..., got {item!r}")
        if key in keys:
            raise InputError(f"{key} is given twice in the tuning grid")
        vals = [v.strip() for v in text.split("|" if "|" in text else ",")]
        if not vals or any(v == "" for v in vals):
            raise InputError(f"{key}: empty value in the tuning grid {item!r}")
        if len(set(vals)) != len(vals):
            raise InputError(f"{key}: a value is repeated in the tuning grid {item!r}")
        keys.append(key)
        values.append(vals)
    combos = [dict(zip(keys, c, strict=True)) for c in itertools.product(*values)]
    if len(combos) > MAX_CANDIDATES:
        raise InputError(f"the tuning grid has {len(combos)} candidates; at most {MAX_CANDIDATES}")
    return combos


def heldout_mask(data: ImageData, key: int, fraction: float) -> np.ndarray:
    """(N,) bool: the held-out images, chosen by a keyed hash of each image's content (never its position)."""
    buckets = keyed_buckets(content_digests(data.images, data.labels), key, SPLIT_BUCKETS)
    return buckets < round(fraction * SPLIT_BUCKETS)


def split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """The public (N_train, N_heldout) of N images: N - round(f N), round(f N). The split's real sizes differ."""
    n_held = round(fraction * n)
    return n - n_held, n_held


def plan_tuning(cls: type[Synthesizer], configs: list[MethodConfig], private: ImageData, public: ImageData | None,
                epsilon: float, delta: float, n_train: int, score_share: float) -> TunePlan:
    """Calibrate the whole tuning from public facts (module docstring); reads no pixel or label of `private`."""
    synths = [cls(cfg) for cfg in configs]
    k = len(synths)

    def fits(e: float) -> list[list[PrivacyEvent]]:
        return [prefixed_events(s.planned_events(private, public, e, delta, dataset_size=n_train), f"c{i}")
                for i, s in enumerate(synths)]

    def composed(e: float) -> float:
        return epsilon_pld([ev for c in fits(e) for ev in c], delta)

    target = (1.0 - score_share) * epsilon
    lo = hi = target
    if composed(hi) > target:
        lo = target / k
        while composed(lo) > target:
            lo /= 2.0
        while hi - lo > SEARCH_RTOL * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if composed(mid) <= target else (lo, mid)
    planned = fits(lo)
    flat = [ev for c in planned for ev in c]
    sigma = calibrate(lambda s: [*flat, PrivacyEvent.gaussian(s, k, SCORE_LABEL)], epsilon, delta)
    return TunePlan(lo, sigma, planned, [*flat, PrivacyEvent.gaussian(sigma, k, SCORE_LABEL)])


def held_out_correct(synth: Synthesizer, heldout: ImageData, n_samples: int, classifier: str, smoke: bool,
                     seed: int, device: str | None) -> int:
    """How many held-out images a classifier trained on `synth`'s samples gets right (PRIVATE: release it noisy).

    The classifier is trained and early-stopped on the synthetic samples only (90 / 10, seeded); the held-out
    images are only counted.
    """
    labels = synth.balanced_labels(n_samples)
    samples = synth.sample(n_samples, labels, seed=seed)
    order = np.random.default_rng(seed).permutation(n_samples)
    n_val = max(n_samples // 10, 1)
    val, train = order[:n_val], order[n_val:]
    spec = {s.name: s for s in default_specs(smoke)}[classifier]
    assert heldout.labels is not None and samples.labels is not None
    res = train_classifier(spec, (samples.images[train], samples.labels[train]),
                           (samples.images[val], samples.labels[val]), (heldout.images, heldout.labels),
                           synth.num_classes, seed=seed, device=device or "cpu")
    return int(round(res.test_acc * len(heldout)))


def tune(
    method: str,
    data: str | ImageData,
    grid: list[str],
    *,
    epsilon: float,
    run_dir: str | os.PathLike,
    delta: float = 1e-5,
    preset: str | None = "cpu",
    public: str | ImageData | None = None,
    budget: str | None = None,
    budget_book: str | os.PathLike | None = None,
    num_classes: int | None = None,
    options: TuneOptions | None = None,
) -> TuneResult:
    """Tune `method` over `grid` on `data` at a total (epsilon, delta); the chosen run is written to `run_dir`.

    See the module docstring for the privacy contract. Bad input exits 2 and a refused plan 3, both before
    anything is read or written.
    """
    opts = options or TuneOptions()
    cls = method_class(method)
    if cls.planned_events is Synthesizer.planned_events:
        able = ", ".join(m for m in methods() if method_class(m).planned_events is not Synthesizer.planned_events)
        raise InputError(f"dpimages tune: {method} does not plan its releases from public facts (planned_events), "
                         f"so its cost cannot be calibrated before reading; methods that can: {able or 'none'}")
    opts.check()
    validate_budget(epsilon, delta)
    candidates = parse_grid(grid)
    fixed = {k: v for k, v in candidates[0].items() if all(c[k] == v for c in candidates)}  # single-valued keys
    configs = [resolve_config(cls.Config, preset, dict(c)) for c in candidates]
    out = Path(run_dir)
    require_empty_folder(out, "--run-dir")
    booking = None if budget is None else BookBudget(budget, budget_book, out)
    if budget is None and budget_book is not None:
        raise InputError("--budget-book needs --budget NAME (the data set's name in the book)")
    if cls.needs_public and public is None:
        raise InputError(f"method {method} needs public data: pass --public SPEC (e.g. mnist-5k)")
    private = data if isinstance(data, ImageData) else load(data, num_classes=num_classes)
    if private.labels is None:
        raise InputError(f"{private.name}: private data needs labels (class-conditional synthesis)")
    if private.notes.get("classes_from_labels"):
        raise InputError(f"{private.name}: the number of classes is not given (an npz without a 'classes' array): "
                         "add 'classes' to the file or pass --num-classes K; it is not read from the private labels")
    n = len(private)
    n_train, n_held = split_sizes(n, opts.heldout)
    if n_held < 1 or n_train < 1:
        raise InputError(f"--heldout {opts.heldout} of {n} images leaves an empty split")
    validate_budget(epsilon, delta, n)
    if booking is not None:
        booking.check(n)
    public_data = public if (public is None or isinstance(public, ImageData)) else load(public)
    plan = plan_tuning(cls, configs, private, public_data, epsilon, delta, n_train, opts.score_share)

    # the whole plan is reserved (in the book too) before the first private read; refusal writes nothing
    noise = NoiseSource()
    ledger = PrivacyLedger(epsilon, delta, dataset_size=n, noise_source=noise.kind)
    if booking is not None:
        booking.attach_ledger(ledger, uuid.uuid4().hex, private, {
            "method": f"tune {method}", "run_dir": str(out.resolve()), "epsilon": epsilon, "delta": delta})
    ledger.reserve(*plan.events)

    work = out / "candidates"
    work.mkdir(parents=True, exist_ok=True)
    held = heldout_mask(private, noise.secret_key(), opts.heldout)
    train_split = private.subset(np.flatnonzero(~held), f"{private.name} (tune training split)")
    heldout_split = private.subset(np.flatnonzero(held), f"{private.name} (tune held-out split)")
    smoke = preset == "smoke"
    n_samples = opts.score_samples or (500 if smoke else 5000)
    scores: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}  # the candidates' public facts (the same training split and public N for all)
    for i, overrides in enumerate(candidates):
        res = fit_run(cls, train_split, epsilon=plan.epsilon_per_candidate, delta=delta, run_dir=work / f"c{i}",
                      preset=preset, public=public_data, overrides=dict(overrides), seed=opts.seed,
                      device=opts.device, progress=opts.progress, dataset_size=n_train,
                      budget=StageBudget(ledger, f"c{i}"))
        for ev in prefixed_events(res.ledger.events, f"c{i}"):
            ledger.spend(ev)
        correct = held_out_correct(res.synthesizer, heldout_split, n_samples, opts.score_classifier, smoke, opts.seed,
                                   opts.device)
        noisy = gaussian_release(torch.tensor([float(correct)], dtype=torch.float64), sensitivity=1.0,
                                 noise_multiplier=plan.score_noise_multiplier, ledger=ledger, noise=noise,
                                 label=SCORE_LABEL)
        value = float(noisy[0])  # the exact count is private: only its noisy release is kept
        scores.append({"overrides": {k: v for k, v in overrides.items() if k not in fixed}, "noisy_correct": value,
                       "noisy_accuracy": value / n_held})
        facts = dict(res.ledger.public_facts)
    chosen = int(np.argmax([s["noisy_correct"] for s in scores]))  # post-processing of the noisy releases

    # the chosen candidate becomes the run directory; its ledger is the whole tuning's
    for entry in (work / f"c{chosen}").iterdir():
        os.replace(entry, out / entry.name)
    shutil.rmtree(work)
    run = Run(out)
    ledger.path = run.privacy_path
    ledger.public_facts = {**facts, "dataset_size": n, "data_name": private.name}
    tuning = {
        "method": method, "preset": preset, "fixed": fixed, "candidates": scores, "chosen": chosen,
        "chosen_overrides": scores[chosen]["overrides"], "epsilon": epsilon, "delta": delta,
        "epsilon_per_candidate": plan.epsilon_per_candidate, "score_share": opts.score_share,
        "score_noise_multiplier": plan.score_noise_multiplier, "score_sensitivity": 1.0,
        "score_classifier": opts.score_classifier, "score_samples": n_samples, "heldout_fraction": opts.heldout,
        "heldout_size_public": n_held, "train_size_public": n_train,
        "selection": "report-noisy-max: argmax of the Gaussian-noised held-out correct counts (k Gaussian "
                     "releases, sensitivity 1 each); every fit and score composed with dp-accounting (PLD)",
        "split": "keyed by each image's content under a secret key from the NoiseSource (never by position)",
    }
    ledger.extra["tuning"] = tuning
    book = booking.finish(ledger) if booking is not None else None
    if book is not None:
        ledger.extra["budget_book"] = book
    ledger.write(exact=True)
    run.log(-1, event="tuned", chosen=chosen, candidates=len(scores), epsilon=ledger.epsilon())
    run.write_report(render_report(run, load_synthesizer(out, "cpu").report_section()))
    return TuneResult(out, ledger.epsilon(), ledger, tuning, book)
