"""PE: vote sensitivity, ledger events and calibration, votes steering a toy model, resume, CLI, diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpimages.api import FitContext, create, fit_run, load_synthesizer
from dpimages.cli import main
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.methods.pe import release as rel
from dpimages.methods.pe.diffusion_api import (
    DiffusionAPI,
    degree_to_sigma,
)
from dpimages.methods.pe.image_api import ImageAPI
from dpimages.methods.pe.method import PE
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.ledger import epsilon_pld

SIZE, SQUARE = 28, 6


# -- a toy generative model: one bright square; its position is the whole image -----------------
def _squares(pos: torch.Tensor) -> torch.Tensor:
    """(N, 2) integer top-left corners -> (N, 1, 28, 28) images in [-1, 1] with a 6x6 bright square."""
    x = torch.full((pos.shape[0], 1, SIZE, SIZE), -1.0)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r : r + SQUARE, c : c + SQUARE] = 1.0
    return x


def _positions(x: torch.Tensor) -> torch.Tensor:
    """Top-left corner of the square in each image (centre of mass of the bright pixels)."""
    w = (x[:, 0] > 0).float()
    grid = torch.arange(SIZE, dtype=torch.float32)
    n = w.sum(dim=(1, 2)).clamp_min(1.0)
    r = (w.sum(dim=2) * grid).sum(dim=1) / n
    c = (w.sum(dim=1) * grid).sum(dim=1) / n
    return torch.stack([r, c], dim=1) - (SQUARE - 1) / 2


class ToyAPI(ImageAPI):
    """random: a square anywhere; variation: the square moved by about degree x 8 pixels."""

    kind = "toy"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (SIZE, SIZE, 1)

    def random(self, n: int, labels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        return _squares(torch.randint(0, SIZE - SQUARE + 1, (n, 2), generator=generator))

    def variation(self, images: torch.Tensor, labels: torch.Tensor, degree: float, *,
                  generator: torch.Generator) -> torch.Tensor:
        step = torch.randn(images.shape[0], 2, generator=generator) * 8.0 * degree
        pos = (_positions(images) + step).round().clamp(0, SIZE - SQUARE).long()
        return _squares(pos)


def _private_squares(n: int, classes: int, seed: int = 0) -> ImageData:
    """Class c: squares jittered around one corner position per class (the private distribution)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3, 3], [18, 18], [3, 18], [18, 3]])[:classes]
    labels = torch.arange(n) % classes
    pos = (centres[labels] + torch.randint(-1, 2, (n, 2), generator=g)).clamp(0, SIZE - SQUARE)
    images = ((_squares(pos) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ImageData(images, labels.numpy().astype(np.int64), [f"c{i}" for i in range(classes)], "toy squares")


def _mean_nn_distance(private: ImageData, pop: np.ndarray, pop_labels: np.ndarray) -> float:
    """Mean over private images of the distance (pixels) from its square to the nearest same-class square."""
    pp = _positions(private.to_tensor())
    sp = _positions(torch.from_numpy(pop).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    out = []
    for c in range(private.num_classes):
        a, b = pp[torch.from_numpy(private.labels == c)], sp[torch.from_numpy(pop_labels == c)]
        out.append(torch.cdist(a, b).min(dim=1).values)
    return float(torch.cat(out).mean())


def _toy_config(**kw):
    base = {"features": "random", "feature_channels": (8, 16), "feature_pool": (4,), "population_per_class": 16,
            "iterations": 4, "lookahead": 1, "degree_start": 0.5, "degree_end": 0.2, "api_batch": 256,
            "threshold_sigmas": 1.0}
    return create("pe", **{**base, **kw})


# -- votes: sensitivity ------------------------------------------------------------------------------
def test_vote_histogram_sensitivity_is_one_per_private_image():
    g = torch.Generator().manual_seed(0)
    n, k, per, d = 120, 3, 7, 16
    priv = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    lab = torch.randint(0, k, (n,), generator=g)
    syn = torch.nn.functional.normalize(torch.randn(k * per, d, generator=g), dim=1)
    syn_lab = torch.arange(k * per) // per
    bins = rel.vote_bins(priv, lab, syn, syn_lab, k)
    assert bins.shape == (n,)
    assert torch.equal(syn_lab[bins], lab), "each private image votes within its own class"
    full = torch.bincount(bins, minlength=k * per).double()
    assert float(full.sum()) == n, "one vote per private image"
    for i in range(n):  # remove image i (with its label): the neighbouring data set
        keep = torch.arange(n) != i
        b2 = rel.vote_bins(priv[keep], lab[keep], syn, syn_lab, k)
        diff = full - torch.bincount(b2, minlength=k * per).double()
        assert float(diff.norm()) == pytest.approx(1.0)
        assert float(diff.abs().sum()) == 1.0
    # adding an extreme image (far from everything) also moves exactly one bin by one
    extra = torch.full((1, d), 10.0)
    b3 = rel.vote_bins(torch.cat([priv, extra]), torch.cat([lab, torch.tensor([2])]), syn, syn_lab, k)
    assert float((torch.bincount(b3, minlength=k * per).double() - full).norm()) == pytest.approx(1.0)


def test_release_records_one_event_before_noise_and_counts_are_unbiased():
    ledger = PrivacyLedger(100.0, 1e-5)
    noise = NoiseSource(3)
    bins = torch.tensor([0, 0, 2, 5, 5, 5])
    out = rel.release_votes(bins, 6, noise_multiplier=0.5, ledger=ledger, noise=noise)
    assert out.shape == (6,) and out.dtype == torch.float64
    assert [(e.kind, e.steps, e.label) for e in ledger.events] == [("gaussian", 1, rel.LABEL)]
    assert noise.gaussian_draws == 1
    assert torch.allclose(out, torch.tensor([2.0, 0, 1, 0, 0, 3], dtype=torch.float64), atol=3.0)


def test_nearest_neighbours_match_brute_force_and_faiss():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(300, 24, generator=g), torch.randn(97, 24, generator=g)
    ref = torch.cdist(q, k).argmin(dim=1)
    assert torch.equal(rel.nearest(q, k, chunk=64), ref)
    pytest.importorskip("faiss")
    assert (rel.nearest(q, k, backend="faiss") == ref).float().mean() > 0.99


def test_threshold_and_resample_are_proportional_within_class():
    noisy = torch.tensor([5.0, -1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    kept = rel.threshold(noisy, 1.0)
    assert kept.tolist() == [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    idx, empty = rel.resample(kept, torch.tensor([0, 0, 0, 1, 1, 1]), 2, 50, torch.Generator().manual_seed(0))
    assert empty == 1  # class 1 got no votes above H: uniform over its samples
    assert set(idx[:50].tolist()) == {0} and set(idx[50:].tolist()) <= {3, 4, 5}


# -- ledger and calibration ------------------------------------------------------------------------
def test_ledger_records_T_gaussian_events_and_sigma_meets_target():
    private = _private_squares(120, 3)
    synth = _toy_config(iterations=3, population_per_class=6).with_api(ToyAPI())
    ledger, noise = PrivacyLedger(2.0, 1e-5), NoiseSource(0)
    synth.fit(private, None, FitContext(ledger, noise, progress=False, method="pe"))
    sigma = synth.train_info["noise_multiplier"]
    assert [(e.kind, e.steps, e.label, e.noise_multiplier) for e in ledger.events] == [
        ("gaussian", 3, rel.LABEL, sigma)]
    assert noise.gaussian_draws == 3
    assert ledger.epsilon() <= 2.0
    assert epsilon_pld(rel.vote_events(sigma * 0.99, 3), 1e-5) > 2.0  # calibration is tight
    assert synth.train_info["threshold"] == pytest.approx(1.0 * sigma)


# -- votes steer the population ------------------------------------------------------------------
def _toy_run(private: ImageData, ignore_votes: bool, monkeypatch) -> tuple[float, float]:
    synth = _toy_config().with_api(ToyAPI())
    if ignore_votes:  # control: the same run with every vote thrown away
        monkeypatch.setattr(rel, "threshold", lambda noisy, h: torch.ones_like(noisy))
    initial: list[float] = []
    real_evolve = PE._evolve

    def spy(self, *a, **kw):
        if not initial:
            initial.append(_mean_nn_distance(private, self.population, self.population_labels))
        return real_evolve(self, *a, **kw)

    monkeypatch.setattr(PE, "_evolve", spy)
    synth.fit(private, None, FitContext(PrivacyLedger(20.0, 1e-4), NoiseSource(0), progress=False, method="pe"))
    monkeypatch.undo()
    return initial[0], _mean_nn_distance(private, synth.population, synth.population_labels)


def test_votes_move_population_towards_private_distribution(monkeypatch):
    private = _private_squares(400, 2)
    before, after = _toy_run(private, False, monkeypatch)
    _, after_ignored = _toy_run(private, True, monkeypatch)
    assert after < 0.6 * before, (before, after)
    assert after < 0.5 * after_ignored, (after, after_ignored)


# -- a tiny real public model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """PE's smoke requirement: a tiny public model trained on generated noise images."""
    overrides = PE.smoke_requirements(tmp_path_factory.mktemp("public"))["overrides"]
    return Path(dict(o.split("=", 1) for o in overrides)["api_path"])


def test_diffusion_api_shapes_and_degree(tiny_model):
    api = DiffusionAPI.load(tiny_model, sample_steps=2, variation_steps=4)
    g = torch.Generator().manual_seed(0)
    x = api.random(5, torch.zeros(5, dtype=torch.long), generator=g)
    assert x.shape == (5, 1, 28, 28) and float(x.abs().max()) <= 1.0
    v = api.variation(x, torch.zeros(5, dtype=torch.long), 0.05, generator=g)
    assert v.shape == x.shape
    assert float((v - x).abs().mean()) < 0.1  # a small degree stays close
    assert degree_to_sigma(1.0) == pytest.approx(80.0)
    assert degree_to_sigma(0.1) < degree_to_sigma(0.5) < degree_to_sigma(0.9)
    with pytest.raises(InputError):
        api.variation(x, torch.zeros(5, dtype=torch.long), 1.5, generator=g)
    info = api.describe()
    assert info["trained_on"] == "toy public" and info["sha256"].startswith("sha256:")


def _fit_kw(model: Path, **extra):
    return {"api_path": str(model), "features": "random", "feature_channels": (4, 8), "population_per_class": 3,
            "iterations": 3, "lookahead": 1, "sample_steps": 2, "variation_steps": 2, **extra}


def test_resume_after_crash_spends_exactly_T_and_matches_uninterrupted(tiny_model, tmp_path, monkeypatch):
    private = _private_squares(60, 2)
    kw = {"epsilon": 5.0, "delta": 1e-3, "progress": False, "insecure_seeded_noise": True}  # bit-identical replay
    ref = fit_run("pe", private, run_dir=tmp_path / "ref", overrides=_fit_kw(tiny_model), **kw)
    real = PE._evolve
    calls = {"n": 0}

    def crash_on_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(PE, "_evolve", crash_on_second)
    with pytest.raises(RuntimeError):
        fit_run("pe", private, run_dir=tmp_path / "a", overrides=_fit_kw(tiny_model), **kw)
    monkeypatch.setattr(PE, "_evolve", real)
    led = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert sum(e["steps"] for e in led["events"]) == 2  # the second histogram was released and checkpointed
    res = fit_run("pe", private, run_dir=tmp_path / "a", overrides=_fit_kw(tiny_model), resume=True, **kw)
    assert [e.steps for e in res.ledger.events] == [3]
    assert res.synthesizer.train_info["lost_releases"] == 0
    assert np.array_equal(res.synthesizer.population, ref.synthesizer.population)


def test_release_lost_in_a_crash_is_counted_not_redone(tiny_model, tmp_path, monkeypatch):
    private = _private_squares(60, 2)
    kw = {"epsilon": 5.0, "delta": 1e-3, "progress": False, "insecure_seeded_noise": True}  # counts seeded draws
    real = PE._checkpoint
    seen = {"voted": 0}

    def crash_before_second_histogram_is_saved(self, ctx, g, **k):
        if k.get("phase") == "voted":
            seen["voted"] += 1
            if seen["voted"] == 2:
                raise RuntimeError("killed")
        return real(self, ctx, g, **k)

    monkeypatch.setattr(PE, "_checkpoint", crash_before_second_histogram_is_saved)
    with pytest.raises(RuntimeError):
        fit_run("pe", private, run_dir=tmp_path / "b", overrides=_fit_kw(tiny_model), **kw)
    monkeypatch.setattr(PE, "_checkpoint", real)
    res = fit_run("pe", private, run_dir=tmp_path / "b", overrides=_fit_kw(tiny_model), resume=True, **kw)
    assert [e.steps for e in res.ledger.events] == [3]  # never more, never fewer than planned
    assert res.synthesizer.train_info["lost_releases"] == 1
    state = json.loads((tmp_path / "b" / "checkpoints" / "state.json").read_text())
    # two draws survive in the saved count: the lost release's draw happened in the crashed process, and the resumed
    # run re-keys its seeded source (the ledger is ahead of the checkpoint) instead of drawing noise to skip it
    assert state["finished"] and state["releases"] == 3 and state["noise_rng"]["gaussian_draws"] == 2
    metrics = res.run.read_metrics()
    events = [m.get("event") for m in metrics]
    assert events.count("votes") == 2 and "lost_releases" in events
    done = [m for m in metrics if m.get("event") == "train_done"]  # whole-run times only, never per release
    assert len(done) == 1 and done[0]["lost_releases"] == 1 and {"train_s", "steps_per_s"} <= done[0].keys()
    assert state["train_info"]["train_s"] >= done[0]["train_s"] - 0.1
    assert not any("train_s" in m for m in metrics if m.get("event") == "votes")


def test_sample_returns_population_then_variations(tiny_model, tmp_path):
    private = _private_squares(60, 2)
    res = fit_run("pe", private, epsilon=5.0, delta=1e-3, run_dir=tmp_path / "s", overrides=_fit_kw(tiny_model),
                  progress=False, insecure_seeded_noise=True)  # a fixed population: no variation can equal one
    synth = load_synthesizer(tmp_path / "s", "cpu")
    pop = synth.population
    assert np.array_equal(pop, res.synthesizer.population)
    small = synth.sample(4, seed=1)
    assert all(any(np.array_equal(im, p) for p in pop) for im in small.images)
    big = synth.sample(10, seed=1)  # population has 6: 4 extra variations
    assert big.images.shape == (10, 28, 28, 1) and np.bincount(big.labels).tolist() == [5, 5]
    members = sum(any(np.array_equal(im, p) for p in pop) for im in big.images)
    assert members == 6
    assert "noise multiplier" in synth.report_section()


# -- command line ----------------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_public_model_fit_sample(tmp_path, tiny_npz, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "public-model", "train", "--data", f"npz:{tiny_npz}", "--out", "m", "--preset",
                          "smoke", "max_steps=2", "--json")
    assert code == 0, err
    assert json.loads(out)["trained_on"].startswith("npz:")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "samples.png").exists()
    code, out, err = _cli(capsys, "fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "10", "--delta", "1e-3",
                          "--preset", "smoke", "--run-dir", "r", "api_path=m", "features=random", "--json")
    assert code == 0, err
    assert json.loads(out)["epsilon"] <= 10
    assert sorted(p.name for p in (tmp_path / "r" / "samples").glob("*.png")) == [
        "grid-000.png", "grid-001.png", "grid-002.png", "grid-final.png"]
    code, out, err = _cli(capsys, "sample", "r", "--n", "50", "--out", "s.npz")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as d:
        assert d["images"].shape == (50, 28, 28, 1) and d["labels"].dtype == np.int64
    assert "Generative-model API" in (tmp_path / "r" / "report.md").read_text()
    # bad input: one line, exit 2, nothing spent
    code, _, err = _cli(capsys, "fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "1", "--delta", "1e-3",
                        "--preset", "smoke", "--run-dir", "r2", "api_path=nowhere", "features=random")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "api_path" in err
    code, _, err = _cli(capsys, "fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "1", "--delta", "1e-3",
                        "--preset", "smoke", "--run-dir", "r3", "api_path=m")
    assert code == 2 and "--public" in err
    assert not (tmp_path / "r3" / "privacy.json").exists() or not json.loads(
        (tmp_path / "r3" / "privacy.json").read_text())["events"]


def test_model_and_data_shapes_must_agree(tiny_model, tmp_path):
    images = np.zeros((30, 32, 32, 1), np.uint8)
    data = ImageData(images, np.arange(30, dtype=np.int64) % 2, ["a", "b"], "32px")
    with pytest.raises(InputError, match=r"\(28, 28, 1\)"):
        fit_run("pe", data, epsilon=1.0, delta=1e-3, run_dir=tmp_path / "x", overrides=_fit_kw(tiny_model),
                progress=False)


# -- diffusers adapter (optional extra) -------------------------------------------------------------
def test_diffusers_pipeline_from_a_local_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from dpimages.methods.pe.diffusers_api import DiffusersAPI

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                                 attention_head_dim=4, num_class_embeds=2)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path / "pipe")
    api = DiffusersAPI.load(tmp_path / "pipe", steps=4, image_shape=(28, 28, 1))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1])
    x = api.random(3, labels, generator=g)
    assert x.shape == (3, 1, 28, 28) and float(x.abs().max()) <= 1.0
    v = api.variation(x, labels, 0.25, generator=g)
    assert v.shape == x.shape and torch.isfinite(v).all()
    info = api.describe()
    assert info["pipeline"] == "DDPMPipeline" and info["random_mode"] == "class-conditional U-Net"
    # and through the method, end to end
    private = _private_squares(40, 2)
    res = fit_run("pe", private, epsilon=5.0, delta=1e-3, run_dir=tmp_path / "run", progress=False,
                  overrides={"api": "diffusers", "api_path": str(tmp_path / "pipe"), "features": "random",
                             "feature_channels": (4,), "population_per_class": 2, "iterations": 2, "lookahead": 0,
                             "sample_steps": 2})
    assert [e.steps for e in res.ledger.events] == [2]
    assert "diffusers pipeline" in res.synthesizer.report_section()


