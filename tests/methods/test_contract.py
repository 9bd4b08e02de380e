"""The method contract: every name `dpimages methods` lists is held to it, without test code of its own.

For each registered method, on a generated 200-image, 10-class set (what a method needs besides the data
comes from its `smoke_requirements` hook):

* a smoke fit works; sampling gives uint8 images of the data's shape, balanced classes by default and the
  requested labels otherwise; a reload from the run directory samples identically;
* a run killed after its first checkpoint and resumed ends with the same ledger as an uninterrupted one;
* a bad config key exits 2 with one line, writing nothing;
* the ledger recomputes with dp-accounting alone (benchmarks/recompute_epsilon.py) and the report names every
  ledger event;
* no private-data access outside recorded mechanisms: every release gets its noise in
  `NoiseSource.add_to`; a fit on *other* private data (same size) whose releases are replaced by the first
  fit's released values must write the same model, samples, ledger and metrics. Anything that reached an
  output from the private data without going through a release would make them differ.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpimages.api import fit_run, load_synthesizer, method_class, methods
from dpimages.cli import main
from dpimages.data import ImageData
from dpimages.data.toy import toy_bars
from dpimages.privacy.rng import NoiseSource
from dpimages.runs import Run

ROOT = Path(__file__).resolve().parents[2]
EPS, DELTA = 10.0, 1e-3
TIMING = ("_s", "steps_per_s", "time")


def private_set(seed: int = 0) -> ImageData:
    """200 images, 10 classes (`toy_bars`); another seed: other noise and another class-to-row map."""
    return toy_bars(seed=seed, shift=seed)


@pytest.fixture(scope="module")
def requirements(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("requirements")
    return {m: method_class(m).smoke_requirements(base / m) for m in methods()}


def fit(method: str, req: dict, run_dir: Path, data: ImageData | None = None, **kw):
    return fit_run(method, data or private_set(), epsilon=EPS, delta=DELTA, run_dir=run_dir, preset="smoke",
                   public=req.get("public"), overrides=list(req.get("overrides", [])), seed=0,
                   insecure_seeded_noise=True, progress=False, **kw)


def public_metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the whole-run timing fields (they legitimately differ between fits)."""
    return [{k: v for k, v in m.items() if not k.endswith(TIMING)} for m in Run(run).read_metrics()]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("method", methods())
def test_fit_sample_reload_report_and_ledger(method, requirements, tmp_path):
    req = requirements[method]
    res = fit(method, req, tmp_path / "run")
    synth = res.synthesizer
    s = synth.sample(20, seed=0)
    assert s.images.dtype == np.uint8 and s.images.shape == (20, 28, 28, 1)
    assert np.bincount(s.labels, minlength=10).tolist() == [2] * 10  # balanced by default
    wanted = np.full(6, 3, np.int64)
    assert synth.sample(6, wanted, seed=1).labels.tolist() == wanted.tolist()
    again = load_synthesizer(tmp_path / "run", "cpu").sample(20, seed=0)
    assert np.array_equal(again.images, s.images) and np.array_equal(again.labels, s.labels)

    report = (tmp_path / "run" / "report.md").read_text()
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["events"] and 0 < privacy["epsilon"] <= EPS * (1 + 1e-9)
    for e in privacy["events"]:
        assert f"| {e['label']} |" in report, e["label"]
    spec = importlib.util.spec_from_file_location("recompute", ROOT / "benchmarks" / "recompute_epsilon.py")
    recompute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recompute)
    assert recompute.recompute(privacy) == pytest.approx(privacy["epsilon"], rel=1e-6)


