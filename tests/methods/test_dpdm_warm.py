"""DPDM's warm start: the joint plan, the central-image release's sensitivity, resume and refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from tests.methods.test_dpdm import dpimages, tiny_unet

from dpimages.api import create
from dpimages.data import ImageData
from dpimages.data.toy import toy_shapes
from dpimages.errors import InputError
from dpimages.methods.dpdm import warm
from dpimages.methods.dpdm.config import DPDMConfig
from dpimages.methods.pretrain import PretrainSchedule, augment, train_denoiser
from dpimages.nets.edm import EDMDenoiser
from dpimages.privacy import PrivacyEvent, PrivacyLedger
from dpimages.privacy.ledger import merge_events


def toy(n: int = 200, classes: int = 10) -> ImageData:
    rng = np.random.default_rng(0)
    return ImageData(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, classes, n),
                     [f"c{i}" for i in range(classes)], "toy")


def pld(events: list[PrivacyEvent], delta: float) -> float:
    """epsilon of `events` straight from dp-accounting (independent of dpimages' ledger code)."""
    acc = dp_accounting.pld.PLDAccountant()
    for e in events:
        g = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        one = g if e.kind == "gaussian" else dp_accounting.PoissonSampledDpEvent(e.sample_rate, g)
        acc.compose(one, e.steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mode", ["central", "dp-mepf"])
def test_the_stage_is_calibrated_to_its_share_and_the_whole_plan_to_the_budget(mode):
    cfg = create("dpdm", "smoke", warm_start=mode, warm_share=0.3).config
    stage = warm.plan(cfg, toy(), None, 4.0, 1e-5, len(toy()))
    assert stage.events and stage.epsilon == pytest.approx(1.2)
    assert 1.2 * 0.98 <= pld(stage.events, 1e-5) <= 1.2 * 1.001  # the stage alone meets its share
    if mode == "central":
        (e,) = stage.events
        assert (e.kind, e.sample_rate, e.steps) == ("subsampled_gaussian", 32 / 200, 2)
    from dpimages.privacy import calibrate_dpsgd

    sigma = calibrate_dpsgd(4.0, 1e-5, 0.16, 12, stage.events)
    alone = calibrate_dpsgd(4.0, 1e-5, 0.16, 12)
    dpsgd = PrivacyEvent.subsampled_gaussian(sigma, 0.16, 12)
    assert 4.0 * 0.98 <= pld([*stage.events, dpsgd], 1e-5) <= 4.0 * 1.001  # jointly at the budget
    assert sigma > alone  # the stage's share costs DP-SGD some noise


# the public selection's releases are also held to the contract (DPDM.contract_cases): its full run is slow-only
@pytest.mark.parametrize("mode", ["central", "dp-mepf", pytest.param("public", marks=pytest.mark.slow)])
def test_fit_spends_exactly_the_planned_stage_then_dp_sgd(tiny_npz, tmp_path, mode):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    extra = ["--public", f"npz:{tiny_npz}"] if mode == "public" else []
    res = dpimages("fit", "dpdm", "--data", f"npz:{tiny_npz}", "--epsilon", "6", "--preset", "smoke",
                   "--run-dir", str(run), "--json", "--insecure-seeded-noise", f"warm_start={mode}", *extra,
                   env_cache=cache)
    assert res.returncode == 0, res.stderr
    ledger = PrivacyLedger.load(run / "privacy.json")
    data = ImageData(**{k: v for k, v in np.load(tiny_npz).items() if k != "classes"},
                     classes=list(np.load(tiny_npz)["classes"]), name="tiny")
    cfg = create("dpdm", "smoke", warm_start=mode).config
    stage = warm.plan(cfg, data, data if mode == "public" else None, 6.0, 1e-5, len(data))
    events = merge_events(ledger.events)
    assert [e for e in events if e.label != "dpdm"] == merge_events(stage.events)  # the plan, spent once
    (dp,) = [e for e in events if e.label == "dpdm"]
    assert dp.steps == 6 and events[-1].label == "dpdm"  # the stage comes first
    assert 6.0 * 0.98 <= pld(events, 1e-5) <= 6.0 * 1.001
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    done = [m for m in metrics if m.get("event") == "warm_start_done"]
    assert len(done) == 1 and done[0]["mode"] == mode
    report = (run / "report.md").read_text()
    assert f"Warm start `{mode}`" in report
    assert ("Joint plan" in report) == (mode != "public")


def test_central_rows_never_clipped_and_neighbours_move_one_class_by_at_most_c():
    cfg = DPDMConfig(central_size=14, central_kappa=7.0)
    clip = warm.central_clip(cfg, 1)
    white = torch.ones(1, 1, 28, 28)
    assert warm.central_rows(white, cfg).norm().item() == pytest.approx(clip)  # the largest row norm is C
    x = torch.rand(50, 1, 28, 28) * 2 - 1
    y = torch.arange(50) % 10
    from dpimages.privacy.mechanisms import class_sums, clip_rows

    rows = warm.central_rows(x, cfg)
    assert torch.equal(clip_rows(rows, clip), rows)
    full = class_sums(clip_rows(rows, clip), y, 10)
    for i in (0, 17, 49):
        keep = torch.arange(50) != i
        less = class_sums(clip_rows(rows[keep], clip), y[keep], 10)
        moved = (full - less).norm(dim=1)
        assert (moved > 0).sum() == 1 and moved.max() <= clip + 1e-9  # one class, at most C
    # the downsampled pixels are block means in [0, 1]; the last coordinate counts the image
    assert rows[:, -1].eq(7.0).all() and rows[:, :-1].min() >= 0 and rows[:, :-1].max() <= 1
    ref = ((x[0, 0] + 1) / 2).reshape(14, 2, 14, 2).mean(dim=(1, 3)).flatten().double()
    assert torch.allclose(rows[0, :-1], ref, atol=1e-6)


def test_resume_after_the_stage_does_not_spend_it_again_and_a_crash_inside_it_is_refused(tiny_npz, tmp_path):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    common = ["fit", "dpdm", "--data", f"npz:{tiny_npz}", "--epsilon", "6", "--preset", "smoke", "--run-dir",
              str(run), "--insecure-seeded-noise", "warm_start=central", "steps_per_run=3"]
    assert dpimages(*common, env_cache=cache).returncode == 0
    res = dpimages(*common, "--resume", env_cache=cache)
    assert res.returncode == 0, res.stderr
    steps = {e.label: e.steps for e in merge_events(PrivacyLedger.load(run / "privacy.json").events)}
    assert steps == {warm.CENTRAL_LABEL: 2, "dpdm": 6}
    # a run whose stage was spent but whose checkpoint is gone cannot go on without spending it again
    run2 = tmp_path / "run2"
    common2 = [*common[:9], str(run2), *common[10:]]
    assert dpimages(*common2, env_cache=cache).returncode == 0
    assert_lost_stage_is_refused(common2, run2, cache, "warm-start stage")


def assert_lost_stage_is_refused(command: list[str], run, cache: str, says: str) -> None:  # noqa: ANN001
    """Delete the checkpoint of the finished run `run` (a crash right after its stage), then `--resume`: exit 2,
    `says` on stderr, the ledger untouched."""
    for f in (run / "checkpoints").iterdir():
        if f.is_file() and f.name != "data-check.json":
            f.unlink()
    before = (run / "privacy.json").read_text()
    res = dpimages(*command, "--resume", env_cache=cache)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert (run / "privacy.json").read_text() == before


def test_bad_warm_start_settings_exit_2_and_spend_nothing(tiny_npz, tmp_path):
    cache = str(tmp_path / "cache")
    for i, (args, says) in enumerate(((["warm_start=public"], "--public"), (["warm_share=1"], "warm_share"),
                                      (["warm_start=feta"], "warm_start"), (["warm_start=central",
                                                                            "central_batch=500"], "central_batch"))):
        run = tmp_path / f"r{i}"
        res = dpimages("fit", "dpdm", "--data", f"npz:{tiny_npz}", "--epsilon", "6", "--preset", "smoke",
                       "--run-dir", str(run), *args, env_cache=cache)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert not (run / "privacy.json").exists() or PrivacyLedger.load(run / "privacy.json").events == []


def private_shapes(kept: list[int], names: list[str], per_class: int, seed: int) -> ImageData:
    """Private images that look like some public classes (toy shapes `kept`) under other class names."""
    d = toy_shapes(per_class, 32, seed)
    keep = np.isin(d.labels, kept)
    return ImageData(d.images[keep], np.searchsorted(kept, d.labels[keep]), names, "private shapes")


def test_public_selection_is_one_histogram_at_the_stage_share_and_only_for_foreign_classes():
    cfg = create("dpdm", "smoke", warm_start="public", warm_share=0.25).config
    private, public = private_shapes([1, 2], ["coat", "shirt"], 50, 1), toy_shapes(20, 32, 2)
    stage = warm.plan(cfg, private, public, 4.0, 1e-5, len(private))
    (e,) = stage.events
    assert (e.kind, e.steps, e.noise_multiplier, stage.select_keep) == ("gaussian", 1, stage.select_noise, 2)
    assert 1.0 * 0.98 <= pld([e], 1e-5) <= 1.0 * 1.001  # the histogram alone meets its share
    assert warm.plan(cfg, public, public, 4.0, 1e-5, len(public)).events == []  # same classes: labels, no release
    none = create("dpdm", "smoke", warm_start="public", public_classes=0).config
    assert warm.plan(none, private, public, 4.0, 1e-5, len(private)).events == []
    every = create("dpdm", "smoke", warm_start="public", public_classes=3).config
    assert warm.plan(every, private, public, 4.0, 1e-5, len(private)).events == []  # keeping all three: no release
    unlabelled = ImageData(public.images, None, [], "unlabelled")
    with pytest.raises(InputError, match="needs labelled public images"):
        warm.plan(create("dpdm", "smoke", warm_start="public", public_classes=2).config, private, unlabelled, 4.0,
                  1e-5, len(private))
    with pytest.raises(InputError, match="public_classes 4"):
        warm.plan(create("dpdm", "smoke", warm_start="public", public_classes=4).config, private, public, 4.0, 1e-5,
                  len(private))


def test_selection_histogram_of_neighbours_differs_in_one_bin_by_one():
    from dpimages.nets.feature_extractors import ConvClassifier, random_conv_trunk

    classifier = ConvClassifier(random_conv_trunk(0, 3, (8, 16)), 3).eval()
    data = private_shapes([0, 1, 2], ["a", "b", "c"], 20, 3)
    full = torch.bincount(warm.predicted_classes(classifier, data), minlength=3)
    for i in (0, 31, 59):
        keep = np.arange(len(data)) != i
        less = ImageData(data.images[keep], data.labels[keep], data.classes, "neighbour")
        moved = full - torch.bincount(warm.predicted_classes(classifier, less), minlength=3)
        assert moved.abs().sum() == 1 and moved.max() == 1  # one bin, by one


def test_public_selection_keeps_the_classes_the_private_images_look_like(tmp_path):
    cache = str(tmp_path / "cache")
    private, public = private_shapes([0, 2], ["coat", "shirt"], 100, 1), toy_shapes(100, 32, 2)
    paths = {}
    for name, d in (("private", private), ("public", public)):
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], images=d.images, labels=d.labels, classes=np.array(d.classes))
    run = tmp_path / "run"
    res = dpimages("fit", "dpdm", "--data", f"npz:{paths['private']}", "--public", f"npz:{paths['public']}",
                   "--epsilon", "20", "--delta", "1e-3", "--preset", "smoke", "--run-dir", str(run),
                   "--insecure-seeded-noise", "warm_start=public", "warm_share=0.5", "public_classes=2",
                   env_cache=cache)
    assert res.returncode == 0, res.stderr
    events = merge_events(PrivacyLedger.load(run / "privacy.json").events)
    assert [e.label for e in events] == [warm.SELECT_LABEL, "dpdm"]  # the selection first, once
    assert 20.0 * 0.98 <= pld(events, 1e-3) <= 20.0 * 1.001
    report = (run / "report.md").read_text()
    assert "circle, stripes" in report or "stripes, circle" in report
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (done,) = [m for m in metrics if m.get("event") == "warm_start_done"]
    assert done["images"] == 200  # pretrained on those classes alone


