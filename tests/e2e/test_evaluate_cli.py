"""`dpimages evaluate` and `dpimages bench` from the command line: results, bad input, nothing written on error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpimages.cli import main


def _npz(path: Path, n: int = 200, shape: tuple = (28, 28, 1), labels: object = "balanced", **extra) -> Path:
    arrays = {"images": np.zeros((n, *shape), np.uint8), **extra}
    if isinstance(labels, str):
        arrays["labels"] = np.arange(n, dtype=np.int64) % 10
    elif labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


BAD_INPUTS = {
    "no_images": (dict(images=None), "no array named 'images'"),
    "wrong_size": (dict(shape=(32, 32, 1)), "(32, 32, 1)"),
    "labels_missing": (dict(labels=None), "labels missing"),
    "labels_out_of_range": (dict(labels=np.arange(200, dtype=np.int64) % 12), "labels must be in [0, 10)"),
    "too_few_per_class": (dict(n=95), "at least 10 per class"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2_one_line_nothing_written(case, tmp_path, capsys) -> None:  # noqa: ANN001
    kwargs, needle = BAD_INPUTS[case]
    path = tmp_path / "syn.npz"
    if kwargs.get("images", 0) is None:
        np.savez(path, pictures=np.zeros((200, 28, 28, 1), np.uint8), labels=np.arange(200) % 10)
    else:
        _npz(path, **kwargs)
    (tmp_path / "private-eval").mkdir()
    before = _files(tmp_path)
    code = main(["evaluate", str(path), "--real", "fashion-mnist", "--out", str(tmp_path / "private-eval" / "res.json"),
                 "--smoke"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert _files(tmp_path) == before


def test_bad_options_are_refused_before_work(tmp_path, capsys) -> None:  # noqa: ANN001
    path = _npz(tmp_path / "syn.npz")
    for args, needle in [
        (["--out", str(tmp_path / "res.txt")], "--out must end in .json"),
        (["--out", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--out", str(tmp_path / "r.json")], "must lie in a folder named private-eval/"),
        (["--classifiers", "vgg"], "--classifiers must be one of"),
        (["--fid-weights", str(tmp_path / "nope.pth")], "file not found"),
    ]:
        before = _files(tmp_path)
        assert main(["evaluate", str(path), "--real", "fashion-mnist", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
        assert _files(tmp_path) == before


def test_evaluate_json_smoke_end_to_end(tmp_path) -> None:  # noqa: ANN001
    from dpimages.data import load

    test = load("fashion-mnist:test")
    path = tmp_path / "real_test.npz"
    np.savez(path, images=test.images[:3000], labels=test.labels[:3000], classes=np.array(test.classes))
    out = tmp_path / "private-eval" / "res.json"  # its files show private images: owner only
    out.parent.mkdir()
    res = subprocess.run([sys.executable, "-m", "dpimages", "evaluate", str(path), "--real", "fashion-mnist",
                          "--smoke", "--json", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    for key in ("acc_cnn", "acc_mlp", "acc_logreg", "fid", "kid", "precision", "recall", "feature_net",
                "memorization"):
        assert key in printed
    assert all(0 <= printed[k] <= 1 for k in ("acc_cnn", "acc_mlp", "acc_logreg"))
    assert printed["acc_cnn"] > 0.6 and printed["fid"] < 1.0
    assert printed["feature_net"].startswith("evalcnn-v")
    assert printed["memorization"]["flagged"] is False
    assert json.loads(out.read_text())["fid"] == printed["fid"]
    assert (out.parent / "res.grid.png").exists() and (out.parent / "res.closest_pairs.png").exists()


def test_bench_refuses_unknown_method_and_existing_run_dir(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["bench", "--methods", "no-such-method", "--out", str(tmp_path / "results")]) == 2
    assert "unknown method" in capsys.readouterr().err
    (tmp_path / "runs" / "real-eps1-smoke").mkdir(parents=True)
    (tmp_path / "runs" / "real-eps1-smoke" / "x").write_text("")
    assert main(["bench", "--methods", "real", "--epsilons", "1", "--preset", "smoke",
                 "--out", str(tmp_path / "results")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    assert main(["bench", "--table", "--out", str(tmp_path / "results")]) == 2
    assert "no results file" in capsys.readouterr().err
