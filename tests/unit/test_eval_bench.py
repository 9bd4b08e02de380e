"""`dpimages bench`: a suite run end to end (smoke), results lines, report sections, tables and plot."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest

from dpimages import api
from dpimages.bench import suite
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
        self.num_classes, self.image_shape, self.classes = private.num_classes, private.image_shape, private.classes

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        images = np.random.default_rng(seed).integers(0, 256, (n, *self.image_shape), dtype=np.uint8)
        return ImageData(images, labels, list(self.classes), self.name)


def test_bench_smoke_run_writes_lines_reports_and_table(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(api.METHOD_MODULES, "test-noise", __name__)
    monkeypatch.setitem(api._REGISTRY, "test-noise", _NoiseSynth)
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
    noise, real = saved
    assert noise["epsilon_spent"] == 0.0 and noise["n_samples"] == 1000  # spent nothing: never read private data
    assert noise["fid"] > 10 * real["fid"] and noise["acc_cnn"] < 0.3 < real["acc_cnn"]
    assert real["epsilon_spent"] is None and real["memorization"]["flagged"] is True
    run = tmp_path / "runs" / "test-noise-eps1-smoke"
    assert {"privacy.json", "config.yaml", "report.md"} <= {p.name for p in run.iterdir()}
    assert "## Benchmark evaluation" in (run / "report.md").read_text()
    assert (run / "samples" / "eval.grid.png").exists()

    md, md_path, png = suite.write_table(out)
    assert md_path.read_text().startswith("# Benchmark results: fmnist") and png.exists()
    assert "| test-noise (smoke eval) | smoke | 1 | 0 |" in md


def _row(method: str, eps: float, net: str | None, acc: float, **kw) -> dict:
    row = {k: None for k in suite.RESULT_KEYS}
    row.update(method=method, preset="cpu", epsilon=eps, delta=1e-5, acc_cnn=acc, feature_net=net, fid=1.5,
               kid=0.01, precision=0.5, recall=0.4, run_dir=f"benchmarks/runs/{method}-eps{eps:g}-cpu",
               device="cpu: test", eval_mode="full", **kw)
    return row


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
