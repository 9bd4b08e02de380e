"""Private tuning: the whole cost in one ledger, a content-keyed split, refusal before any read, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.budget.test_budget_book import dp_accounting_epsilon, one_error_line

import dpimages.tune as tune_module
from dpimages.budget.book import BudgetBook
from dpimages.cli import main
from dpimages.config import resolve_config
from dpimages.data import ImageData
from dpimages.data.toy import toy_bars
from dpimages.methods.dp_mepf.method import DPMEPF
from dpimages.privacy.ledger import epsilon_pld
from dpimages.tune import SCORE_LABEL, heldout_mask, parse_grid, plan_tuning, split_sizes

ROOT = Path(__file__).resolve().parents[2]


def tune_args(data: Path, run: Path, epsilon: float, *extra: str) -> list[str]:
    return ["tune", "dp-mepf", "--data", f"npz:{data}", "--epsilon", str(epsilon), "--run-dir", str(run), "--json",
            "--preset", "smoke", "steps=4", "eval_every=2", "checkpoint_every=2", "grid_every=1000",
            "--score-samples", "200", *extra]


# -- the ledger of a tuned run -------------------------------------------------------------------------------------
def test_tuned_run_ledger_holds_every_candidate_and_score_and_recomputes(book_path, toy_npz, tmp_path, capsys):
    """Guards `ledger.spend` of each candidate's events and the score's `gaussian_release` into the tuning's
    ledger: without either, privacy.json would hold less than the k fits and k scores checked here, and its
    epsilon would be one candidate's, not the whole tuning's."""
    torch.set_num_threads(1)
    assert main(["budget", "set", "toy", "--epsilon", "10", "--delta", "1e-5"]) == 0
    capsys.readouterr()
    run = tmp_path / "tuned"
    assert main(tune_args(toy_npz, run, 3.0, "lr=1e-3,3e-3", "weight_counts=0.05,0.2", "--budget", "toy")) == 0, \
        capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    privacy = json.loads((run / "privacy.json").read_text())
    tuning = privacy["tuning"]
    assert len(tuning["candidates"]) == 4 and out["chosen"] == tuning["chosen"]
    assert tuning["candidates"][3]["overrides"] == {"lr": "3e-3", "weight_counts": "0.2"}  # the varied keys
    assert tuning["fixed"] == {"steps": "4", "eval_every": "2", "checkpoint_every": "2", "grid_every": "1000"}
    scores = [c["noisy_correct"] for c in tuning["candidates"]]
    assert tuning["chosen"] == int(np.argmax(scores))  # report-noisy-max
    labels = [e["label"] for e in privacy["events"]]
    for i in range(4):  # each candidate's two dp-mepf releases, under its own prefix
        assert sum(lb.startswith(f"c{i}: dp-mepf") for lb in labels) == 2, labels
    score_events = [e for e in privacy["events"] if e["label"] == SCORE_LABEL]
    assert sum(e["steps"] for e in score_events) == 4  # one score release per candidate
    assert all(e["kind"] == "gaussian" and e["noise_multiplier"] == tuning["score_noise_multiplier"]
               for e in score_events)
    # recomputed with dp-accounting alone: the whole tuning meets its epsilon, and the book holds the same
    expected = dp_accounting_epsilon(privacy["events"], 1e-5)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-6) and expected <= 3.0 * (1 + 1e-9)
    assert expected > 0.97 * 3.0  # calibrated to the budget, not far below it
    one = dp_accounting_epsilon([e for e in privacy["events"] if e["label"].startswith("c0: ")], 1e-5)
    assert one == pytest.approx(tuning["epsilon_per_candidate"], rel=2e-3) and one < expected / 1.5
    book = BudgetBook(book_path)
    assert book.summary("toy")["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    [entry] = book.runs("toy")
    assert entry.status == "finished" and privacy["budget_book"]["run_id"] == entry.run_id
    # the chosen candidate is the run directory: sampled, reported, checked independently; the others are gone
    assert not (run / "candidates").exists()
    report = (run / "report.md").read_text()
    assert "## Tuning" in report and "(chosen)" in report and "## Budget book" in report
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recompute_epsilon.py"), str(run)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert main(["sample", str(run), "--n", "10", "--out", str(tmp_path / "s.npz")]) == 0
    assert privacy["assumptions"]["public"]["dataset_size"] == 200


def test_the_plan_meets_the_tuning_epsilon_and_leaves_the_scores_their_share():
    """`plan_tuning`: the fits alone compose to (1 - share) epsilon, everything to epsilon (dp-accounting)."""
    data = toy_bars(n=300)
    configs = [resolve_config(DPMEPF.Config, "smoke", c) for c in parse_grid(["weight_counts=0.05,0.2,0.5"])]
    plan = plan_tuning(DPMEPF, configs, data, None, 4.0, 1e-5, 270, 0.2)
    fits = [e for c in plan.candidate_events for e in c]
    assert epsilon_pld(fits, 1e-5) == pytest.approx(0.8 * 4.0, rel=5e-3)
    assert epsilon_pld(fits, 1e-5) <= 0.8 * 4.0 * (1 + 1e-9)
    total = dp_accounting_epsilon([e.to_json() for e in plan.events], 1e-5)
    assert 0.99 * 4.0 <= total <= 4.0 * (1 + 1e-9)
    assert plan.events[-1].label == SCORE_LABEL and plan.events[-1].steps == 3
    # the candidates' own plans differ (another weight for the counts) and are all in it
    assert len({tuple(e.noise_multiplier for e in c) for c in plan.candidate_events}) == 3


# -- the split ----------------------------------------------------------------------------------------------------
def _with_first(data: ImageData, image: np.ndarray, label: int) -> ImageData:
    assert data.labels is not None
    return ImageData(np.concatenate([image[None], data.images]), np.concatenate([[label], data.labels]),
                     list(data.classes), data.name)


def test_split_is_keyed_by_content_so_an_added_image_moves_no_other(tmp_path):
    """Guards `heldout_mask` (content digests + keyed buckets): adding an image at position 0 changes no other
    image's split. The mutation, a split by position with the same fraction, moves many images."""
    data = toy_bars(n=2000, seed=3)
    key = 123456789
    mask = heldout_mask(data, key, 0.1)
    added = _with_first(data, np.full((28, 28, 1), 255, np.uint8), 9)
    mask2 = heldout_mask(added, key, 0.1)
    assert np.array_equal(mask2[1:], mask)
    assert abs(mask.mean() - 0.1) < 0.03  # the public fraction, about
    assert not np.array_equal(heldout_mask(data, key + 1, 0.1), mask)  # the key (secret) decides the split

    def by_position(d: ImageData, key: int, fraction: float) -> np.ndarray:  # the mutation
        return np.random.default_rng(key).random(len(d)) < fraction

    moved = np.sum(by_position(added, key, 0.1)[1:] != by_position(data, key, 0.1))
    assert moved > 100


