"""DPAF: aggregation sensitivity on neighbouring data sets, budget split, ledger events, CLI fit/crash/resume/sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpimages.api import FitContext, create, fit_run, load_synthesizer, method_class
from dpimages.errors import InputError
from dpimages.methods.dpaf import DPAF, release_aggregates
from dpimages.methods.dpaf.nets import Nets
from dpimages.methods.dpaf.release import (
    LABEL_AGG,
    LABEL_COUNTS,
    LABEL_D,
    LABEL_F1,
    Schedule,
    calibrate_plan,
    noise_plan,
)
from dpimages.nets.discriminators import BackHead, FrontFeatures, SplitDiscriminator
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger
from dpimages.privacy.dpsgd import PoissonSampler, validate_model
from dpimages.privacy.keyed import content_digests
from dpimages.privacy.ledger import epsilon_pld


class ZeroNoise(NoiseSource):
    """A noise source whose Gaussian draws are all zero (noise off); it records the ledger's state at each draw."""

    def __init__(self, ledger: PrivacyLedger | None = None) -> None:
        super().__init__(0)
        self.ledger = ledger
        self.events_at_draw: list[int] = []

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        self.gaussian_draws += 1
        if self.ledger is not None:
            self.events_at_draw.append(self.ledger.steps())
        return torch.zeros(tuple(shape), dtype=torch.float64)


class FixedSampler(PoissonSampler):
    """A 'Poisson sample' fixed by the test (the worst case: the differing image is selected)."""

    def __init__(self, n: int, sample_rate: float, index: torch.Tensor) -> None:
        super().__init__(n, sample_rate, NoiseSource(0))
        self.index = index

    def sample(self) -> torch.Tensor:
        return self.index


# -- the aggregation mechanism: one image moves a release by at most C_f ---------------------------------------
def test_release_aggregates_sensitivity_on_neighbouring_data():
    torch.manual_seed(0)
    f1 = FrontFeatures(1, (28, 28), (8, 8), 4)
    clip = 0.5
    x = torch.rand(30, 1, 28, 28) * 2 - 1
    x[3] *= 50.0  # an outlier with a huge feature vector
    rows = torch.arange(30) % 7
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.reserve(PrivacyEvent.subsampled_gaussian(1.0, 0.1, 31, LABEL_AGG))  # the plan: cheap spends
    noise = ZeroNoise(ledger)
    with torch.no_grad():
        feats = f1(x)
    assert (feats.norm(dim=1) > clip).all()  # clipping is exercised
    full = release_aggregates(feats, rows, 7, clip_norm=clip, noise_multiplier=1.0, sample_rate=0.1,
                              ledger=ledger, noise=noise)
    for i in range(30):  # remove image i (with its label): the stacked release moves by at most C_f
        keep = torch.arange(30) != i
        neighbour = release_aggregates(feats[keep], rows[keep], 7, clip_norm=clip, noise_multiplier=1.0,
                                       sample_rate=0.1, ledger=ledger, noise=noise)
        diff = full - neighbour
        assert diff.norm().item() <= clip * (1 + 1e-5)
        assert diff.norm().item() == pytest.approx(clip, rel=1e-4)  # tight: its row moves by exactly C_f
        assert (diff.abs().sum(1) > 0).sum() == 1  # only its own row
    # each release is one subsampled Gaussian event, recorded before its noise was drawn
    (event,) = ledger.events
    assert (event.kind, event.sample_rate, event.noise_multiplier, event.steps) == ("subsampled_gaussian", 0.1, 1.0, 31)
    assert noise.events_at_draw == list(range(1, 32))
    with pytest.raises(InputError, match="row indices"):
        release_aggregates(feats, rows + 1, 7, clip_norm=clip, noise_multiplier=1.0, sample_rate=0.1,
                           ledger=ledger, noise=noise)


