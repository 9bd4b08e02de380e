"""`dpimages bench`: a suite run end to end (smoke), results lines, report sections, tables and plot."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from dpimages import api
from dpimages.bench import suite
from dpimages.cli import main
from dpimages.config import PRESETS, MethodConfig
from dpimages.data import ImageData


@dataclasses.dataclass
class _NoiseConfig(MethodConfig):
    presets: ClassVar[dict] = {p: {} for p in PRESETS}


class _NoiseSynth(api.Synthesizer):
    """Test stand-in for a method: reads no private pixels, samples uniform noise."""

    name = "test-noise"
    Config = _NoiseConfig
    description = "uniform noise (tests only)"

    def fit(self, private: ImageData, public: ImageData | None, ctx: api.FitContext) -> None:
        from dpimages.scatter_classifier import ScatterClassifier

        self.num_classes, self.image_shape, self.classes = private.num_classes, private.image_shape, private.classes
        self.labeller = ScatterClassifier(self.image_shape, self.num_classes)  # untrained: public facts only

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        images = np.random.default_rng(seed).integers(0, 256, (n, *self.image_shape), dtype=np.uint8)
        return ImageData(images, labels, list(self.classes), self.name)


def test_bench_smoke_run_writes_lines_reports_and_table(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(api.METHOD_CLASSES, "test-noise", f"{__name__}:_NoiseSynth")
    out = tmp_path / "results"
    lines = suite.run_bench("fmnist", ["test-noise", "real"], [1.0], out,
                            options=suite.BenchOptions(preset="smoke", n_samples=1000, progress=False))
    assert [ln["method"] for ln in lines] == ["test-noise", "real"]
    saved = [json.loads(t) for t in (out / "fmnist.jsonl").read_text().splitlines()]
    assert saved == lines
    for line in saved:
        assert set(suite.RESULT_KEYS) <= set(line)
        assert line["run_dir"] == str(tmp_path / "runs" / f"{line['method']}-eps1-smoke")
        assert line["eval_mode"] == "smoke" and line["peak_mem_mb"] > 0 and line["date"].endswith("Z")
        assert line["fits"] == 1 and line["run_dirs"] == [line["run_dir"]] and line["seeds"] == [0]
        assert line["acc_cnn_sd"] is None and line["fid_sd"] is None
    noise, real = saved
    assert noise["noise_source"] == "os-csprng" and real["noise_source"] == "none"
    assert noise["epsilon_spent"] == 0.0 and noise["n_samples"] == 1000  # spent nothing: never read private data
    assert noise["fid"] > 10 * real["fid"] and noise["acc_cnn"] < 0.3 < real["acc_cnn"]
    assert real["epsilon_spent"] is None and real["memorization"]["flagged"] is True
    run = tmp_path / "runs" / "test-noise-eps1-smoke"
    assert {"privacy.json", "config.yaml", "report.md"} <= {p.name for p in run.iterdir()}
    assert "## Benchmark evaluation" in (run / "report.md").read_text()
    assert (run / "private-eval" / "eval.grid.png").exists()
    # a run's DP classifier is scored on the held-out real images, for the owner only
    scored = json.loads((run / "private-eval" / "labeller.json").read_text())
    assert scored["n_test"] == 10000 and 0.0 <= scored["accuracy"] <= 1.0
    assert "labeller" not in (run / "shareable.json").read_text() and "labeller" not in json.dumps(noise)

    md, md_path, png = suite.write_table(out)
    assert md_path.read_text().startswith("# Benchmark results: fmnist") and png.exists()
    assert "| test-noise (smoke eval) | smoke | 1 | 0 |" in md
    assert "(seeded)" not in md and " ± " not in md  # secret noise, one fit each: plain numbers
    # the generator row saved a 10x10 class grid of its synthetic images, shown in the gallery; `real` saved none
    from PIL import Image

    grid = out / "grids" / "test-noise-eps1-smoke.png"
    assert noise["grid"] == str(grid) and real.get("grid") is None
    assert Image.open(grid).size == (10 * 30 + 2, 10 * 30 + 2)  # ten 28x28 images per class row, 2-pixel gaps
    assert "## Gallery" in md and "![test-noise epsilon 1](grids/test-noise-eps1-smoke.png) | - |" in md


def test_bench_repeats_write_one_line_with_mean_and_sd(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setitem(api.METHOD_CLASSES, "test-noise", f"{__name__}:_NoiseSynth")
    out = tmp_path / "results"
    args = ["bench", "--methods", "test-noise", "--epsilons", "1", "--preset", "smoke", "--n-samples", "200",
            "--out", str(out), "--seed", "5"]
    assert main([*args, "--repeats", "2"]) == 0
    assert "1 results lines (2 fits each)" in capsys.readouterr().out
    (line,) = [json.loads(t) for t in (out / "fmnist.jsonl").read_text().splitlines()]
    runs = [str(tmp_path / "runs" / f"test-noise-eps1-smoke-r{k}") for k in (1, 2)]
    assert line["fits"] == 2 and line["run_dirs"] == runs and line["run_dir"] == runs[0]
    assert line["seeds"] == [5, 6] and line["seed"] == 5 and line["noise_source"] == "os-csprng"
    for key in ("acc_cnn", "acc_mlp", "acc_logreg", "fid"):
        assert line[key] is not None and line[key + "_sd"] is not None and line[key + "_sd"] >= 0
    assert list(line).index("acc_cnn_sd") == list(line).index("acc_cnn") + 1  # the sd sits beside its mean
    for d in runs:
        assert json.loads((tmp_path / d / "privacy.json").read_text())["noise_source"] == "os-csprng"
        assert "of its benchmark cell" in (tmp_path / d / "report.md").read_text()
    assert main([*args, "--repeats", "2"]) == 2  # the run directories exist: refused before any fit

    old = _row("dp-mepf", 10, "n", 0.788)  # a line from before noise_source: it was seeded
    del old["noise_source"], old["fits"]
    with open(out / "fmnist.jsonl", "a") as f:
        f.write(json.dumps(old) + "\n")
    assert main(["bench", "--table", "--out", str(out)]) == 0
    md = (out / "fmnist.md").read_text()
    mean, sd = 100 * line["acc_cnn"], 100 * line["acc_cnn_sd"]
    assert f"| test-noise (smoke eval) | smoke | 1 | 0 | {mean:.1f} ± {sd:.1f} (2) |" in md
    assert f"`{runs[0]}` (+1 more) |" in md and "mean ± sd (R)" in md
    assert "| dp-mepf (seeded) | cpu | 10 | - | 78.8 |" in md and "(seeded): the privacy noise" in md


def _row(method: str, eps: float, net: str | None, acc: float, **kw) -> dict:
    row = {k: None for k in suite.RESULT_KEYS}
    row.update(method=method, preset="cpu", epsilon=eps, delta=1e-5, acc_cnn=acc, feature_net=net, fid=1.5,
               kid=0.01, precision=0.5, recall=0.4, run_dir=f"benchmarks/runs/{method}-eps{eps:g}-cpu",
               device="cpu: test", eval_mode="full", noise_source="none" if method == "real" else "os-csprng",
               fits=1)
    row.update(kw)
    return row


def test_combine_fits_means_sds_and_table_cells() -> None:
    fits = [_row("a", 10, "n", 0.78, acc_mlp=0.70, fit_s=60.0, peak_mem_mb=900.0, seed=0,
                 memorization={"frac_closer_than_heldout_p1": 0.0, "flagged": False, "n_exact_copies": 0}),
            _row("a", 10, "n", 0.80, acc_mlp=0.72, fit_s=70.0, peak_mem_mb=1000.0, seed=1, fid=2.5,
                 run_dir="benchmarks/runs/a-eps10-cpu-r2",
                 memorization={"frac_closer_than_heldout_p1": 0.1, "flagged": True, "n_exact_copies": 3})]
    line = suite.combine_fits(fits)
    assert line["acc_cnn"] == pytest.approx(0.79) and line["acc_cnn_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert line["fid"] == 2.0 and line["fid_sd"] == pytest.approx(0.7071068) and line["acc_logreg_sd"] is None
    assert line["fit_s"] == 65.0 and line["peak_mem_mb"] == 1000.0 and line["epsilon"] == 10
    assert line["memorization"] == {"frac_closer_than_heldout_p1": 0.05, "flagged": True, "n_exact_copies": 3}
    assert line["fits"] == 2 and line["seeds"] == [0, 1] and line["seed"] == 0
    assert line["run_dir"] == fits[0]["run_dir"] and line["run_dirs"][1].endswith("-r2")
    md = suite.render_table([line])
    assert "| a | cpu | 10 | - | 79.0 ± 1.4 (2) | 71.0 ± 1.4 (2) | - |" in md and "| 2 ± 0.7071 (2) |" in md
    single = suite.combine_fits(fits[:1])
    assert single == {**fits[0], "run_dirs": [fits[0]["run_dir"]], "seeds": [0]}  # one fit: the line itself
    assert "| a | cpu | 10 | - | 78.0 | 70.0 |" in suite.render_table([single])
    seeded = _row("a", 1, "n", 0.5, noise_source="seeded-insecure")
    assert "| a (seeded) | cpu | 1 |" in suite.render_table([seeded])
    assert "| real | cpu | 1 |" in suite.render_table([_row("real", 1, "n", 0.9, noise_source=None)])  # no noise


def test_bench_repeat_seeds_and_failed_cell(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    calls = []

    def fake_generator(st, method, eps, opts, run_dir, real, public):  # noqa: ANN001, ANN202
        calls.append((run_dir.name, opts.seed, opts.noise_source))
        if method == "dpdm" and opts.seed == 8:
            raise RuntimeError("diverged")
        run_dir.mkdir(parents=True)
        line = suite._line(st, method, eps, opts, run_dir, None, acc_cnn=0.5 + opts.seed / 100)
        line["noise_source"] = opts.noise_source
        return line, None

    monkeypatch.setattr(suite, "_run_generator", fake_generator)
    monkeypatch.setattr("dpimages.eval.load_real", lambda spec: None)
    opts = suite.BenchOptions(preset="smoke", seed=7, repeats=3, insecure_seeded_noise=True, progress=False)
    with pytest.raises(suite.DPImagesError, match="1 of 2 cells failed: dpdm eps=1 fit 2/3: RuntimeError"):
        suite.run_bench("fmnist", ["dp-mepf", "dpdm"], [1.0], tmp_path / "results", options=opts)
    assert calls == [(f"dp-mepf-eps1-smoke-r{k + 1}", 7 + k, "seeded-insecure") for k in range(3)] + [
        ("dpdm-eps1-smoke-r1", 7, "seeded-insecure"), ("dpdm-eps1-smoke-r2", 8, "seeded-insecure")]
    (line,) = suite.read_results(tmp_path / "results" / "fmnist.jsonl")  # no line for the failed cell
    assert line["method"] == "dp-mepf" and line["fits"] == 3 and line["acc_cnn"] == pytest.approx(0.58)
    assert line["noise_source"] == "seeded-insecure" and line["seeds"] == [7, 8, 9]
    with pytest.raises(suite.InputError, match="--repeats"):
        suite.run_bench("fmnist", ["dp-mepf"], [1.0], tmp_path / "r2", options=suite.BenchOptions(repeats=0))


def test_table_never_mixes_feature_networks_and_keeps_latest() -> None:
    rows = [_row("a", 1, "evalcnn-v1-x", 0.5), _row("a", 1, "evalcnn-v1-x", 0.6),
            _row("b", 10, "inception-v3-pytorch-fid-y", 0.7), _row("dpsgd-classifier", 1, None, 0.8)]
    md = suite.render_table(rows)
    assert md.count("## Fidelity in the feature space of") == 2
    net_a = md.split("`evalcnn-v1-x`")[1].split("##")[0]
    assert "| a |" in net_a and "| b |" not in net_a
    assert "| 60.0 |" in md and "| 50.0 |" not in md  # latest line per (method, preset, epsilon) wins
    assert md.index("| dpsgd-classifier |") < md.index("| a |")  # references first


def test_plot_and_parse_helpers(tmp_path) -> None:  # noqa: ANN001
    rows = [_row("a", 1, "n", 0.5), _row("a", 10, "n", 0.7), _row("real", 1, "n", 0.9)]
    assert suite.plot_accuracy(rows, tmp_path / "p.png").stat().st_size > 1000
    assert suite.parse_list("1, 10", "epsilons", float) == [1.0, 10.0]
    with pytest.raises(suite.InputError, match="--epsilons must be"):
        suite.parse_list("1,x", "epsilons", float)
    assert suite.run_dir_name("dpdm", 1.0, "cpu") == "dpdm-eps1-cpu"


def test_variant_rows_are_separate_and_named() -> None:
    rows = [_row("a", 10, "n", 0.5), _row("a", 10, "n", 0.7, variant="public")]
    md = suite.render_table(rows)
    assert "| a | cpu | 10 |" in md and "| a+public | cpu | 10 |" in md  # the variant does not replace the default
    assert "| 50.0 |" in md and "| 70.0 |" in md
    assert suite.run_dir_name("dp-mepf", 10.0, "cpu", "public") == "dp-mepf+public-eps10-cpu"


def test_bench_checks_overrides_and_variant_before_any_run(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "results"
    bad = [(["dp-mepf"], {"overrides": ("no_such_key=1",)}, "no_such_key"),
           (["dp-mepf"], {"overrides": ("steps=zero",)}, "steps"),
           (["real"], {"public": "mnist-5k"}, "reference method real"),
           (["dp-mepf"], {"variant": "a b"}, "--variant")]
    for methods, kw, msg in bad:
        with pytest.raises(suite.InputError, match=msg):
            suite.run_bench("fmnist", methods, [1.0], out, options=suite.BenchOptions(preset="smoke", **kw))
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_student_accuracy_gets_its_own_table() -> None:
    md = suite.render_table([_row("dpdfd", 10, "n", 0.2, student_test_accuracy=0.345), _row("a", 10, "n", 0.5)])
    section = md.split("## DP student classifiers")[1]
    assert "| dpdfd | cpu | 10 | 34.5 | 20.0 |" in section and "| a |" not in section
    assert "DP student" not in suite.render_table([_row("a", 10, "n", 0.5)])


def test_renamed_rows_say_what_they_were() -> None:
    renamed = _row("a", 10, "n", 0.5, variant="cold", relabelled={"from": "a", "why": "the preset changed"})
    md = suite.render_table([renamed, _row("a", 1, "n", 0.4)])
    assert "| a+cold | cpu | 10 |" in md
    assert "`a+cold` at epsilon 10 was `a`: the preset changed." in md
    assert "Renamed rows" not in suite.render_table([_row("a", 1, "n", 0.4)])


def test_rows_fitted_before_a_privacy_fix_are_marked_and_kept_beside_newer_ones() -> None:
    """A dpdm row dated before issue 34's fix is marked pre-fix (as seeded rows are) and stays beside a newer
    row of the same cell; a dp-mepf row of the same date is not marked; the gallery leaves pre-fix rows out."""
    base = {"preset": "cpu", "epsilon": 10.0, "eval_mode": "full", "feature_net": "f", "noise_source": "os-csprng",
            "acc_cnn": 0.7, "run_dir": "r", "grid": "grids/g.png", "fid": 1.0, "kid": 0.1, "precision": 0.5,
            "recall": 0.5}
    old = {**base, "method": "dpdm", "date": "2026-12-06T14:00:00Z"}
    new = {**base, "method": "dpdm", "date": "2026-12-08T01:00:00Z", "acc_cnn": 0.8}
    other = {**base, "method": "dp-mepf", "date": "2026-12-06T14:00:00Z"}
    assert suite.pre_fix(old) is not None and suite.pre_fix(new) is None and suite.pre_fix(other) is None
    assert len(suite.latest_rows([old, new, other])) == 3
    table = suite.render_table([old, new, other])
    assert "| dpdm (pre-fix) | cpu | 10 |" in table and "| dpdm | cpu | 10 |" in table
    assert "(pre-fix): fitted before a privacy fix" in table and "| dp-mepf (pre-fix)" not in table


def test_the_readme_headline_is_the_rendered_one() -> None:
    """README's first-screen table is `dpimages bench --table`'s headline of the committed results, verbatim."""
    root = Path(__file__).resolve().parents[2]
    rows = suite.read_results(root / "benchmarks" / "results" / "fmnist.jsonl")
    readme = (root / "README.md").read_text()
    start, end = suite.HEADLINE_MARKERS
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block == suite.render_headline(rows)
    assert block == (root / "benchmarks" / "results" / "fmnist_headline.md").read_text()
    for grid in re.findall(r'src="([^"]+)"', block):
        assert (root / grid).is_file(), grid
