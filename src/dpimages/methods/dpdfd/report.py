"""DPDFD's part of report.md: what was released, the privacy argument in brief, the student and the generator.

Built from the config and `train_info` only (public choices, the calibrated
noise, counts, times and the student's public test accuracy): nothing about
the teachers beyond how many there are and how often they were trained.
"""

from __future__ import annotations

from typing import Any

from dpimages.methods.dpdfd.config import DPDFDConfig
from dpimages.methods.dpdfd.student import STUDENT_FILE
from dpimages.methods.labeller import classifier_text, use_text
from dpimages.privacy.ledger import NEIGHBOURING_TEXT


def report_text(cfg: DPDFDConfig, t: dict[str, Any]) -> str:
    """The markdown section for `cfg` and the run's `train_info` `t`."""
    acc = t.get("student_test_accuracy")
    acc_text = (f"**{100 * acc:.2f}%** on `{t.get('student_test_set')}` (public test images)" if acc is not None
                else f"not measured ({t.get('student_test_set')})")
    if cfg.teacher == "dp-sgd":
        return _dp_teacher_text(cfg, t, acc_text)
    if cfg.release_space == "parameters":
        space = f"over all {t['student_parameters']:,} student parameters"
        update = (f"the noisy update times {t.get('update_scale', 1.0):.4g} (C over its expected norm, a public "
                  "constant)")
    else:
        space = f"over the student's logits on the batch ({cfg.batch_size} x classes entries)"
        update = "J^T of the noisy logit gradient through the student on the same batch, scaled to norm C"
    teachers = int(t.get("teachers", cfg.teachers))
    trainings = (f" ({t['teacher_trainings']} times: a resumed run retrains {'them' if teachers > 1 else 'it'})"
                 if t.get("teacher_trainings", 0) > 1 else "")
    if teachers > 1:
        what = (f"the sum over {teachers} teachers of each teacher's gradient of the {cfg.loss} distillation loss "
                f"on a synthetic batch of {cfg.batch_size}, flattened {space}, scaled to L2 norm C = "
                f"{cfg.clip_norm:g}")
        argument = (f"The private images are split into {teachers} disjoint shards by a keyed hash of each image "
                    "and its label (a function of the image alone: adding or removing one image changes exactly "
                    "one shard), and one teacher is trained per shard. One image can change one teacher, hence "
                    "one term of the sum, from a vector of norm <= C to another: the sum moves by at most 2C "
                    "whatever the number of teachers, while the signal grows with it. The teachers were trained "
                    f"in memory only{trainings}; they are not in any file of this run, and neither their "
                    "accuracy nor the shard sizes are reported (unaccounted releases). The generator sees the "
                    "student only (post-processing).")
    else:
        what = (f"the gradient of the {cfg.loss} distillation loss on a synthetic batch of {cfg.batch_size}, "
                f"flattened {space}, scaled to L2 norm C = {cfg.clip_norm:g}")
        argument = ("The teacher depends on all private data and no image's influence on it is bounded: the only "
                    "bound is the norm of the released gradient (any two data sets' normalised gradients are at "
                    f"most 2C apart). The teacher was trained in memory only{trainings}; it is not in any file of "
                    "this run and its accuracy is not reported (that would be an unaccounted release). The "
                    "generator sees the student only (post-processing).")
    return "\n".join([
        "DPDFD (data-free distillation after Liu et al.): "
        + (f"{teachers} non-private teachers on disjoint shards" if teachers > 1 else "a non-private teacher")
        + ", a DP student trained only on normalised noisy distillation gradients, and a label-conditional "
        "generator trained against the student.",
        "",
        "### What was released",
        "",
        f"Neighbouring relation: {NEIGHBOURING_TEXT} (add/remove). Released: {t['steps']} student updates, each "
        f"{what}, plus "
        f"N(0, ({t['noise_std']:.5g})^2) per coordinate: one Gaussian event each with L2 sensitivity 2C and "
        f"noise multiplier {t['noise_multiplier']:.5g} (sigma = {t['sigma_methods_md']:.5g} in std = sigma C "
        "terms), calibrated before training for the target epsilon. No subsampling amplification.",
        "",
        argument,
        "",
        "### Student (the DP classifier)",
        "",
        f"- SmallCNN, channels {list(cfg.student_channels)}, hidden {cfg.student_hidden}; SGD lr "
        f"{cfg.student_lr:g}, momentum {cfg.student_momentum:g} on {update}; "
        f"weights in `{STUDENT_FILE}`",
        f"- test accuracy: {acc_text}",
        "",
        *_generator_lines(cfg, t),
        "- Logged: only functions of released values (noisy update norm, generator terms, student test accuracy).",
    ])


def _generator_lines(cfg: DPDFDConfig, t: dict[str, Any]) -> list[str]:
    return [
        "### Generator (post-processing)",
        "",
        f"- {cfg.generator} label-conditional generator, {t['generator_parameters']:,} parameters; Adam lr "
        f"{cfg.gen_lr:g}; {cfg.gen_steps} step(s) after every {cfg.gen_every} student step(s)",
        f"- objective against the fixed student: {cfg.w_ce:g} x cross-entropy to the conditioning label "
        f"- {cfg.w_entropy:g} x per-image entropy - {cfg.w_balance:g} x entropy of the batch-mean prediction "
        f"- {cfg.w_diversity:g} x mode-seeking ratio",
        f"- training time {float(t.get('train_s', 0.0)):.0f} s (teacher {float(t.get('teacher_s', 0.0)):.0f} s)",
    ]


def _dp_teacher_text(cfg: DPDFDConfig, t: dict[str, Any], acc_text: str) -> str:
    """``teacher=dp-sgd``: the DP teacher is the one release; the student and generator are post-processing."""
    info = t["dp_teacher"]
    use = "" if cfg.labeller == "none" else f" It also labels the samples, post-processing: {use_text(cfg.labeller)}."
    return "\n".join([
        "DPDFD with a DP teacher (our variant): a classifier trained with DP-SGD is distilled into a student on "
        "generator batches, without further noise, and a label-conditional generator is trained against the "
        "student.",
        "",
        "### What was released",
        "",
        f"Neighbouring relation: {NEIGHBOURING_TEXT} (add/remove). Released: the teacher, {classifier_text(info)}, "
        f"calibrated to the whole budget (epsilon {info['epsilon_share']:.4g}) and reserved before any private "
        "read. That is the only private read.",
        "",
        f"The student's {t['steps']} steps use the {cfg.loss} distillation loss between the DP teacher and the "
        f"student on synthetic batches of {cfg.batch_size}, its gradient scaled to norm C = {cfg.clip_norm:g}: "
        "post-processing of the teacher, no noise and no ledger events. The teacher's weights are in the "
        "checkpoint (a DP release)." + use,
        "",
        "### Student (the DP classifier)",
        "",
        f"- SmallCNN, channels {list(cfg.student_channels)}, hidden {cfg.student_hidden}; SGD lr "
        f"{cfg.student_lr:g}, momentum {cfg.student_momentum:g}; weights in `{STUDENT_FILE}`",
        f"- test accuracy: {acc_text}",
        "",
        *_generator_lines(cfg, t),
        "- Logged: the distillation step's norm (C), generator terms, student test accuracy.",
    ])
