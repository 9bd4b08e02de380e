"""DPDFD: the released update's norm and sensitivity, the ledger, no teacher in any output, CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpimages.api import create, fit_run, method_class
from dpimages.cli import main
from dpimages.data import ImageData, load
from dpimages.errors import InputError
from dpimages.methods.dpdfd import release as rel
from dpimages.methods.dpdfd.student import STUDENT_FILE, public_test_set
from dpimages.nets.classifiers import SmallCNN
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger, calibrate_gaussian

EPS = 10.0
SMOKE_STEPS = 8  # the smoke preset's steps: every test uses this schedule, so calibration runs once


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _teacher(data: torch.Tensor, labels: torch.Tensor, seed: int) -> SmallCNN:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return rel.train_teacher(SmallCNN(1, 10, 28, (4, 8), 8), data, labels, steps=12, batch_size=32, lr=3e-3,
                             generator=g)


# -- the released quantity -------------------------------------------------------------------
def test_normalised_gradient_has_norm_c_and_neighbouring_teachers_differ_by_at_most_2c(tiny_npz):
    data = load(f"npz:{tiny_npz}")
    x, y = data.to_tensor(), data.label_tensor()
    keep = torch.arange(len(y)) != 17  # remove one image (add/remove neighbour)
    t1, t2 = _teacher(x, y, 0), _teacher(x[keep], y[keep], 0)
    student = SmallCNN(1, 10, 28, (4, 8), 8)
    synthetic = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for clip in (0.5, 1.0, 3.0):
        for loss in ("kl", "l1"):
            g1 = rel.ensemble_gradient(student, [t1], synthetic, clip_norm=clip, loss=loss, temperature=2.0)
            g2 = rel.ensemble_gradient(student, [t2], synthetic, clip_norm=clip, loss=loss)
            assert g1.shape == (sum(p.numel() for p in student.parameters()),)
            assert float(g1.norm()) == pytest.approx(clip, rel=1e-5)
            assert float(g2.norm()) == pytest.approx(clip, rel=1e-5)
            assert float((g1 - g2).norm()) <= 2 * clip * (1 + 1e-5)
    # the bound is tight: opposite teachers give (almost) opposite directions
    v = torch.randn(1000)
    assert float((rel.normalise(v, 1.0) - rel.normalise(-v, 1.0)).norm()) == pytest.approx(2.0, rel=1e-6)
    assert float(rel.normalise(torch.zeros(5), 1.0).norm()) == 0.0  # zero stays zero: norm <= C still holds
    assert all(p.grad is None for p in student.parameters())  # nothing un-noised left in .grad


def test_output_gradient_release_has_norm_c_sensitivity_2c_and_backprop_is_j_transpose(tiny_npz):
    data = load(f"npz:{tiny_npz}")
    x, y = data.to_tensor(), data.label_tensor()
    keep = torch.arange(len(y)) != 17
    t1, t2 = _teacher(x, y, 0), _teacher(x[keep], y[keep], 0)
    student = SmallCNN(1, 10, 28, (4, 8), 8)
    synthetic = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for clip in (0.5, 2.0):
        for loss in ("kl", "l1"):
            g1 = rel.ensemble_gradient(student, [t1], synthetic, clip_norm=clip, loss=loss, space="outputs")
            g2 = rel.ensemble_gradient(student, [t2], synthetic, clip_norm=clip, loss=loss, space="outputs")
            assert g1.shape == (16 * 10,)  # B x K entries, not one per parameter
            assert float(g1.norm()) == pytest.approx(clip, rel=1e-5)
            assert float((g1 - g2).norm()) <= 2 * clip * (1 + 1e-5)
    assert all(p.grad is None for p in student.parameters())
    # the parameter step is J^T of the released vector (checked against an explicit vector-Jacobian product)
    released = torch.randn(160, generator=torch.Generator().manual_seed(5))
    step = rel.backprop_released(student, synthetic, released, 1.0)
    (student(synthetic) * released.view(16, 10)).sum().backward()
    manual = rel.flat([p.grad for p in student.parameters()])
    assert torch.allclose(step, manual / manual.norm(), atol=1e-6) and float(step.norm()) == pytest.approx(1.0)


def test_parameter_gradients_per_teacher_match_plain_autograd(tiny_npz):
    data = load(f"npz:{tiny_npz}")
    x, y = data.to_tensor(), data.label_tensor()
    teachers = [_teacher(x[i::3], y[i::3], i) for i in range(3)]
    student = SmallCNN(1, 10, 28, (4, 8), 8)
    synthetic = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for loss in ("kl", "l1"):
        rows = rel.teacher_gradients(student, teachers, synthetic, loss=loss, temperature=2.0)
        for i, t in enumerate(teachers):  # the vmapped vector-Jacobian products equal one backward per teacher
            single = rel.distillation_loss(student(synthetic), t(synthetic), loss, 2.0)
            expected = rel.flat(torch.autograd.grad(single, list(student.parameters())))
            torch.testing.assert_close(rows[i], expected, rtol=1e-4, atol=1e-7)
        summed = rel.ensemble_gradient(student, teachers, synthetic, clip_norm=0.5, loss=loss, temperature=2.0)
        torch.testing.assert_close(summed, sum(rel.normalise(r.double(), 0.5) for r in rows))
        assert float(summed.norm()) <= 3 * 0.5 * (1 + 1e-6)
    assert all(p.grad is None for p in student.parameters())


def _fit_context(seed: int = 0):
    from dpimages.api import FitContext

    return FitContext(PrivacyLedger(EPS, 1e-5), NoiseSource(0), seed=seed, progress=False, method="dpdfd")


@pytest.mark.parametrize("space", ["outputs", "parameters"])
def test_neighbouring_data_moves_exactly_one_teacher_term_by_at_most_2c(tiny_npz, space):
    data = load(f"npz:{tiny_npz}")
    synth = create("dpdfd", preset="smoke", teachers=5)
    synth.begin_fit(data, _fit_context())
    key = _fit_context().generator("shards").initial_seed()
    shards = rel.shard_of(data.images, data.labels, 5, key)
    assert len(set(shards.tolist())) == 5  # every shard used (the test would be vacuous otherwise)
    # a split by position would not have this property: the index of every later image shifts
    position = np.arange(len(data)) % 5
    assert (np.delete(position, 17) != np.arange(len(data) - 1) % 5).sum() > 100
    teachers = synth._train_teachers(data, _fit_context(), 0)
    student = SmallCNN(1, 10, 28, (4, 8), 8)
    clip = 1.5
    batches = [torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1 for seed in range(2)]
    for shard in range(5):  # remove one image of each shard in turn (add/remove neighbours)
        removed = int(np.flatnonzero(shards == shard)[0])
        neighbour = data.subset(np.flatnonzero(np.arange(len(data)) != removed))
        # the shards: a function of each image alone; removing one image moves no other image
        np.testing.assert_array_equal(np.delete(shards, removed),
                                      rel.shard_of(neighbour.images, neighbour.labels, 5, key))
        teachers_n = synth._train_teachers(neighbour, _fit_context(), 0)
        for synthetic in batches:
            terms = rel.normalise_rows(rel.teacher_gradients(student, teachers, synthetic, space=space), clip)
            terms_n = rel.normalise_rows(rel.teacher_gradients(student, teachers_n, synthetic, space=space), clip)
            moved = [i for i in range(5) if not torch.equal(terms[i], terms_n[i])]
            assert moved == [shard]  # exactly the removed image's teacher
            assert float((terms - terms_n).norm()) <= 2 * clip * (1 + 1e-12)
            released = rel.ensemble_gradient(student, teachers, synthetic, clip_norm=clip, space=space)
            released_n = rel.ensemble_gradient(student, teachers_n, synthetic, clip_norm=clip, space=space)
            assert 0 < float((released - released_n).norm()) <= 2 * clip * (1 + 1e-12)
            assert float(released.norm()) <= 5 * clip * (1 + 1e-12)
    # each teacher is a function of its shard and the seed only: retraining gives the same weights
    again = synth._train_teachers(data, _fit_context(), 0)
    assert all(torch.equal(a, b) for t, u in zip(teachers, again, strict=True)
               for a, b in zip(t.state_dict().values(), u.state_dict().values(), strict=True))


def test_normalised_rows_have_norm_c_even_for_tiny_or_broken_rows_and_teachers_do_equal_work():
    rows = torch.tensor([[3e-23, 4e-23], [3.0, 4.0], [0.0, 0.0], [float("inf"), 1.0], [float("nan"), 1.0]])
    out = rel.normalise_rows(rows, 2.0)
    assert out.dtype == torch.float64
    norms = out.norm(dim=1)
    assert abs(float(norms[0]) - 2.0) < 1e-12 and abs(float(norms[1]) - 2.0) < 1e-12  # no float32 underflow
    assert norms[2:].tolist() == [0.0, 0.0, 0.0]  # zero and non-finite rows become zero rows (norm <= C)
    # every shard size gives the same work: same number of forward passes on batches of the same shape
    shapes: list[tuple[int, ...]] = []
    for n in (3, 40, 400):
        model = SmallCNN(1, 10, 28, (4, 8), 8)
        model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        rel.train_teacher(model, torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long),
                          steps=rel.teacher_steps(2, 1000, 10, 32), batch_size=32, lr=1e-3,
                          generator=torch.Generator().manual_seed(0))
    assert shapes == [(32, 1, 28, 28)] * 3 * rel.teacher_steps(2, 1000, 10, 32)
    assert rel.teacher_steps(40, 55000, 400, 64) == 86


def test_release_records_a_gaussian_event_with_sensitivity_2c_before_noise():
    ledger = PrivacyLedger(EPS, 1e-5)
    noise = NoiseSource(0)
    v = rel.normalise(torch.randn(50, dtype=torch.float64), 2.0)
    out = rel.release_update(v, clip_norm=2.0, noise_multiplier=3.0, ledger=ledger, noise=noise)
    assert ledger.events == [PrivacyEvent.gaussian(3.0, 1, rel.RELEASE_LABEL)]
    expected = v + NoiseSource(0).standard_normal((50,)) * (3.0 * 2 * 2.0)  # std = s * 2C
    torch.testing.assert_close(out, expected)
    assert noise.gaussian_draws == 1


# -- a whole fit: ledger, and no file depends on the teacher beyond the noisy updates ----------
def _files(run: Path) -> dict[str, object]:
    """Every file of a run, with what may legitimately differ between two fits (times, the data check's key) removed."""
    timing = {"time", "train_s", "teacher_s", "steps_per_s", "fit_s", "created"}
    out: dict[str, object] = {}
    for f in sorted(run.rglob("*")):
        if not f.is_file():
            continue
        rel_name = str(f.relative_to(run))
        if f.name == "data-check.json":  # an HMAC under a fresh random key per run (owner only)
            continue
        if f.suffix == ".safetensors":
            out[rel_name] = {k: v.numpy().tobytes() for k, v in load_file(str(f)).items()}
        elif f.name == "metrics.jsonl":
            out[rel_name] = [{k: v for k, v in json.loads(line).items() if k not in timing}
                             for line in f.read_text().splitlines()]
        elif f.name == "state.json":
            state = json.loads(f.read_text())
            for k in ("train_s", "teacher_s"):
                state["train_info"].pop(k)
            out[rel_name] = state
        elif f.suffix in (".md", ".yaml"):
            out[rel_name] = [line.replace(str(run), "RUN") for line in f.read_text().splitlines()
                             if "training time" not in line and "created" not in line and "train_s" not in line]
        else:
            out[rel_name] = f.read_bytes()
    return out


def test_outputs_depend_on_the_teacher_only_through_the_released_updates(tiny_npz, tmp_path, monkeypatch):
    data = load(f"npz:{tiny_npz}")
    real_release, real_train = rel.release_update, rel.train_teacher
    released: list[torch.Tensor] = []
    teachers: list[torch.nn.Module] = []

    def recording_release(normalised, **kw):
        out = real_release(normalised, **kw)
        released.append(out.clone())
        return out

    def keep_teacher(model, *args, **kw):
        teachers.append(real_train(model, *args, **kw))
        return teachers[-1]

    monkeypatch.setattr(rel, "release_update", recording_release)
    monkeypatch.setattr(rel, "train_teacher", keep_teacher)
    a = fit_run("dpdfd", data, epsilon=EPS, run_dir=tmp_path / "a", preset="smoke", progress=False,
            insecure_seeded_noise=True)

    # the ledger: exactly `steps` Gaussian releases at the calibrated multiplier, meeting the target
    sigma = calibrate_gaussian(EPS, 1e-5, count=SMOKE_STEPS)
    assert a.ledger.events == [PrivacyEvent.gaussian(sigma, SMOKE_STEPS, rel.RELEASE_LABEL)]
    assert len(released) == SMOKE_STEPS
    assert 0.99 * EPS <= a.ledger.epsilon() <= EPS * (1 + 1e-9)
    extras = a.synthesizer.bench_extras()  # the bench line reports the student as report.md does
    assert extras == {k: a.synthesizer.train_info[k] for k in ("student_test_accuracy", "student_test_set")}
    privacy = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert privacy["events"] == [{"kind": "gaussian", "noise_multiplier": sigma, "steps": SMOKE_STEPS,
                                  "label": rel.RELEASE_LABEL}]

    # no teacher tensor in any file: no teacher name, no tensor equal to one of the teacher's
    assert len(teachers) == 3  # the smoke preset's teacher ensemble
    teacher_tensors = [v for teacher in teachers for v in teacher.state_dict().values()]
    for f in (tmp_path / "a").rglob("*.safetensors"):
        for k, v in load_file(str(f)).items():
            assert "teacher" not in k
            assert not any(t.shape == v.shape and torch.equal(t, v) for t in teacher_tensors), (f.name, k)
    meta = json.dumps(a.synthesizer.meta())
    for allowed in ("teacher_s", "teacher_trainings", '"teachers"'):  # a time, a count, the config's number
        meta = meta.replace(allowed, "")
    assert "teacher" not in meta
    files_a = _files(tmp_path / "a")
    samples_a = a.synthesizer.sample(30, seed=1).images

    # changing the teacher's weights after fit changes nothing written or sampled
    with torch.no_grad():
        for teacher in teachers:
            for p in teacher.parameters():
                p.add_(1.0)
    assert _files(tmp_path / "a") == files_a
    np.testing.assert_array_equal(a.synthesizer.sample(30, seed=1).images, samples_a)

    # a different teacher (untrained, other seed) but the same released updates: every file is identical
    replay = iter(released)

    def replaying_release(normalised, **kw):
        real_release(normalised, **kw)  # the ledger records the step as before
        return next(replay).clone()

    def other_teacher(model, *args, **kw):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        return model.eval().requires_grad_(False)

    monkeypatch.setattr(rel, "release_update", replaying_release)
    monkeypatch.setattr(rel, "train_teacher", other_teacher)
    b = fit_run("dpdfd", data, epsilon=EPS, run_dir=tmp_path / "b", preset="smoke", progress=False,
            insecure_seeded_noise=True)
    files_b = _files(tmp_path / "b")
    assert files_b.keys() == files_a.keys()
    for name in files_a:
        assert files_b[name] == files_a[name], name
    np.testing.assert_array_equal(b.synthesizer.sample(30, seed=1).images, samples_a)

    # without replay, the teacher does change the released updates (the test above is not vacuous)
    monkeypatch.setattr(rel, "release_update", recording_release)
    released.clear()
    fit_run("dpdfd", data, epsilon=EPS, run_dir=tmp_path / "c", preset="smoke", progress=False,
            insecure_seeded_noise=True)
    assert _files(tmp_path / "c")[STUDENT_FILE] != files_a[STUDENT_FILE]


# -- command line ------------------------------------------------------------------------------
def test_cli_fit_pause_lost_step_resume_sample(tiny_npz, tmp_path, capsys):
    run = tmp_path / "run"
    fit = ["fit", "dpdfd", "--data", f"npz:{tiny_npz}", "--epsilon", str(EPS), "--preset", "smoke",
           "--run-dir", str(run)]
    code, _, err = cli(capsys, *fit, "steps_per_run=3")
    assert code == 0, err
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["step"] == 3 and state["finished"] is False and "noise_rng" in state
    assert not (run / STUDENT_FILE).exists()
    code, _, err = cli(capsys, "sample", str(run), "--n", "5", "--out", str(tmp_path / "x.npz"))
    assert code == 2 and "no finished checkpoint" in err

    # a crash after a release but before its checkpoint: the ledger holds one step more than the student
    ledger = PrivacyLedger.load(run / "privacy.json")
    (event,) = ledger.events
    ledger.spend(PrivacyEvent.gaussian(event.noise_multiplier, 1, rel.RELEASE_LABEL))
    code, out, err = cli(capsys, *fit, "steps_per_run=3", "--resume", "--json")
    assert code == 0, err
    code, out, err = cli(capsys, *fit, "steps_per_run=3", "--resume", "--json")
    assert code == 0, err
    assert [e.steps for e in PrivacyLedger.load(run / "privacy.json").events] == [SMOKE_STEPS]
    assert 0.99 * EPS <= json.loads(out)["epsilon"] <= EPS * (1 + 1e-9)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["finished"] is True and state["step"] == SMOKE_STEPS
    assert state["train_info"]["teacher_trainings"] == 3  # the teacher is retrained on every resumption
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("event") == "lost_steps" and m["steps"] == 1 for m in metrics)
    assert not any("distill" in k or k.startswith("teacher_acc") for m in metrics for k in m)
    student = load_file(str(run / STUDENT_FILE))
    model = SmallCNN(1, 10, 28, (4, 8), 8)
    model.load_state_dict(student)  # a usable classifier
    assert (run / "samples" / "grid-final.png").exists()
    report = (run / "report.md").read_text()
    assert "add or remove one image" in report and "sensitivity 2C" in report and STUDENT_FILE in report

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "dpimages", "sample", str(run), "--n", "40", "--out",
                          str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (40, 28, 28, 1) and z["images"].dtype == np.uint8
        assert np.bincount(z["labels"], minlength=10).tolist() == [4] * 10

    # resuming a finished run releases nothing more; a fresh fit into it is refused
    code, _, err = cli(capsys, *fit, "steps_per_run=3", "--resume")
    assert code == 0, err
    assert [e.steps for e in PrivacyLedger.load(run / "privacy.json").events] == [SMOKE_STEPS]
    code, _, err = cli(capsys, *fit)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_bad_inputs_and_presets(tmp_path, capsys):
    cls = method_class("dpdfd")
    assert set(cls.Config.presets) == {"smoke", "cpu", "gpu", "gpu-short"}
    assert create("dpdfd", "gpu-short").config.max_minutes <= 10
    for bad in ({"loss": "mse"}, {"steps": "0"}, {"student_channels": "4"}, {"w_entropy": "-1"},
                {"student_momentum": "1"}, {"clip_norm": "0"}, {"teachers": "0"}):
        with pytest.raises(InputError):
            create("dpdfd", "smoke", **bad)
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((20, 8, 8, 1), np.uint8), labels=np.arange(20) % 2,
             classes=np.array(["a", "b"]))
    code, _, err = cli(capsys, "fit", "dpdfd", "--data", f"npz:{small}", "--epsilon", "1", "--preset", "smoke",
                       "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "16x16" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "privacy.json").exists() or not json.loads(
        (tmp_path / "r" / "privacy.json").read_text())["events"]
    # more shards than images (N is public): refused before anything is spent
    few = tmp_path / "few.npz"
    np.savez(few, images=np.zeros((6, 28, 28, 1), np.uint8), labels=np.arange(6) % 2, classes=np.array(["a", "b"]))
    code, _, err = cli(capsys, "fit", "dpdfd", "--data", f"npz:{few}", "--epsilon", "1", "--preset", "smoke",
                       "--run-dir", str(tmp_path / "f"), "teachers=7")
    assert code == 2 and "teachers=7" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f" / "privacy.json").exists() or not json.loads(
        (tmp_path / "f" / "privacy.json").read_text())["events"]


def test_student_is_scored_only_on_fashion_mnist_test():
    images = np.zeros((10, 28, 28, 1), np.uint8)
    labels = np.arange(10)
    other = ImageData(images, labels, [str(i) for i in range(10)], "npz:x.npz")
    assert public_test_set(other)[0] is None
    own_test = ImageData(images, labels, [str(i) for i in range(10)], "fashion-mnist:test")
    assert public_test_set(own_test)[0] is None  # the test split as private data: never scored on itself
    fmnist = ImageData(images, labels, [str(i) for i in range(10)], "fashion-mnist")
    test, why = public_test_set(fmnist)
    if test is None:
        assert "not available" in why
    else:
        assert len(test) == 10000 and test.name == "fashion-mnist:test"