@pytest.mark.parametrize("method", methods())
def test_kill_after_first_checkpoint_then_resume_gives_the_same_ledger(method, requirements, tmp_path, monkeypatch):
    req = requirements[method]
    straight = fit(method, req, tmp_path / "straight")

    class Killed(Exception):
        pass

    original = Run.save_checkpoint

    def save_then_die(self, tensors, state):
        original(self, tensors, state)
        if not state.get("finished"):
            raise Killed

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    try:
        fit(method, req, tmp_path / "killed")
        killed = False  # the method's first checkpoint was its final one
    except Killed:
        killed = True
    monkeypatch.setattr(Run, "save_checkpoint", original)
    if killed:
        assert not json.loads((tmp_path / "killed" / "checkpoints" / "state.json").read_text())["finished"]
        resumed = fit(method, req, tmp_path / "killed", resume=True)
    else:
        resumed = load_synthesizer(tmp_path / "killed", "cpu")
    ledger = json.loads((tmp_path / "killed" / "privacy.json").read_text())
    assert ledger["events"] == [e.to_json() for e in straight.ledger.events]
    assert ledger["epsilon"] == pytest.approx(straight.ledger.epsilon(), rel=1e-9)
    assert resumed is not None


@pytest.mark.parametrize("method", methods())
def test_bad_config_key_exits_2_and_writes_nothing(method, tmp_path, capsys):
    code = main(["fit", method, "--data", "digits", "--epsilon", "1", "--delta", "1e-4", "--preset", "smoke",
                 "--run-dir", str(tmp_path / "r"), "no_such_key=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown config key 'no_such_key'" in err[0]
    assert not (tmp_path / "r").exists()


def foreign_public() -> ImageData:
    """200 labelled public images whose class names are not the private ones (dpdm's class selection)."""
    bars = toy_bars(seed=9, shift=3)
    return ImageData(bars.images, bars.labels, [f"public-{c}" for c in bars.classes], "foreign toy bars")


def negative_private_set() -> ImageData:
    """Another private set (same N, labels and classes): `private_set()` in negative. The selection classifier
    (10 passes) puts its images in other public classes than `private_set()`'s (measured: all in one class
    against 164 / 36 in two others), so a selection that read the predictions unnoised would pick other classes."""
    base = private_set()
    return ImageData(255 - base.images, base.labels, base.classes, "negative toy bars")


# the registered methods at their smoke presets, plus the stages whose private reads the presets leave off
REPLAY_CASES = [pytest.param(m, None, id=m) for m in methods()] + [
    pytest.param("dpdm", {"overrides": ["warm_start=central"]}, id="dpdm-central"),
    pytest.param("dpdm", {"overrides": ["warm_start=public", "public_classes=3", "select_epochs=10"],
                          "public": foreign_public(), "other": negative_private_set()}, id="dpdm-public-selection"),
]


@pytest.mark.parametrize(("method", "case"), REPLAY_CASES)
def test_outputs_depend_on_private_data_only_through_releases(method, case, requirements, tmp_path, monkeypatch):
    """Record every release on one private set, replay them on another: every output must be the same."""
    req = requirements[method] if case is None else case
    released: list[torch.Tensor] = []
    original = NoiseSource.add_to

    def record(self, value, std):
        out = original(self, value, std)
        released.append(out.detach().clone())
        return out

    monkeypatch.setattr(NoiseSource, "add_to", record)
    a = fit(method, req, tmp_path / "a")
    assert released, "no release went through NoiseSource.add_to"
    replay = iter(released)

    def replayed(self, value, std):
        original(self, value, std)  # the same draws, so every later draw lines up
        out = next(replay)
        assert out.shape == value.shape and out.dtype == value.dtype
        return out.to(value.device)

    monkeypatch.setattr(NoiseSource, "add_to", replayed)
    # other pixels (another class-to-row map, or the negative); same N and labels
    other = case["other"] if case and "other" in case else private_set(seed=5)
    assert not np.array_equal(other.images, private_set().images)
    b = fit(method, req, tmp_path / "b", data=other)
    assert next(replay, None) is None  # the same number of releases

    sa, sb = a.synthesizer.state_dict(), b.synthesizer.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert np.array_equal(a.synthesizer.sample(20, seed=0).images, b.synthesizer.sample(20, seed=0).images)
    pa, pb = (json.loads((tmp_path / r / "privacy.json").read_text()) for r in "ab")
    assert pa == pb
    assert public_metrics(tmp_path / "a") == public_metrics(tmp_path / "b")