def _synth_and_nets(groups: int = 1) -> tuple[DPAF, Nets]:
    """A smoke-sized DPAF set up as `fit` would after the counts release (counts given), seeded."""
    cfg = create("dpaf", "smoke", agg_groups=groups, fake_per_class=4).config
    synth = DPAF(cfg)  # type: ignore[arg-type]
    synth.num_classes, synth.image_shape, synth.classes = 10, (28, 28, 1), [str(k) for k in range(10)]
    synth.counts = torch.full((10,), 20.0, dtype=torch.float64)
    synth.train_info = {"sample_rate_agg": 0.2, "noise": {"agg": 1.0}, "dataset_size": 200}
    torch.manual_seed(0)
    f1, f2 = synth.new_discriminator()
    gen = synth.new_generator()
    nets = Nets(f1, f2, gen, synth.new_generator(), torch.optim.Adam(f1.parameters()),
                torch.optim.Adam(f2.parameters()), torch.optim.Adam(gen.parameters()),
                torch.Generator().manual_seed(1))
    return synth, nets


def _method_release(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """One aggregation release through the method's own iteration, noise off; returns the undivided row sums."""
    synth, nets = _synth_and_nets(groups)
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.reserve(PrivacyEvent.subsampled_gaussian(1.0, 0.2, 1, LABEL_AGG))
    ctx = FitContext(ledger, ZeroNoise(ledger))
    digests = content_digests(x.numpy(), y.numpy())
    synth._aggregation_iteration(ctx, nets, FixedSampler(len(x), 0.2, index), 1.0, x, y, digests)
    (event,) = ledger.events
    assert (event.label, event.sample_rate, event.steps) == (LABEL_AGG, 0.2, 1)
    return synth.buffer[0] * synth._expected_rows()[:, None]


@pytest.mark.parametrize("position", [0, 20, 40])
@pytest.mark.parametrize("groups", [1, 3])
def test_method_aggregate_moves_by_at_most_cf_when_one_image_is_added(groups, position):
    """Wherever the added image sits (first, middle, last), with the same secret key, one release moves by <= C_f.

    Issue 34: groups were drawn by dataset index from the public training generator, so an image inserted at
    position 0 moved every later image to another group (and the release by many C_f).
    """
    torch.manual_seed(2)
    base = torch.rand(40, 1, 28, 28) * 2 - 1
    base_y = torch.arange(40) % 10
    extra, extra_y = torch.ones(1, 1, 28, 28), torch.tensor([9])  # the added image: an extreme one
    x = torch.cat([base[:position], extra, base[position:]])
    y = torch.cat([base_y[:position], extra_y, base_y[position:]])
    sample = torch.tensor([0, 3, 5, 8, 11, 17, 22, 29, 33])
    moved = torch.where(sample >= position, sample + 1, sample)
    without = _method_release(base, base_y, sample, groups)
    with_x = _method_release(x, y, torch.cat([moved, torch.tensor([position])]), groups)
    assert with_x.shape == (10 * groups, without.shape[1])
    diff = (with_x - without).norm().item()
    assert 0 < diff <= 1.0 * (1 + 1e-5)  # C_f = 1 (the smoke preset's feature_clip)


def test_f1_targets_are_the_loss_gradient_at_released_aggregates():
    """t_real is (N / N_k) dL/dA for one release, averaged (not summed) over the phase's releases."""
    synth, nets = _synth_and_nets()
    real = torch.randn(10, nets.f1.dim) * 0.05
    synth.buffer = [real]
    t1_real, t1_fake = synth._targets(nets)
    nets.rng.manual_seed(1)
    synth.buffer = [real, real.clone(), real.clone()]
    t3_real, t3_fake = synth._targets(nets)
    assert torch.allclose(t1_real, t3_real, rtol=1e-5) and torch.allclose(t1_fake, t3_fake, rtol=1e-5)
    a = real.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.softplus(-nets.f2(a, torch.arange(10))).mean(), a)
    direction = g * 200 / 20.0  # N / N_k
    cos = torch.nn.functional.cosine_similarity(direction.flatten(), t1_real.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)