def test_planned_events_need_no_pixels_and_other_methods_refuse_to_be_a_stage():
    data = toy()
    prior = create("dp-mepf", "smoke")
    blank = ImageData(np.zeros_like(data.images), np.zeros_like(data.labels), data.classes, "blank")
    assert prior.planned_events(data, None, 2.0, 1e-5, dataset_size=len(data)) == create(
        "dp-mepf", "smoke").planned_events(blank, None, 2.0, 1e-5, dataset_size=len(data))  # N, shape, classes only
    with pytest.raises(InputError, match="cannot be a stage"):
        create("dpaf", "smoke").planned_events(data, None, 2.0, 1e-5, dataset_size=len(data))


def test_reserving_a_release_again_does_not_count_it_twice():
    ledger = PrivacyLedger(2.0, 1e-5)
    e = PrivacyEvent.gaussian(3.0, 1, "a")
    ledger.reserve(e, PrivacyEvent.subsampled_gaussian(2.0, 0.01, 100, "b"))
    ledger.reserve(e)  # a stage declaring its plan again
    assert sum(r.steps for r in ledger._reserved if r.label == "a") == 1
    with pytest.raises(Exception, match="budget"):
        ledger.reserve(PrivacyEvent.gaussian(3.0, 5, "a"))  # a larger total is checked
    assert sum(r.steps for r in ledger._reserved if r.label == "a") == 1  # and a refused one is not kept


