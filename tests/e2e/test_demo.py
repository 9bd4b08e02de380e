"""`python -m dpimages.demo` (what `make demo` runs): a real dp-mepf fit, its ledger, images and utility printed."""

from __future__ import annotations

import json

import numpy as np

from dpimages import demo
from dpimages.data import load


def test_demo_fits_dp_mepf_and_prints_where_everything_is(tmp_path, capsys) -> None:  # noqa: ANN001
    d = load("digits")
    order = np.random.default_rng(0).permutation(len(d))
    for name, idx in (("train", order[:1200]), ("test", order[1200:])):
        part = d.subset(idx, name)
        np.savez(tmp_path / f"{name}.npz", images=part.images, labels=part.labels, classes=np.array(part.classes))
    code = demo.main(["--data", f"npz:{tmp_path / 'train.npz'}", "--test-data", f"npz:{tmp_path / 'test.npz'}",
                      "--preset", "smoke", "--epsilons", "1,10", "--delta", "1e-4", "--n-samples", "500",
                      "--out", str(tmp_path / "runs"), "--threads", "1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "epsilon (PLD)" in out and "epsilon (RDP)" in out and "synthetic images" in out
    ledgers = sorted((tmp_path / "runs").glob("demo-dp-mepf-eps*/privacy.json"))
    assert len(ledgers) == 2
    for f in ledgers:
        led = json.loads(f.read_text())
        assert led["epsilon"] <= led["epsilon_budget"] + 1e-9 and led["delta"] == 1e-4
        assert str(f.parent) in out
        with np.load(f.parent / "samples" / "demo.npz") as z:
            assert z["images"].shape == (500, 28, 28, 1) and z["images"].dtype == np.uint8


def test_demo_bad_epsilon_is_one_line_exit_2(capsys) -> None:  # noqa: ANN001
    assert demo.main(["--epsilons", "ten", "--data", "digits", "--test-data", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epsilons" in err
