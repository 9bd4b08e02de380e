"""What a user may share: no unkeyed fingerprint, no private image, export, and resume that cannot under-count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dpimages.api import fit_run
from dpimages.cli import main
from dpimages.data import load
from dpimages.privacy.noise import NoiseSource

ROOT = Path(__file__).resolve().parents[2]
SMALL = f"npz:{ROOT / 'tests' / 'corpus' / 'small-valid.npz'}"
HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
SHAREABLE = ("privacy.json", "report.md", "config.yaml", "metrics.jsonl")


def mepf(run: Path, *extra: str) -> list[str]:
    return ["fit", "dp-mepf", "--data", SMALL, "--epsilon", "2", "--preset", "smoke", "--run-dir", str(run), "--json",
            "steps=6", "checkpoint_every=3", "eval_every=3", *extra]


def shareable_files(root: Path) -> list[Path]:
    files = [root / name for name in SHAREABLE if (root / name).exists()]
    for sub in ("samples", "model"):
        if (root / sub).is_dir():
            files += [f for f in (root / sub).rglob("*") if f.is_file()]
    return files


def test_shareable_files_hold_no_fingerprint_and_export_copies_only_them(tmp_path, capsys):
    torch.set_num_threads(1)
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(mepf(run)) == 0, capsys.readouterr().err
    private = load(SMALL)
    secret = private.fingerprint.removeprefix("sha256:").encode()
    for f in shareable_files(run):
        data = f.read_bytes()
        assert secret not in data and not HEX64.search(data), f  # no unkeyed fingerprint, no 64-hex digest
    assert "fingerprint" not in (run / "config.yaml").read_text()
    assert not (run / "samples" / "eval.closest_pairs.png").exists()
    report = (run / "report.md").read_text()
    for needle in ("N is treated as public", "Fashion-MNIST", "without noise", "floating point", "os-csprng"):
        assert needle in report, needle

    capsys.readouterr()
    assert main(["export", str(run), str(out)]) == 0, capsys.readouterr().err
    names = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert "MANIFEST" in names and "model/weights.safetensors" in names and "privacy.json" in names
    assert not any(n.startswith(("checkpoints", "private-eval")) for n in names)
    manifest = (out / "MANIFEST").read_text()
    for n in names:
        if n != "MANIFEST":
            assert f"  {n}  " in manifest, n  # every file is listed with why it may be shared
    for f in shareable_files(out):
        assert secret not in f.read_bytes(), f
    # the exported weights are the sampling model: the same samples as the run directory's
    from safetensors.torch import load_file

    from dpimages.api import load_synthesizer

    synth = load_synthesizer(run, "cpu")
    exported = load_file(str(out / "model" / "weights.safetensors"))
    assert exported.keys() == synth.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in synth.state_dict().items())
    # refusals: a non-empty target, an unfinished or missing run
    assert main(["export", str(run), str(out)]) == 2
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_evaluation_against_private_data_goes_to_private_eval(tmp_path):
    """The memorization check shows private images: it is written under private-eval/, labelled owner only."""
    from dpimages.eval import EvalOptions, evaluate
    from dpimages.eval.splits import load_real

    d = load("digits")
    order = np.random.default_rng(0).permutation(len(d))
    for name, idx in (("train", order[:600]), ("test", order[600:1000])):
        part = d.subset(idx, name)
        np.savez(tmp_path / f"{name}.npz", images=part.images, labels=part.labels, classes=np.array(part.classes))
    real = load_real(f"npz:{tmp_path / 'train.npz'}", f"npz:{tmp_path / 'test.npz'}")
    res = fit_run("dp-mepf", real.train, epsilon=2.0, delta=1e-4, run_dir=tmp_path / "run", preset="smoke",
                  overrides=["steps=4"], progress=False)
    samples = res.synthesizer.sample(200, res.synthesizer.balanced_labels(200))
    evaluate(samples, real, artifacts=res.run.private_eval_prefix(), options=EvalOptions(smoke=True))
    pe = res.run.private_eval_dir
    assert (pe / "eval.closest_pairs.png").exists() and "Owner only" in (pe / "README.txt").read_text()
    assert not list(res.run.samples_dir.glob("eval*"))


def test_export_copies_the_allow_list_only_and_evaluate_writes_private_images_in_private_eval_only(tmp_path, capsys):
    """Finding 5 of issue 34: `evaluate --out RUN/samples/e.json` wrote a closest-pairs PNG of private images into
    samples/, and export shipped whatever lay there. Now evaluate refuses any --out outside a private-eval/ folder,
    and export copies only what the run recorded as shareable when it wrote it."""
    torch.set_num_threads(1)
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(mepf(run)) == 0, capsys.readouterr().err
    samples = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "50", "--out", str(samples)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(samples), "--real", SMALL, "--test", SMALL, "--smoke",
                 "--out", str(run / "samples" / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "private-eval/" in err[0]
    assert not list((run / "samples").glob("e*"))
    (run / "samples" / "dropped.png").write_bytes(b"\x89PNG private pixels")  # not written by the run
    assert main(["export", str(run), str(out)]) == 0, capsys.readouterr().err
    exported = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert "samples/dropped.png" not in exported
    recorded = json.loads((run / "shareable.json").read_text())["files"]
    assert {n for n in exported if n not in ("MANIFEST", "model/weights.safetensors", "model/model.json")} == {
        n for n in recorded if (run / n).exists()}
    assert any(n.startswith("samples/grid") for n in exported)
    (run / "shareable.json").unlink()  # a run without the list (before issue 34) is refused
    assert main(["export", str(run), str(tmp_path / "export2")]) == 2
    assert "no list of shareable files" in capsys.readouterr().err


def test_privacy_json_and_the_report_list_every_public_fact(tmp_path, capsys):
    """Finding 6 of issue 34: N, class names, image shape, the data set's name and timings are public facts."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(mepf(run)) == 0, capsys.readouterr().err
    private = load(SMALL)
    public = json.loads((run / "privacy.json").read_text())["assumptions"]["public"]
    assert public["dataset_size"] == len(private) and public["classes"] == list(private.classes)
    assert public["image_shape"] == list(private.image_shape) and public["data_name"] == private.name
    assert "timings" in public
    report = (run / "report.md").read_text()
    for key in ("dataset_size", "classes", "image_shape", "data_name", "timings"):
        assert f"  - {key}: " in report, key