# -- networks ----------------------------------------------------------------------------------------------------
def test_discriminator_parts_are_dp_sgd_compatible_and_general():
    f1 = FrontFeatures(3, (32, 24), (16, 32), 8)
    f2 = BackHead(f1.feature_shape, 5, (8, 16))
    d = SplitDiscriminator(f1, f2, 1.0)
    assert validate_model(d) == [] and f1.dim == 8 * 8 * 6
    out = d(torch.rand(4, 3, 32, 24), torch.tensor([0, 1, 2, 4]))
    assert out.shape == (4,) and torch.isfinite(out).all()
    with pytest.raises(InputError):
        f2(torch.zeros(2, 7), torch.tensor([0, 1]))
    with pytest.raises(InputError):
        FrontFeatures(1, (4, 4), (8, 8, 8), 4)


# -- schedule, budget split and calibration -------------------------------------------------------------------------
def test_noise_plan_split_and_calibration():
    cfg = create("dpaf", "cpu").config
    sched = Schedule.from_config(cfg, 55000)  # type: ignore[arg-type]
    plan = noise_plan(2.0, sched)
    assert plan.counts == pytest.approx(2.0 / np.sqrt(cfg.counts_share))
    assert plan.f1 == pytest.approx(2.0 * sched.q_f1 * np.sqrt(sched.f1_total / cfg.f1_share))
    w_agg = 1 - cfg.f1_share - cfg.counts_share
    assert plan.agg == pytest.approx(2.0 * sched.q_agg * np.sqrt(sched.agg_total / w_agg))
    assert [e.label for e in plan.events(sched)] == [LABEL_COUNTS, LABEL_AGG, LABEL_F1]
    assert [e.steps for e in plan.events(sched)] == [1, cfg.cycles * cfg.agg_steps, cfg.cycles * cfg.f1_steps]
    assert noise_plan(4.0, sched).agg == pytest.approx(2 * plan.agg)  # one common scale

    small = Schedule.from_config(create("dpaf", "smoke").config, 200)  # type: ignore[arg-type]
    scale, cal = calibrate_plan(3.0, 1e-5, small)
    eps = epsilon_pld(cal.events(small), 1e-5)
    assert 3.0 * 0.98 <= eps <= 3.0 * (1 + 1e-9)
    ablation = Schedule.from_config(create("dpaf", "smoke", aggregation=False).config, 200)  # type: ignore[arg-type]
    assert [e.label for e in noise_plan(1.0, ablation).events(ablation)] == [LABEL_COUNTS, LABEL_D]


def test_config_validation_and_presets():
    cls = method_class("dpaf")
    assert set(cls.Config.presets) == {"smoke", "cpu", "gpu", "gpu-short"}
    assert create("dpaf", "gpu-short").config.max_minutes <= 10
    for bad in ({"f1_share": 0.7, "counts_share": 0.3}, {"agg_groups": 0}, {"feature_clip": 0},
                {"f2_channels": (8,)}, {"generator": "vae"}):
        with pytest.raises(InputError):
            create("dpaf", "smoke", **bad)
    for bad, message in (({"f1_share": 0.5, "counts_share": 0.5}, r"f1_share \+ counts_share must be < 1"),
                         ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
                         ({"f2_channels": (8, 0)}, r"f2_channels must be two positive ints, got \[8, 0\]"),
                         ({"cycles_per_run": -1}, r"cycles_per_run must be >= 0 \(0: no limit\), got -1")):
        with pytest.raises(InputError, match=message):
            create("dpaf", "smoke", **bad)
    with pytest.raises(InputError, match="agg_batch 500"):
        Schedule.from_config(create("dpaf", "smoke", agg_batch=500).config, 200)  # type: ignore[arg-type]