def test_split_sizes_are_public_and_the_counts_keyed_per_image():
    assert split_sizes(55000, 0.1) == (49500, 5500)
    assert split_sizes(300, 0.1) == (270, 30)


# -- refusal before anything is read --------------------------------------------------------------------------------
def test_a_tuning_past_the_books_remaining_budget_exits_3_before_any_read(book_path, toy_npz, tmp_path, capsys,
                                                                         monkeypatch):
    """Guards `ledger.reserve(*plan.events)` with the book hooked, before the split: the whole plan (every
    candidate and score) is refused when it does not fit what the book has left."""
    torch.set_num_threads(1)
    from dpimages.privacy import PrivacyEvent, calibrate_gaussian

    assert main(["budget", "set", "toy", "--epsilon", "2.5", "--delta", "1e-5"]) == 0
    book = BudgetBook(book_path)
    book.reserve("toy", "earlier", [PrivacyEvent.gaussian(calibrate_gaussian(2.0, 1e-5), 1, "earlier run")])
    before = book.history("toy")
    reads: list[int] = []
    real = tune_module.heldout_mask
    monkeypatch.setattr(tune_module, "heldout_mask", lambda *a: reads.append(1) or real(*a))
    capsys.readouterr()
    # alone the tuning fits the book (2 < 2.5); composed with the earlier run (eps 2: 2.95 together) it does not
    assert main(tune_args(toy_npz, tmp_path / "t", 2.0, "lr=1e-3,3e-3", "--budget", "toy")) == 3
    line = one_error_line(capsys)
    assert "budget book" in line and "'toy'" in line
    assert reads == [] and not (tmp_path / "t").exists()
    assert book.history("toy") == before
    # a smaller tuning fits what is left, and is then counted in full
    assert main(tune_args(toy_npz, tmp_path / "t2", 0.5, "lr=1e-3,3e-3", "--budget", "toy")) == 0
    assert reads == [1] and len(book.runs("toy")) == 2 and book.summary("toy")["epsilon_total"] <= 2.5


@pytest.mark.parametrize("args, needle", [
    (["tune", "dpdfd", "lr=1e-3,1e-2"], "does not plan its releases"),
    (["tune", "dp-mepf", "lr"], "KEY=v1,v2"),
    (["tune", "dp-mepf", "lr=1e-3,"], "empty value"),
    (["tune", "dp-mepf", "lr=1e-3,1e-3"], "repeated"),
    (["tune", "dp-mepf", "no_such_key=1,2"], "unknown config key"),
    (["tune", "dp-mepf", "lr=abc,1"], "lr must be float"),
    (["tune", "dp-mepf", "lr=1e-3,1e-2", "--heldout", "0.9"], "--heldout"),
    (["tune", "dp-mepf", "lr=1e-3,1e-2", "--score-share", "1"], "--score-share"),
    (["tune", "dp-mepf", "lr=1e-3,1e-2", "--budget", "nope"], "no budget book"),
    (["tune", "dp-mepf", "lr=1e-3,1e-2", "--budget-book", "x.sqlite"], "needs --budget NAME"),
])
def test_bad_tune_input_exits_2_and_writes_nothing(book_path, toy_npz, tmp_path, capsys, args, needle):
    run = tmp_path / "t"
    full = [*args, "--data", f"npz:{toy_npz}", "--epsilon", "2", "--run-dir", str(run), "--preset", "smoke"]
    assert main(full) == 2
    assert needle in one_error_line(capsys)
    assert not run.exists() and not book_path.exists()


def test_tune_into_a_non_empty_folder_exits_2(toy_npz, tmp_path, capsys):
    run = tmp_path / "t"
    run.mkdir()
    (run / "x").write_text("keep")
    assert main(tune_args(toy_npz, run, 2.0, "lr=1e-3,3e-3")) == 2
    assert "not an empty folder" in one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["x"]