def test_augment_keeps_shape_and_range_and_moves_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 4 * 28 * 28).reshape(4, 1, 28, 28)
    out = augment(x, g)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)
    assert math.isclose(float(augment(x, g, flip=False, shift=0).sub(x).abs().max()), 0.0)


def test_pretraining_on_fewer_images_than_a_batch_reports_the_batch_it_used():
    """Central images are few (10 per class): each step takes all of them, and the report says so."""
    model, ema = (EDMDenoiser(tiny_unet(), 0.5) for _ in range(2))
    images, labels = torch.rand(7, 1, 28, 28) * 2 - 1, torch.arange(7)
    facts = train_denoiser(model, ema, images, labels, PretrainSchedule(epochs=3, batch_size=256, lr=1e-3, ema=0.9),
                           torch.Generator().manual_seed(0))
    assert facts["steps"] == 3 and facts["batch"] == 7 and facts["epochs_done"] == 3.0


# two processes under torchrun: the preset's dp-mepf stage in every run of the suite, central in make test-slow
@pytest.mark.parametrize("mode", [pytest.param("central", marks=pytest.mark.slow), "dp-mepf"])
def test_torchrun_warm_start_is_made_once_by_rank_0_and_matches_one_process(tiny_npz, tmp_path, mode):
    """Two processes: rank 0 alone makes the stage's releases; both start DP-SGD from its pretrained weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    cache = str(tmp_path / "cache")
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["fit", "dpdm", "--data", f"npz:{tiny_npz}", "--epsilon", "6", "--preset", "smoke", "--device", "cpu",
              "--insecure-seeded-noise", f"warm_start={mode}"]
    assert dpimages(*common, "--run-dir", str(single), env_cache=cache).returncode == 0
    env = {**os.environ, "DPIMAGES_CACHE": cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dpimages", *common, "--run-dir", str(multi)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledgers = [json.loads((r / "privacy.json").read_text())["events"] for r in (multi, single)]
    assert ledgers[0] == ledgers[1]  # one stage release set, then the DP-SGD steps, as in one process
    states = [json.loads((r / "checkpoints" / "state.json").read_text()) for r in (multi, single)]
    weights = [load_file(str(r / "checkpoints" / s["tensors"])) for r, s in zip((multi, single), states,
                                                                                 strict=True)]
    for k in weights[1]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)