# -- fits -------------------------------------------------------------------------------------------------------------
def _planned(events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e["label"]] = out.get(e["label"], 0) + e["steps"]
    return out


def test_ablation_fit_ledger_holds_exactly_the_planned_events(tiny_npz, tmp_path):
    res = fit_run("dpaf-noagg", f"npz:{tiny_npz}", epsilon=5.0, run_dir=tmp_path / "run", preset="smoke",
                  progress=False)  # the registered ablation: dpaf with aggregation=false
    info = res.synthesizer.train_info
    assert _planned([e.to_json() for e in res.ledger.events]) == _planned(info["events"])
    assert _planned(info["events"]) == {LABEL_COUNTS: 1, LABEL_D: 2 * 3}
    assert 5.0 * 0.98 <= res.ledger.epsilon() <= 5.0 * (1 + 1e-9)
    assert res.synthesizer.config.aggregation is False
    s = load_synthesizer(tmp_path / "run").sample(20, seed=3)
    assert s.images.shape == (20, 28, 28, 1) and s.images.dtype == np.uint8
    with pytest.raises(InputError, match="use method dpaf"):
        create("dpaf-noagg", "smoke", aggregation=True)


def test_ablation_pauses_after_a_cycle_and_resumes_where_a_whole_run_ends(tiny_npz, tmp_path):
    """cycles_per_run=1 stops the ablation's TrainLoop after agg_steps steps; the resumed run spends exactly the
    plan and, with seeded noise, ends with the generator of an uninterrupted run."""
    kw = {"epsilon": 5.0, "preset": "smoke", "progress": False, "insecure_seeded_noise": True}
    fit_run("dpaf-noagg", f"npz:{tiny_npz}", run_dir=tmp_path / "whole", **kw)
    run = tmp_path / "run"
    for expected in ({LABEL_COUNTS: 1, LABEL_D: 3}, {LABEL_COUNTS: 1, LABEL_D: 6}):
        fit_run("dpaf-noagg", f"npz:{tiny_npz}", run_dir=run, overrides=["cycles_per_run=1"],
                resume=(run / "checkpoints").exists(), **kw)
        assert _planned([e.to_json() for e in PrivacyLedger.load(run / "privacy.json").events]) == expected
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (paused,) = [m for m in metrics if m.get("event") == "paused"]
    assert (paused["step"], paused["reason"], paused["steps_left"]) == (3, "cycles_per_run=1", 3)
    assert [m["step"] for m in metrics if m.get("event") == "train_done"] == [6]
    whole = load_synthesizer(tmp_path / "whole").sample(20, seed=0).images
    assert np.array_equal(load_synthesizer(run).sample(20, seed=0).images, whole)


def test_lost_class_counts_are_not_released_twice(tiny_npz, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(DPAF, "_checkpoint", crash)
    with pytest.raises(RuntimeError, match="killed"):
        fit_run("dpaf", f"npz:{tiny_npz}", epsilon=5.0, run_dir=tmp_path / "run", preset="smoke", progress=False)
    monkeypatch.undo()
    ledger = PrivacyLedger.load(tmp_path / "run" / "privacy.json")
    assert [e.label for e in ledger.events] == [LABEL_COUNTS]
    with pytest.raises(InputError, match="class counts were released"):
        fit_run("dpaf", f"npz:{tiny_npz}", epsilon=5.0, run_dir=tmp_path / "run", preset="smoke", resume=True,
                progress=False)
    assert len(PrivacyLedger.load(tmp_path / "run" / "privacy.json").events) == 1


def dpimages(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPIMAGES_CACHE": cache, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dpimages", *args], capture_output=True, text=True, timeout=300,
                          env=env)


ALLOWED_METRICS = {"step", "time", "phase", "cycle", "agg_releases", "f1_steps", "train_s", "f2_loss_real",
                   "f2_loss_fake", "g_loss", "f1_noisy_grad_norm", "event", "reason", "fit_s", "epsilon", "steps",
                   "steps_left", "steps_per_s"}