def test_resume_without_its_ledger_or_behind_its_checkpoint_is_refused(tiny_npz, tmp_path, capsys):
    """Resume refuses what it cannot account for (exit 2, one line, nothing spent)."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    fit = ["fit", "dpdm", "--data", f"npz:{tiny_npz}", "--epsilon", "10", "--preset", "smoke", "--run-dir", str(run),
           "epochs=1.5", "steps_per_run=3", "grid_every=100"]
    assert main(fit) == 0, capsys.readouterr().err
    ledger = (run / "privacy.json").read_text()
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["noise_rng"]["ledger_steps"] == 3 and not state["finished"]

    (run / "privacy.json").unlink()
    capsys.readouterr()
    assert main([*fit, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "privacy.json is missing" in err[0]
    assert not (run / "privacy.json").exists()  # nothing written, nothing spent

    behind = json.loads(ledger)
    behind["events"][0]["steps"] = 1  # a ledger that under-counts what the checkpoint saw
    (run / "privacy.json").write_text(json.dumps(behind))
    assert main([*fit, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint records 3 ledger steps" in err[0]

    (run / "privacy.json").write_text(ledger)
    (run / "checkpoints" / "data-check.json").write_text(json.dumps({"key": "00" * 32, "hmac": "0" * 64}))
    assert main([*fit, "--resume"]) == 2
    assert "different data set" in capsys.readouterr().err


def test_a_resumed_secure_run_neither_replays_nor_skips_a_release(tiny_npz, tmp_path, monkeypatch):
    """Secure noise across a pause and resume: one fresh draw per ledger step, none repeated, none missing."""
    torch.set_num_threads(1)
    draws: list[torch.Tensor] = []
    original = NoiseSource.standard_normal

    def record(self: NoiseSource, shape: tuple[int, ...]) -> torch.Tensor:
        assert self.secure  # the default run's noise comes from the OS CSPRNG
        z = original(self, shape)
        draws.append(z.clone())
        return z

    monkeypatch.setattr(NoiseSource, "standard_normal", record)
    kw = {"epsilon": 10.0, "run_dir": tmp_path / "run", "preset": "smoke", "progress": False,
          "overrides": ["epochs=1.5", "steps_per_run=4", "grid_every=100"]}
    planned = round(1.5 * 200 / 32)
    first = fit_run("dpdm", f"npz:{tiny_npz}", **kw)
    assert sum(e.steps for e in first.ledger.events) == len(draws) == 4
    while not json.loads((tmp_path / "run" / "checkpoints" / "state.json").read_text())["finished"]:
        resumed = fit_run("dpdm", f"npz:{tiny_npz}", resume=True, **kw)
    steps = sum(e.steps for e in resumed.ledger.events)
    assert steps == len(draws) == planned  # every planned step released once: none skipped, none added
    assert len({z.numpy().tobytes() for z in draws}) == len(draws)  # no noise vector used twice
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["noise_source"] == "os-csprng" and privacy["events"][0]["steps"] == planned


@pytest.mark.parametrize("flag", [[], ["--insecure-seeded-noise"]])
def test_fit_prints_its_noise_source(tmp_path, capsys, flag):
    torch.set_num_threads(1)
    assert main([*mepf(tmp_path / "r"), *flag]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["noise_source"] == ("seeded-insecure" if flag else "os-csprng")
