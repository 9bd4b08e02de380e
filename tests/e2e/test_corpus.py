"""The bad-input corpus (tests/corpus, listed in its README.md): exit code 2, one line, nothing written or spent.

Each case runs the real command line in-process (`dpimages.cli.main`); two run as a separate process to
check that no traceback reaches the user.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpimages.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
ROOT = Path(__file__).resolve().parents[2]

# (data spec relative to the corpus, expected fragment of the one error line)
BAD_DATA = [
    ("fashion-mnist:test@{c}/idx-truncated", "not a readable gzip file"),
    ("fashion-mnist:test@{c}/idx-wrong-magic", "wrong IDX magic number 0x00000801"),
    ("fashion-mnist:test@{c}/idx-huge-dims", "header says shape (60000, 40000, 40000)"),
    ("npz:{c}/nan-float.npz", "'images' must have dtype uint8"),
    ("npz:{c}/nan-labels.npz", "'labels' must be integers"),
    ("npz:{c}/zero-images.npz", "the data set has no images"),
    ("npz:{c}/one-by-one.npz", "between 8 and 1024 pixels per side, got 1x1"),
    ("npz:{c}/huge-dims.npz", "between 8 and 1024 pixels per side, got 2000x2000"),
    ("folder:{c}/folder-non-image", "notes.txt: not a PNG or JPEG file (use --skip-bad"),
    ("folder:{c}/folder-huge-png", "big.png: size 10000x10000 is outside 8..1024 pixels per side"),
]
GOOD = "npz:{c}/small-valid.npz"  # 40 images, 2 classes
# (extra fit arguments, expected fragment); the data is GOOD
BAD_FIT = [
    (["--config", "{c}/bad.yaml"], "bad.yaml: invalid YAML at line 2"),
    (["--config", "{c}/unknown-key.yaml"], "unknown config key 'foo' for DPMEPFConfig"),
    (["foo=1"], "unknown config key 'foo' for DPMEPFConfig"),
    (["batch_size"], "override must look like key=value"),
    (["--epsilon", "-1"], "epsilon must be a finite number > 0, got -1.0"),
    (["--epsilon", "0"], "epsilon must be a finite number > 0"),
    (["--epsilon", "nan"], "epsilon must be a finite number > 0"),
    (["--delta", "0.025"], "delta must be < 1/N = 0.025 for N = 40 images, got 0.025"),
    (["--delta", "0.5"], "delta must be < 1/N = 0.025 for N = 40 images"),
    (["--delta", "1"], "delta"),
    (["--delta", "-1e-5"], "delta"),
    (["--preset", "huge"], "unknown preset 'huge'"),
]


def fmt(s: str) -> str:
    return s.format(c=CORPUS)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, out: str, err: str, needle: str, workdir: Path) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("dpimages: error: ") and needle in lines[0], lines
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in workdir.iterdir()) == [], "something was written"  # no run dir, no ledger


def fit_argv(data: str, run_dir: Path, *extra: str) -> list[str]:
    argv = ["fit", "dp-mepf", "--data", data, "--epsilon", "1", "--preset", "smoke", "--run-dir", str(run_dir),
            "--json"]
    return argv + list(extra)  # later options win in click, so extra may override --epsilon / --preset


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    torch.set_num_threads(1)
    return d


def test_readme_lists_every_corpus_entry():
    readme = (CORPUS / "README.md").read_text()
    entries = {p.name for p in CORPUS.iterdir() if p.name not in ("README.md", "make_corpus.py", "__pycache__")}
    assert entries and all(f"`{e}`" in readme for e in entries), entries
    for _, needle in BAD_DATA + BAD_FIT:
        assert needle in readme, needle


@pytest.mark.parametrize(("spec", "needle"), BAD_DATA, ids=[s.split("/")[-1] for s, _ in BAD_DATA])
def test_bad_data_refused_by_data_and_fit(spec, needle, workdir, capsys):
    assert_refused(*run_cli(capsys, ["data", fmt(spec)]), needle, workdir)
    assert_refused(*run_cli(capsys, fit_argv(fmt(spec), workdir / "run")), needle, workdir)
    assert not (workdir / "run").exists()


@pytest.mark.parametrize(("extra", "needle"), BAD_FIT, ids=[" ".join(e) for e, _ in BAD_FIT])
def test_bad_config_and_budget_refused(extra, needle, workdir, capsys):
    argv = fit_argv(fmt(GOOD), workdir / "run", *[fmt(e) for e in extra])
    assert_refused(*run_cli(capsys, argv), needle, workdir)


def test_resume_of_nothing_and_non_empty_run_dir_refused(workdir, capsys):
    assert_refused(*run_cli(capsys, fit_argv(fmt(GOOD), workdir / "run", "--resume")), "no run to resume", workdir)
    (workdir / "run").mkdir()
    (workdir / "run" / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, fit_argv(fmt(GOOD), workdir / "run"))
    assert code == 2 and "is not empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (workdir / "run").iterdir()) == ["keep.txt"]


def test_skip_bad_counts_the_non_image_files(workdir, capsys):
    code, out, err = run_cli(capsys, ["data", fmt("folder:{c}/folder-non-image"), "--skip-bad", "--json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["size"] == 4 and info["class_counts"] == [2, 2] and info["skipped_bad_files"] == 2


def test_one_class_is_fine_for_data_and_for_a_class_conditional_fit(workdir, capsys):
    """Decision: one class is a valid (degenerate) class-conditional set; the fit runs and samples that class."""
    code, out, err = run_cli(capsys, ["data", fmt("npz:{c}/one-class.npz"), "--json"])
    assert code == 0, err
    assert json.loads(out)["class_counts"] == [40]
    run = workdir / "run"
    code, out, err = run_cli(capsys, fit_argv(fmt("npz:{c}/one-class.npz"), run, "steps=4", "checkpoint_every=2"))
    assert code == 0, err
    assert "Traceback" not in err and 0 < json.loads(out)["epsilon"] <= 1.0
    code, _, err = run_cli(capsys, ["sample", str(run), "--n", "6", "--out", str(workdir / "s.npz")])
    assert code == 0, err
    s = np.load(workdir / "s.npz")
    assert s["images"].shape == (6, 28, 28, 1) and s["labels"].tolist() == [0] * 6
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recompute_epsilon.py"), str(run)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["data", "fashion-mnist:test@{c}/idx-truncated"], "not a readable gzip file"),
        (["fit", "dp-mepf", "--data", "fashion-mnist:test@{c}/idx-huge-dims", "--epsilon", "1", "--preset", "smoke",
          "--run-dir", "run"], "header says shape"),
    ],
    ids=["data-truncated-gzip", "fit-huge-dims"],
)
def test_subprocess_prints_one_line_and_no_traceback(argv, needle, workdir):
    res = subprocess.run([sys.executable, "-m", "dpimages", *[fmt(a) for a in argv]], capture_output=True, text=True,
                         timeout=300, cwd=workdir, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert_refused(res.returncode, res.stdout, res.stderr, needle, workdir)


# Refusals raised inside a method's fit, after fit_run created the run directory but before any release:
# fit_run removes the directory, so nothing is written and the same --run-dir can be used again.
@pytest.mark.parametrize(
    ("method", "data", "extra", "needle"),
    [
        ("dp-mepf", GOOD, ["--epsilon", "1e-9"], "is not reachable"),
        ("dpdm", GOOD, ["batch_size=1000"], "batch_size 1000 is larger than the data set"),
        ("dp-mepf", GOOD, ["features=path", "feature_path=/does/not/exist"], "feature weights not found"),
        ("dpdfd", "npz:{c}/one-class.npz", [], "dpdfd needs at least 2 classes (it distils a classifier), got 1"),
        ("pe", GOOD, [], "needs api_path=DIR"),
    ],
    ids=["unreachable-epsilon", "batch-larger-than-data", "missing-feature-path", "dpdfd-one-class",
         "pe-no-api-path"],
)
def test_method_level_refusal_writes_nothing(method, data, extra, needle, workdir, capsys):
    argv = fit_argv(fmt(data), workdir / "run", *extra)
    argv[1] = method
    assert_refused(*run_cli(capsys, argv), needle, workdir)
