"""Scattering features, the DP scattering classifier, and the DP labeller in dp-mepf's joint plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpimages.api import fit_run
from dpimages.bench.dpsgd_classifier import SCATTER_PRESETS, train_dpsgd_classifier
from dpimages.data import load
from dpimages.data.toy import toy_bars
from dpimages.errors import InputError
from dpimages.methods.labeller import FILTER_ROUNDS, RELEASE_LABEL, label_samples
from dpimages.nets.scattering import Scattering, _kymatio_scattering
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.ledger import epsilon_pld
from dpimages.registry import create


def test_scattering_is_kymatios_transform_a_per_example_map_with_no_parameters():
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    s = Scattering((28, 28), 1)
    out = s(x)
    assert out.shape == (5, 81, 7, 7) and s.out_channels == 81 and list(s.parameters()) == []
    direct = _kymatio_scattering(28, 28, 2, 8)((x + 1) / 2).reshape(5, 81, 7, 7)
    torch.testing.assert_close(out, direct)
    assert (out >= 0).all()  # images mapped to [0, 1]: every coefficient is non-negative
    one_by_one = torch.cat([s(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(s.embed(x, chunk=2), one_by_one)  # no example sees another
    with pytest.raises(InputError, match="divisible by 4"):
        Scattering((30, 30), 1)
    with pytest.raises(InputError, match=r"\(B, 1, 28, 28\)"):
        s(torch.zeros(2, 3, 28, 28))


class _ByBrightness:
    """A stand-in classifier: the label is the first pixel's value mod 10."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        return images[:, 0, 0, 0].astype(np.int64) % 10


def test_relabel_and_filter_only_post_process_the_generators_images():
    rng = np.random.default_rng(0)
    calls = []

    def generate(labels: np.ndarray) -> np.ndarray:
        calls.append(len(labels))
        img = np.zeros((len(labels), 4, 4, 1), np.uint8)
        # agrees with the wanted label half of the time
        img[:, 0, 0, 0] = np.where(rng.random(len(labels)) < 0.5, labels, (labels + 1) % 10)
        return img

    wanted = np.arange(200) % 10
    images, labels = label_samples(_ByBrightness(), "relabel", wanted, generate)
    assert calls == [200] and np.array_equal(labels, images[:, 0, 0, 0] % 10)
    calls.clear()
    images, labels = label_samples(_ByBrightness(), "filter", wanted, generate)
    assert np.array_equal(labels, images[:, 0, 0, 0] % 10)  # every label is the classifier's
    assert (labels == wanted).mean() > 0.99 and len(calls) <= FILTER_ROUNDS and calls[1] < 200


def test_labeller_stage_is_planned_with_the_release_and_the_whole_run_meets_the_target(tmp_path):
    data = toy_bars()
    r = fit_run("dp-mepf", data, epsilon=2.0, run_dir=tmp_path / "run", preset="smoke",
                overrides=["features=random+scatter", "labeller=relabel", "labeller_share=0.4"], progress=False,
                insecure_seeded_noise=True)
    events = r.ledger.events
    info = r.synthesizer.train_info["labeller"]
    assert events[0].label == RELEASE_LABEL and events[0].steps == info["steps"]
    assert [e.label for e in events[1:]][-1].startswith("dp-mepf class counts")
    # the labeller's noise meets its share on its own; the run meets the whole target
    assert epsilon_pld([events[0]], 1e-5) == pytest.approx(0.8, rel=2e-3)
    assert 1.95 < r.ledger.epsilon() <= 2.0 + 1e-9
    report = (tmp_path / "run" / "report.md").read_text()
    assert "DP labeller (relabel)" in report and "epsilon 0.8 (its share" in report
    # its held-out accuracy goes under private-eval/ only
    from dpimages.scatter_classifier import write_heldout_accuracy

    with pytest.raises(InputError, match="private-eval"):
        write_heldout_accuracy(r.synthesizer.labeller, data, tmp_path / "run" / "labeller.json")
    held_out = toy_bars(seed=5)
    path = r.run.private_eval_prefix("labeller").with_suffix(".json")
    scored = write_heldout_accuracy(r.synthesizer.labeller, held_out, path)
    expected = (r.synthesizer.labeller.predict(held_out.images) == held_out.labels).mean()
    assert scored["accuracy"] == pytest.approx(expected) and scored["n_test"] == len(held_out)
    # relabelled samples carry the labeller's labels; a reloaded run samples the same
    s = r.synthesizer.sample(50, seed=3)
    assert np.array_equal(s.labels, r.synthesizer.labeller.predict(s.images))
    from dpimages import load as load_run

    again = load_run(tmp_path / "run").sample(50, seed=3)
    assert np.array_equal(again.images, s.images) and np.array_equal(again.labels, s.labels)


@pytest.mark.parametrize(("key", "value"), [("labeller", "vote"), ("labeller_share", "1"), ("labeller_share", "0"),
                                            ("labeller_batch", "0"), ("features", "wavelets")])
def test_bad_labeller_and_feature_keys_are_input_errors(key, value):
    with pytest.raises(InputError, match=key):
        create("dp-mepf", "smoke", **{key: value})


