"""The command line: exit codes, one-line errors, JSON outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def dpimages(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpimages", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_clean_error(res: subprocess.CompletedProcess, code: int = 2, needle: str = "") -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert needle in lines[0]


def test_account_epsilon_and_sigma_roundtrip():
    res = dpimages("account", "--sigma", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5", "--json")
    out = json.loads(res.stdout)
    assert out["epsilon_rdp"] == pytest.approx(7.33, abs=0.02) and out["epsilon"] < out["epsilon_rdp"]
    res = dpimages(
        "account",
        "--epsilon",
        str(out["epsilon"]),
        "--sample-rate",
        "0.04",
        "--steps",
        "2250",
        "--delta",
        "1e-5",
        "--json",
    )
    back = json.loads(res.stdout)
    assert back["sigma"] == pytest.approx(1.5, rel=2e-3) and back["epsilon"] <= out["epsilon"] * 1.0001


@pytest.mark.parametrize(
    "args",
    [
        ["account", "--sigma", "-1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
        ["account", "--sigma", "1", "--sample-rate", "1.5", "--steps", "3", "--delta", "1e-5"],
        ["account", "--sigma", "1", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
        ["account", "--sigma", "1", "--sample-rate", "0.1", "--steps", "3"],
        ["account", "--sigma", "abc", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
        ["data", "npz:/does/not/exist.npz"],
        ["data", "imagenet"],
        ["fit", "no-such-method", "--data", "fashion-mnist", "--epsilon", "1", "--run-dir", "r"],
        ["nonsense-command"],
    ],
)
def test_bad_input_exit_2_one_line(args, tmp_path):
    res = dpimages(*args, cwd=tmp_path)
    assert_clean_error(res)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_data_json(tiny_npz):
    res = dpimages("data", f"npz:{tiny_npz}", "--json")
    info = json.loads(res.stdout)
    assert info["size"] == 200 and info["image_shape"] == [28, 28, 1] and info["class_counts"] == [20] * 10
    assert info["fingerprint"].startswith("sha256:")


def test_methods_lists_only_registered():
    res = dpimages("methods", "--json")
    assert res.returncode == 0
    names = [m["name"] for m in json.loads(res.stdout)["methods"]]
    from dpimages.api import METHOD_CLASSES

    assert names == sorted(METHOD_CLASSES)


def test_data_corrupt_npz_named(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, images=np.zeros((3, 28, 28), np.float64))
    assert_clean_error(dpimages("data", f"npz:{p}"), 2, "dtype uint8")