def test_fit_crash_resume_sample_cli(tiny_npz, tmp_path):
    cache = os.environ["DPIMAGES_CACHE"]
    run = tmp_path / "run"
    common = ["fit", "dpaf", "--data", f"npz:{tiny_npz}", "--epsilon", "10", "--preset", "smoke",
              "--run-dir", str(run), "--json", "cycles_per_run=1", "--insecure-seeded-noise"]  # re-keying is seeded
    res = dpimages(*common, cache=cache)
    assert res.returncode == 0, res.stderr
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["finished"] is False and "noise_rng" in state
    planned = _planned(state["train_info"]["events"])
    assert planned == {LABEL_COUNTS: 1, LABEL_AGG: 2 * 3, LABEL_F1: 2 * 1}
    ledger = PrivacyLedger.load(run / "privacy.json")
    assert _planned([e.to_json() for e in ledger.events]) == {LABEL_COUNTS: 1, LABEL_AGG: 3, LABEL_F1: 1}
    res = dpimages("sample", str(run), "--n", "5", "--out", str(tmp_path / "x.npz"), cache=cache)
    assert res.returncode == 2 and "no finished checkpoint" in res.stderr

    # a crash after a spend but before its checkpoint: the ledger holds one aggregation more than the model saw
    agg = next(e for e in ledger.events if e.label == LABEL_AGG)
    ledger.spend(PrivacyEvent.subsampled_gaussian(agg.noise_multiplier, agg.sample_rate, 1, LABEL_AGG))
    res = dpimages(*common, "--resume", cache=cache)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    ledger = PrivacyLedger.load(run / "privacy.json")
    assert _planned([e.to_json() for e in ledger.events]) == planned  # nothing re-spent, nothing beyond the plan
    assert 10.0 * 0.98 <= out["epsilon"] <= 10.0 * (1 + 1e-9)
    assert json.loads((run / "checkpoints" / "state.json").read_text())["finished"] is True
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("event") == "paused" for m in metrics)
    assert any(m.get("event") == "noise_rekeyed" for m in metrics)  # the checkpoint's noise state is not reused
    assert set().union(*metrics) <= ALLOWED_METRICS  # only post-processing quantities are logged
    assert not any("train_s" in m for m in metrics if "event" not in m)  # no per-step time (private batch)
    assert all("train_s" in m for m in metrics if m.get("event") in ("paused", "train_done"))
    assert (run / "samples" / "grid-final.png").exists()
    report = (run / "report.md").read_text()
    assert "Feature aggregation" in report and "add or remove one image" in report

    res = dpimages("sample", str(run), "--n", "40", "--out", str(tmp_path / "s.npz"), cache=cache)
    assert res.returncode == 0, res.stderr
    s = np.load(tmp_path / "s.npz")
    assert s["images"].shape == (40, 28, 28, 1) and s["images"].dtype == np.uint8
    assert np.bincount(s["labels"], minlength=10).tolist() == [4] * 10


def test_bad_inputs_are_refused_before_any_release(tiny_npz, tmp_path):
    with pytest.raises(InputError, match="f1_batch 500 is larger than the data set"):
        fit_run("dpaf", f"npz:{tiny_npz}", epsilon=10.0, run_dir=tmp_path / "r", preset="smoke",
                overrides=["f1_batch=500"], progress=False)
    privacy = tmp_path / "r" / "privacy.json"  # a refused run leaves nothing, or an empty ledger
    assert not privacy.exists() or json.loads(privacy.read_text())["events"] == []
    with pytest.raises(InputError, match="fake_per_class"):
        fit_run("dpaf", f"npz:{tiny_npz}", epsilon=10.0, run_dir=tmp_path / "r2", preset="smoke",
                overrides=["agg_groups=3"], progress=False)
