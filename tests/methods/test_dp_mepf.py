"""DP-MEPF: sensitivity of the release, ledger events, generator training, VGG weights, CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpimages.api import FitContext, create, fit_run, load_synthesizer
from dpimages.cli import main
from dpimages.data import ImageData, load
from dpimages.errors import BudgetExceeded, InputError
from dpimages.methods.dp_mepf import release as rel
from dpimages.methods.dp_mepf.matching import released_distance
from dpimages.methods.dp_mepf.method import DPMEPF
from dpimages.nets.feature_extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    VGGTrunk,
    load_trunk,
    random_conv_trunk,
    save_feature_net,
)
from dpimages.privacy import NoiseSource, PrivacyLedger


def dpimages(*args: str) -> subprocess.CompletedProcess:
    """The command in a fresh process (slow to start on a busy machine: used once)."""
    return subprocess.run([sys.executable, "-m", "dpimages", *args], capture_output=True, text=True, timeout=300)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1] plus extreme ones (all black, all white, a checkerboard)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    x[0], x[1] = -1.0, 1.0
    x[2] = torch.where((torch.arange(28)[:, None] + torch.arange(28)[None]) % 2 == 0, 1.0, -1.0)
    return x


# -- the release ---------------------------------------------------------------------------
@pytest.mark.parametrize("pool,tap,second", [((4,), "post", True), ((1,), "pre", True), ((0,), "post", False)])
def test_neighbouring_datasets_move_released_sums_within_declared_bound(pool, tap, second):
    ext = FeatureExtractor([random_conv_trunk(3, 1, (8, 16), tap=tap)], (), pool, second_moment=second)
    x, y = _images(40), torch.arange(40) % 3
    s1, s2 = rel._chunked_class_sums(ext, x, y, 3, chunk=16)
    f1, f2 = ext(x)
    assert torch.all(f1.norm(dim=1) <= 1 + 1e-5)
    worst = 0.0
    for i in range(40):  # remove image i (add/remove relation): the stacked sums move by <= 1
        keep = torch.arange(40) != i
        t1, t2 = rel._chunked_class_sums(ext, x[keep], y[keep], 3, chunk=16)
        d = float((s1 - t1).norm() ** 2)
        if second:
            assert float((s2 - t2).norm()) <= rel.CLIP_NORM + 1e-9
        worst = max(worst, d**0.5)
    assert worst <= rel.CLIP_NORM + 1e-9
    assert worst > 0.99  # the bound is tight: unit-norm features
    # replace one image: the class mean changes by at most 2 / n_c (METHODS.md)
    x2 = x.clone()
    x2[5] = -x[5]
    t1, _ = rel._chunked_class_sums(ext, x2, y, 3, chunk=16)
    n_c = int((y == y[5]).sum())
    assert float((s1[y[5]] - t1[y[5]]).norm()) / n_c <= 2.0 / n_c + 1e-9


def test_release_records_exactly_the_planned_events_before_noise():
    ext = FeatureExtractor([random_conv_trunk(3, 1, (8, 16))], (), (2,), second_moment=True)
    x, y = _images(30), torch.arange(30) % 3
    ledger, noise = PrivacyLedger(1.0, 1e-5), NoiseSource(0)
    w = rel.weights(True, 1.0, 0.5, 0.05)
    scale, plan = rel.calibrate_plan(1.0, 1e-5, w)
    released = rel.release(ext, x, y, 3, plan, ledger=ledger, noise=noise)
    assert [e.label for e in ledger.events] == [rel.LABEL_FIRST, rel.LABEL_SECOND, rel.LABEL_COUNTS]
    assert [e.noise_multiplier for e in ledger.events] == [plan.noise_first, plan.noise_second, plan.noise_counts]
    assert all(e.kind == "gaussian" and e.steps == 1 for e in ledger.events)
    assert noise.gaussian_draws == 3
    assert 0.97 < ledger.epsilon() <= 1.0 + 1e-9
    assert released.sum_first.shape == (3, ext.dims((1, 28, 28))[0]) and released.counts.shape == (3,)
    # the composition of the three releases is one Gaussian with multiplier `scale`
    assert sum(1 / e.noise_multiplier**2 for e in ledger.events) == pytest.approx(1 / scale**2)
    with pytest.raises(BudgetExceeded):  # a second release would exceed the budget: refused, no noise drawn
        rel.release(ext, x, y, 3, plan, ledger=ledger, noise=noise)
    assert noise.gaussian_draws == 3 and len(ledger.events) == 3


def test_released_means_projection_only_moves_towards_the_feasible_set():
    r = rel.Released(torch.tensor([[3.0, -4.0], [0.1, 0.2]], dtype=torch.float64), None,
                     torch.tensor([1.0, -5.0], dtype=torch.float64))
    m, _ = r.means(project=True, nonneg_first=True)
    assert torch.allclose(m, torch.tensor([[1.0, 0.0], [0.1, 0.2]]))  # clamped, unit ball; count floored at 1



def test_cells_split_each_class_by_sign_patterns_and_keep_sensitivity_one():
    ext = FeatureExtractor([random_conv_trunk(3, 1, (8, 16))], (), (2,))
    x, y = _images(60), torch.arange(60) % 3
    f, _ = ext(x)
    centres = torch.stack([f[y == c].mean(0) for c in range(3)]).double()
    proj = rel.cell_projections(f.shape[1], 2, seed=5)
    assert torch.equal(proj, rel.cell_projections(f.shape[1], 2, seed=5))  # public seed: reproducible

    def row_index(g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels * 4 + rel.cell_index(g, centres[labels], proj)

    s1, _, rows = rel._chunked_sums(ext, x, y, 12, 16, row_index)
    # the row is the class times 4 plus the sign pattern, computed independently here
    signs = ((f.double() - centres[y]) @ proj) > 0
    assert torch.equal(rows, y * 4 + signs[:, 0].long() + 2 * signs[:, 1].long())
    assert len(set(rows.tolist())) > 6  # the cells really split the classes
    assert torch.allclose(s1.view(3, 4, -1).sum(1), rel._chunked_class_sums(ext, x, y, 3, chunk=16)[0])
    for i in range(60):  # remove image i: exactly one row moves, by <= 1; its count by 1
        keep = torch.arange(60) != i
        t1, _, r2 = rel._chunked_sums(ext, x[keep], y[keep], 12, 16, row_index)
        moved = (s1 - t1).norm(dim=1)
        assert int((moved > 1e-9).sum()) == 1 and float(moved.max()) <= rel.CLIP_NORM + 1e-9
        n1, n2 = torch.bincount(rows, minlength=12), torch.bincount(r2, minlength=12)
        assert int((n1 - n2).abs().sum()) == 1


@pytest.mark.parametrize("directions", ["neighbours", "random"])
def test_release_with_cells_spends_centres_first_and_meets_the_target(directions):
    ext = FeatureExtractor([random_conv_trunk(3, 1, (8, 16))], (), (2,))
    x, y = _images(60), torch.arange(60) % 3
    ledger, noise = PrivacyLedger(2.0, 1e-5), NoiseSource(0)
    w = rel.weights(False, 1.0, 1.0, 0.05, cell_bits=2, w_centres=0.25)
    assert sum(w) + w[2] == pytest.approx(1.0)  # counts are released twice
    scale, plan = rel.calibrate_plan(2.0, 1e-5, w, cells=4)
    released = rel.release(ext, x, y, 3, plan, ledger=ledger, noise=noise, cell_seed=5, cell_directions=directions)
    suffix = rel.CELL_SUFFIX
    assert [e.label for e in ledger.events] == [rel.LABEL_CENTRES, rel.LABEL_CENTRE_COUNTS, rel.LABEL_FIRST + suffix,
                                                rel.LABEL_COUNTS + suffix]
    assert sum(1 / e.noise_multiplier**2 for e in ledger.events) == pytest.approx(1 / scale**2)
    assert 1.95 < ledger.epsilon() <= 2.0 + 1e-9
    assert released.sum_first.shape[0] == 12 and released.counts.shape == (12,) and released.cells == 4
    p = released.cell_proportions()
    assert p.shape == (3, 4) and torch.allclose(p.sum(1), torch.ones(3, dtype=p.dtype))
    with pytest.raises(ValueError):
        rel.calibrate_plan(2.0, 1e-5, w, cells=1)  # a centres weight without cells is a programming error





def test_cells_are_assigned_from_the_noisy_centres_only(monkeypatch):
    """The cells must come from the released (noisy) centres: recomputed here from the captured releases."""
    ext = FeatureExtractor([random_conv_trunk(3, 1, (8, 16))], (), (2,))
    x, y = _images(60), torch.arange(60) % 3
    released_values, count_inputs = [], []
    real_gaussian, real_counts = rel.gaussian_release, rel.noisy_class_counts

    def gaussian(value, **kw):
        out = real_gaussian(value, **kw)
        released_values.append(out)
        return out

    def counts(labels, num_classes, **kw):
        out = real_counts(labels, num_classes, **kw)
        count_inputs.append(labels)
        released_values.append(out)
        return out

    monkeypatch.setattr(rel, "gaussian_release", gaussian)
    monkeypatch.setattr(rel, "noisy_class_counts", counts)
    w = rel.weights(False, 1.0, 1.0, 0.05, cell_bits=2, w_centres=0.25)
    _, plan = rel.calibrate_plan(0.5, 1e-5, w, cells=4)  # noisy: centres far from the true ones
    rel.release(ext, x, y, 3, plan, ledger=PrivacyLedger(0.5, 1e-5), noise=NoiseSource(0), cell_seed=5)
    noisy_sum, noisy_n = released_values[0], released_values[1]
    centres = (noisy_sum / noisy_n.clamp_min(1.0).unsqueeze(1)).clamp_min(0.0)
    centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1.0)
    f, _ = ext(x)
    proj = rel.neighbour_projections(centres, 2, seed=5)
    expected = y * 4 + rel.cell_index(f, centres[y], proj[y])
    assert torch.equal(count_inputs[-1], expected)
    true_centres = torch.stack([f[y == c].mean(0) for c in range(3)]).double()
    from_truth = y * 4 + rel.cell_index(f, true_centres[y], rel.neighbour_projections(true_centres, 2, seed=5)[y])
    assert not torch.equal(count_inputs[-1], from_truth)  # the check above can tell the two apart


def test_neighbour_directions_point_to_the_nearest_other_centres():
    centres = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    p = rel.neighbour_projections(centres, 3, seed=0)
    assert p.shape == (3, 3, 3)
    assert torch.allclose(p[0, :, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # nearest: class 1
    assert torch.allclose(p[0, :, 1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # then class 2
    assert torch.equal(p[0, :, 2], rel.cell_projections(3, 3, seed=0)[:, 2])  # only 2 other classes: random
    # per-row directions: a point of class 0 on the side of class 1 (from its centre) gets bit 0 set
    f = torch.tensor([[0.6, 0.0, 0.0], [-0.6, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    cells = rel.cell_index(f, centres[y], p[y])
    assert int(cells[0]) % 2 == 1 and int(cells[1]) % 2 == 0


def test_auto_cells_keep_the_expected_noise_of_a_cell_mean_under_the_limit():
    # noise norm of a cell mean ~ noise * sqrt(D) * cells / images per class
    assert rel.auto_cell_bits(0.5, 10_000, 5_000, 0.2) == 4  # 0.5 * 100 * 16 / 5000 = 0.16; 32 cells: 0.32
    assert rel.auto_cell_bits(0.5, 10_000, 5_000, 0.1) == 3
    assert rel.auto_cell_bits(6.0, 10_000, 5_000, 0.2) == 0  # too noisy for even two cells: the published method
    assert rel.auto_cell_bits(1e-6, 10, 5_000, 0.2) == 6  # at most 64 cells
    synth = create("dp-mepf", "smoke")
    synth.num_classes = 10
    assert synth._resolve_cell_bits(60_000, 10_976, 10.0, 1e-5) > synth._resolve_cell_bits(60_000, 10_976, 1.0, 1e-5)
    assert synth._resolve_cell_bits(100, 10_976, 10.0, 1e-5) == 0
    assert create("dp-mepf", "smoke", cell_bits=2)._resolve_cell_bits(100, 10_976, 10.0, 1e-5) == 2


def test_fit_with_cells_trains_and_samples_each_class(tiny_npz, tmp_path):
    data = load(f"npz:{tiny_npz}")
    res = fit_run("dp-mepf", data, epsilon=10.0, run_dir=tmp_path / "run", preset="smoke",
                  overrides=["cell_bits=1"], seed=0, progress=False)
    labels = [e.label for e in res.ledger.events]
    assert labels[:2] == [rel.LABEL_CENTRES, rel.LABEL_CENTRE_COUNTS]
    assert res.synthesizer.sample_generator.embed.num_embeddings == 20  # 10 classes x 2 cells
    out = res.synthesizer.sample(40, np.arange(40) % 10, seed=3)
    assert out.labels.tolist() == (np.arange(40) % 10).tolist()
    loaded = load_synthesizer(tmp_path / "run")
    reloaded = loaded.sample(40, np.arange(40) % 10, seed=3)  # cell proportions saved
    assert np.array_equal(reloaded.images, out.images)
    assert loaded.report_section() == res.synthesizer.report_section() != ""  # `dpimages report` can rebuild it
    report = (tmp_path / "run" / "report.md").read_text()
    assert "per-(class, cell)" in report and "cell centres" in report and "nearest other noisy centres" in report


# -- generator training ------------------------------------------------------------------
def test_generator_moves_toward_the_released_means(tiny_npz):
    data = load(f"npz:{tiny_npz}")
    synth = create("dp-mepf", "smoke", steps=200, eval_every=50, batch_size=40)
    ctx = FitContext(PrivacyLedger(10.0, 1e-5), NoiseSource(0), run=None, seed=0, method="dp-mepf")
    synth.fit(data, None, ctx)
    m1, m2 = synth.released.means(True, synth._nonneg_first())
    with ctx.seeded_init("model"):  # the generator's initial weights (from the run's seed stream)
        fresh = synth._new_generator()

    def distance(gen: torch.nn.Module) -> float:
        return released_distance(gen, synth.extractor, m1, m2, synth.config.z_dim, 40, synth.device)

    before, after = distance(fresh), distance(synth.sample_generator)
    assert after < 0.5 * before
    assert synth.train_info["best_distance"] == pytest.approx(distance(synth.sample_generator), rel=1e-5)
    out = synth.sample(20, np.arange(20) % 10, seed=1)
    assert out.images.shape == (20, 28, 28, 1) and out.images.dtype == np.uint8
    assert [e.label for e in ctx.ledger.events] == [rel.LABEL_FIRST, rel.LABEL_COUNTS]


# -- VGG weights from a torchvision-style state dict -------------------------------------
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def _torchvision_style_vgg19() -> nn.Module:
    """The layer layout of torchvision's vgg19().features, written out independently."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    return model