def test_fit_with_public_data_and_no_api_path_trains_the_public_model_once(tmp_path):
    """One command: `fit pe --public SPEC` trains the public model first (cached by the public data), then PE."""
    from dpimages.data.toy import toy_bars
    from dpimages.eval.feature_nets import cache_dir

    private, public = _private_squares(60, 2), toy_bars(64, num_classes=2, seed=3)
    kw = {"epsilon": 5.0, "delta": 1e-3, "preset": "smoke", "public": public, "progress": False,
          "overrides": ["features=random"]}
    first = fit_run("pe", private, run_dir=tmp_path / "a", **kw)
    path = Path(first.synthesizer.train_info["api_path"])
    assert path.parent == cache_dir() / "public-models" and (path / "model.json").exists()
    stamp = (path / "model.json").stat().st_mtime_ns
    second = fit_run("pe", private, run_dir=tmp_path / "b", **kw)
    assert second.synthesizer.train_info["api_path"] == str(path)
    assert (path / "model.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert load_synthesizer(tmp_path / "a", "cpu").sample(10, seed=1).images.shape == (10, 28, 28, 1)
    with pytest.raises(InputError, match="--public SPEC to train one"):
        fit_run("pe", private, run_dir=tmp_path / "c", **{**kw, "public": None})


def test_public_model_training_shows_a_progress_bar(capsys):
    from dpimages.config import resolve_config
    from dpimages.data.toy import toy_bars
    from dpimages.methods.pe.config import PublicModelConfig
    from dpimages.methods.pe.diffusion_api import train_public_model

    cfg = resolve_config(PublicModelConfig, "smoke", ["batch_size=8", "max_steps=2"])
    _, facts = train_public_model(toy_bars(32, num_classes=2, seed=1), cfg, progress=True)
    assert facts["steps"] == 2
    err = capsys.readouterr().err
    assert "public model (public data, no privacy cost)" in err and "2/2" in err