def test_pe_votes_in_one_feature_network():
    with pytest.raises(InputError, match="random\\+scatter"):
        create("pe", "smoke", features="random+scatter")


def test_reference_row_on_scattering_features_records_one_release():
    d = load("digits")
    order = np.random.default_rng(0).permutation(len(d))
    private, test = d.subset(order[:1400], "digits:train"), d.subset(order[1400:], "digits:test")
    ledger, noise = PrivacyLedger(4.0, 1e-4), NoiseSource(0)
    r = train_dpsgd_classifier(private, test, epsilon=2.0, delta=1e-4, preset="smoke", ledger=ledger, noise=noise,
                               progress=False, features="scatter")
    q, steps = SCATTER_PRESETS["smoke"].steps(len(private))
    assert [(e.label, e.steps, e.sample_rate) for e in ledger.events] == [("dpsgd-classifier+scatter", steps, q)]
    assert noise.gaussian_draws == steps and 1.5 < r["epsilon"] <= 2.0 + 1e-9
    assert r["method"] == "dpsgd-classifier+scatter" and 0.0 <= r["accuracy"] <= 1.0


def test_dpdm_runs_the_labeller_after_its_warm_stage_and_resumes_it_from_the_checkpoint(tmp_path):
    data = toy_bars()
    kw = dict(epsilon=4.0, preset="smoke", overrides=["labeller=filter", "max_steps=3"], progress=False,
              insecure_seeded_noise=True)
    r = fit_run("dpdm", data, run_dir=tmp_path / "run", **kw)
    labels = [e.label for e in r.ledger.events]
    first_dpsgd = next(i for i, lab in enumerate(labels) if lab.startswith("dpdm"))
    assert labels.index(RELEASE_LABEL) < first_dpsgd  # the labeller's steps come before DP-SGD
    assert r.ledger.epsilon() <= 4.0 + 1e-9
    assert "DP labeller (filter)" in (tmp_path / "run" / "report.md").read_text()
    s = r.synthesizer.sample(20, seed=1)
    assert s.name.endswith("(filtered by the DP labeller)")
    resumed = fit_run("dpdm", data, run_dir=tmp_path / "run", resume=True, **kw)
    assert [e.label for e in resumed.ledger.events] == labels  # nothing spent again
    torch.testing.assert_close(resumed.synthesizer.labeller_tensors(), r.synthesizer.labeller_tensors())


def test_dpdfd_dp_sgd_teacher_is_the_whole_plan_and_the_student_steps_release_nothing(tmp_path):
    data = toy_bars()
    kw = dict(epsilon=3.0, preset="smoke", overrides=["teacher=dp-sgd", "labeller=relabel", "steps_per_run=3"],
              progress=False, insecure_seeded_noise=True)
    r = fit_run("dpdfd", data, run_dir=tmp_path / "run", **kw)
    info = r.synthesizer.train_info["dp_teacher"]
    (event,) = r.ledger.events  # the teacher's DP-SGD steps only: no event per student step
    assert event.label == RELEASE_LABEL and event.steps == info["steps"] and info["epsilon_share"] == 3.0
    assert epsilon_pld([event], r.ledger.delta) == pytest.approx(3.0, rel=2e-3)
    assert not (tmp_path / "run" / "student.safetensors").exists()  # paused after 3 of the smoke preset's 8 steps
    for _ in range(2):  # steps 4-6, then 7-8
        resumed = fit_run("dpdfd", data, run_dir=tmp_path / "run", resume=True, **kw)
    assert (tmp_path / "run" / "student.safetensors").exists()
    assert resumed.ledger.events == r.ledger.events  # the teacher was restored, not trained again
    torch.testing.assert_close(resumed.synthesizer.labeller_tensors(), r.synthesizer.labeller_tensors())
    report = (tmp_path / "run" / "report.md").read_text()
    assert "DPDFD with a DP teacher" in report
    assert "It also labels the samples, post-processing: each sample is relabelled" in report
    s = resumed.synthesizer.sample(30, seed=2)
    assert np.array_equal(s.labels, resumed.synthesizer.labeller.predict(s.images))
    from dpimages import load as load_run

    again = load_run(tmp_path / "run").sample(30, seed=2)
    assert np.array_equal(again.images, s.images) and np.array_equal(again.labels, s.labels)


def test_dpdfd_distillation_step_from_a_dp_teacher_is_the_normalised_loss_gradient():
    from dpimages.methods.dpdfd import release as rel
    from dpimages.nets.classifiers import SmallCNN

    torch.manual_seed(0)
    student, teacher = SmallCNN(1, 10, 28, (4, 8), 8), SmallCNN(1, 10, 28, (4, 8), 8)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    step = rel.distillation_step(student, teacher, x, clip_norm=0.5, loss="kl", temperature=2.0)
    loss = rel.distillation_loss(student(x), teacher(x).detach(), "kl", 2.0)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(student.parameters()))])
    torch.testing.assert_close(step, grad * 0.5 / grad.norm(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())


def test_dpdfd_labeller_needs_the_dp_teacher():
    with pytest.raises(InputError, match="teacher=dp-sgd"):
        create("dpdfd", "smoke", labeller="relabel")
    with pytest.raises(InputError, match="teacher"):
        create("dpdfd", "smoke", teacher="ensemble")