def test_vgg19_state_dict_loads_and_reproduces_features(tmp_path):
    torch.manual_seed(0)
    ref = _torchvision_style_vgg19().eval()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    assert len([k for k in state if k.endswith(".weight")]) == 16
    pth = tmp_path / "vgg19.pth"
    torch.save({**state, "classifier.6.bias": torch.zeros(3)}, pth)  # extra keys are ignored
    x = _images(3)[:, :, :, :]
    # reference forward: torchvision-style preprocessing, conv outputs before ReLU
    z = ((x + 1) / 2).repeat(1, 3, 1, 1)
    z = (z - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    z = F.interpolate(z, size=(32, 32), mode="bilinear", align_corners=False)
    ref_maps = []
    with torch.no_grad():
        for layer in ref.features:
            out = layer(z)
            if isinstance(layer, nn.Conv2d):
                ref_maps.append(out)
            z = out
    trunk, meta = load_trunk(pth, tap="pre", resize=32)
    assert isinstance(trunk, VGGTrunk) and trunk.layer_names()[-1] == "conv5_4" and len(trunk.layer_names()) == 16
    with torch.no_grad():
        maps = trunk(x)
    for name, r in zip(trunk.layer_names(), ref_maps, strict=True):
        torch.testing.assert_close(maps[name], r, rtol=1e-4, atol=1e-4)
    # saved as safetensors (bare file and a features directory): the same features come back
    layers = ("conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4")
    ext = FeatureExtractor([trunk], layers, (1,), second_moment=True)
    f1, f2 = ext(x)
    from safetensors.torch import save_file

    save_file(trunk.vgg_state_dict(), str(tmp_path / "vgg.safetensors"))
    save_feature_net(tmp_path / "vggdir", trunk, {"note": "test"})
    for src in (tmp_path / "vgg.safetensors", tmp_path / "vggdir"):
        again, _ = load_trunk(src, tap="pre", resize=32)
        g1, g2 = FeatureExtractor([again], layers, (1,), second_moment=True)(x)
        torch.testing.assert_close(g1, f1)
        torch.testing.assert_close(g2, f2)
    assert torch.allclose(f1.norm(dim=1), torch.ones(3))


def test_bad_feature_weights_are_input_errors(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="safetensors"):
        load_trunk(bad)
    with pytest.raises(InputError, match="not found"):
        load_trunk(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "nobias.pth")
    with pytest.raises(InputError, match="bias"):
        load_trunk(tmp_path / "nobias.pth")
    with pytest.raises(InputError, match="feature_path"):
        create("dp-mepf", "smoke", features="path")


@pytest.mark.parametrize("key,value", [("cell_bits", 7), ("cell_bits", -2), ("cell_directions", "nearest"),
                                       ("cell_noise", 0.0), ("weight_centres", -1.0)])
def test_bad_cell_settings_are_input_errors(key, value):
    with pytest.raises(InputError, match=key):
        create("dp-mepf", "smoke", **{key: value})
    create("dp-mepf", "smoke", cell_bits=0, **({key: value} if key in ("cell_noise", "weight_centres") else {}))


# -- end to end through the command line -------------------------------------------------
class _Crash(Exception):
    pass


def test_cli_fit_crash_resume_sample(tiny_npz, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original_grid = DPMEPF._grid

    def crashing_grid(self, gen, path, per_class=10):
        if Path(path).name == "grid-0000020.png":
            raise _Crash
        return original_grid(self, gen, path, per_class)

    fit_args = ["fit", "dp-mepf", "--data", f"npz:{tiny_npz}", "--epsilon", "1", "--preset", "smoke",
                "--run-dir", str(run)]
    monkeypatch.setattr(DPMEPF, "_grid", crashing_grid)
    with pytest.raises(_Crash):  # killed after the step-10 checkpoint
        main(fit_args)
    monkeypatch.setattr(DPMEPF, "_grid", original_grid)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["step"] == 10 and not state["finished"]
    events_before = json.loads((run / "privacy.json").read_text())["events"]

    code, out, err = cli(capsys, *fit_args, "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["epsilon"] <= 1.0 + 1e-9
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["events"] == events_before  # no second release on resume
    assert [e["label"] for e in privacy["events"]] == [rel.LABEL_FIRST, rel.LABEL_COUNTS]
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["step"] == 30 and state["finished"]
    report = (run / "report.md").read_text()
    assert "add or remove one image" in report and "per-class sums of unit-norm" in report

    res = dpimages("sample", str(run), "--n", "25", "--out", str(tmp_path / "s.npz"))  # a fresh process
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (25, 28, 28, 1) and z["images"].dtype == np.uint8
        assert np.bincount(z["labels"], minlength=10).min() >= 2

    # resuming a finished run changes nothing; a fresh fit into it is refused
    code, _, err = cli(capsys, *fit_args, "--resume")
    assert code == 0, err
    assert json.loads((run / "privacy.json").read_text())["events"] == events_before
    code, _, err = cli(capsys, *fit_args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not empty" in err


@pytest.mark.parametrize("overrides", [[], ["cell_bits=2"], ["features=random+scatter", "labeller=filter"]])
def test_resumed_fit_equals_uninterrupted_fit(tiny_npz, tmp_path, monkeypatch, overrides):
    data = load(f"npz:{tiny_npz}")
    straight = fit_run("dp-mepf", data, epsilon=1.0, run_dir=tmp_path / "a", preset="smoke", overrides=overrides,
                       progress=False, insecure_seeded_noise=True)
    original_grid = DPMEPF._grid

    def crashing_grid(self, gen, path, per_class=10):
        if Path(path).name == "grid-0000020.png":
            raise _Crash
        return original_grid(self, gen, path, per_class)

    monkeypatch.setattr(DPMEPF, "_grid", crashing_grid)
    with pytest.raises(_Crash):
        fit_run("dp-mepf", data, epsilon=1.0, run_dir=tmp_path / "b", preset="smoke", overrides=overrides,
                progress=False, insecure_seeded_noise=True)
    monkeypatch.setattr(DPMEPF, "_grid", original_grid)
    resumed = fit_run("dp-mepf", data, epsilon=1.0, run_dir=tmp_path / "b", preset="smoke", overrides=overrides,
                      resume=True, progress=False, insecure_seeded_noise=True)
    assert resumed.synthesizer.cells == straight.synthesizer.cells == (4 if "cell_bits=2" in overrides else 1)
    assert [e.label for e in resumed.ledger.events] == [e.label for e in straight.ledger.events]
    a, b = straight.synthesizer.state_dict(), resumed.synthesizer.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_cli_features_train_then_fit_with_path(tiny_npz, tmp_path, capsys):
    feat = tmp_path / "feat"
    code, out, err = cli(capsys, "features", "train", "--public", "digits", "--out", str(feat), "--channels", "8,16",
                         "--epochs", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["trained_on"] == "digits"
    assert (feat / "weights.safetensors").exists() and (feat / "features.json").exists()
    code, _, err = cli(capsys, "fit", "dp-mepf", "--data", f"npz:{tiny_npz}", "--epsilon", "2", "--preset", "smoke",
                       "--run-dir", str(tmp_path / "run"), "features=path", f"feature_path={feat}", "steps=10")
    assert code == 0, err
    code, _, err = cli(capsys, "fit", "dp-mepf", "--data", f"npz:{tiny_npz}", "--epsilon", "2", "--preset", "smoke",
                       "--run-dir", str(tmp_path / "run2"), "features=public")
    assert code == 2 and "--public" in err and len(err.strip().splitlines()) == 1


def test_public_features_trained_at_fit_time(tiny_npz, tmp_path):
    data = load(f"npz:{tiny_npz}")
    public = ImageData(data.images[:50].copy(), data.labels[:50].copy(), data.classes, "toy-public")
    res = fit_run("dp-mepf", data, public=public, epsilon=5.0, run_dir=tmp_path / "r", preset="smoke",
                  overrides=["features=public", "steps=10"], progress=False)
    assert res.synthesizer.train_info["features"]["source"] == "public"
    assert "toy-public" in (tmp_path / "r" / "report.md").read_text()


def test_time_budget_stops_training_and_still_finishes(tiny_npz, tmp_path):
    res = fit_run("dp-mepf", f"npz:{tiny_npz}", epsilon=1.0, run_dir=tmp_path / "r", preset="smoke",
                  overrides=["steps=100000", "max_minutes=0.002"], progress=False)
    state = json.loads((tmp_path / "r" / "checkpoints" / "state.json").read_text())
    assert state["finished"] and 1 <= state["step"] < 100000
    metrics = res.run.read_metrics()
    assert any(m.get("event") == "time_budget_reached" for m in metrics)
    assert res.synthesizer.sample(10).images.shape == (10, 28, 28, 1)
    # times only for the whole training (train_done), never per step
    done = [m for m in metrics if m.get("event") == "train_done"]
    assert len(done) == 1 and done[0]["steps"] == state["step"] and {"train_s", "steps_per_s"} <= done[0].keys()
    assert not any("train_s" in m for m in metrics if "loss" in m)
