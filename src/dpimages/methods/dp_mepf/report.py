"""DP-MEPF's section of report.md, written from the run's public facts (``train_info``) and its config.

It states the privacy contract of `release`: what was released, with which
noise and sensitivity, and that everything after the release is
post-processing.
"""

from __future__ import annotations

from typing import Any

from dpimages.methods.dp_mepf.config import DPMEPFConfig
from dpimages.methods.labeller import labeller_text
from dpimages.privacy.ledger import NEIGHBOURING_TEXT


def _released_lines(cfg: DPMEPFConfig, k: int, cell_bits: int, rel: dict[str, Any]) -> list[str]:
    d1, d2 = rel["dims"]
    c = 2**cell_bits
    per, rows = ("per-class", f"{k}") if c == 1 else ("per-(class, cell)", f"{k * c} ({k} classes x {c} cells)")
    lines = []
    if rel.get("noise_centres") is not None:
        lines.append(
            f"- cell centres: per-class sums of unit-norm first-moment feature vectors, a {k} x {d1} matrix, "
            f"noise multiplier {rel['noise_centres']:.5g}, and per-class image counts, noise multiplier "
            f"{rel['noise_counts']:.5g}; an image's cell is the sign pattern of the projections of its feature "
            f"vector minus its class's noisy centre onto {cell_bits} direction{'s' if cell_bits > 1 else ''} ("
            + ("towards the class's nearest other noisy centres" if cfg.cell_directions == "neighbours"
               else f"random, public seed {cfg.feature_seed}")
            + "), a function of the image and of released values only"
            + ("; the number of cells was chosen from the planned noise, the feature dimension and the "
               "data set size N (treated as public)" if cfg.cell_bits < 0 else "")
            + ";")
    lines.append(f"- {per} sums of unit-norm first-moment feature vectors: a {rows} x {d1} matrix, noise "
                 f"multiplier {rel['noise_first']:.5g};")
    if rel.get("noise_second") is not None:
        lines.append(f"- {per} sums of unit-norm second-moment feature vectors: a {rows} x {d2} matrix, "
                     f"noise multiplier {rel['noise_second']:.5g};")
    return lines + [
        f"- {per} image counts ({rows} numbers), noise multiplier {rel['noise_counts']:.5g}.",
        "",
        "Budget weights (share of 1/sigma^2) first/second/counts/centres: "
        + "/".join(f"{v:.3f}" for v in rel["weights"])
        + (" (the counts twice)" if rel.get("noise_centres") is not None else "")
        + f"; common scale {rel['scale']:.5g} (calibrated with dp-accounting PLD for the target epsilon).",
    ]


def _features_line(feat: dict[str, Any]) -> str:
    source = feat.get("source")
    if source == "public":
        accuracy = feat.get("public_val_accuracy", float("nan"))
        detail = f" ({feat.get('public')}, public validation accuracy {accuracy:.3f})"
    elif source == "path":
        detail = f" ({feat.get('path')})"
    elif source == "random":
        detail = f" (seeds {feat.get('seeds')})"
    else:
        detail = ""
    return f"- source: {source}{detail}"


def report_text(cfg: DPMEPFConfig, num_classes: int, cell_bits: int, info: dict[str, Any]) -> str:
    """The method's part of report.md: released quantities, neighbouring relation, features, training."""
    lines = [
        f"DP-MEPF: a label-conditional {cfg.generator} generator trained to match noisy per-class means of "
        "unit-norm features.", "",
        "### What was released",
        "",
        f"Neighbouring relation: {NEIGHBOURING_TEXT} (add/remove). Released once each, by Gaussian "
        "mechanisms with L2 sensitivity 1 calibrated together (these releases are the only access to private "
        "data):",
    ]
    if "release" in info:
        lines += _released_lines(cfg, num_classes, cell_bits, info["release"])
    if "labeller" in info:
        lines += ["", labeller_text(info["labeller"])]
    lines += [
        "",
        "Sensitivity: each image's feature vector has norm 1 (clipped to 1); classes (and cells) are "
        "disjoint, so adding or removing one image moves each stacked sum by at most 1 and the counts by 1. "
        "Everything after the release (means = noisy sums / noisy counts, projection onto the set of possible "
        "means, generator training, model selection on the released means only) is post-processing.",
        "", "### Features", "",
        _features_line(info.get("features", {})),
        f"- layers {list(cfg.feature_layers) or 'all'}, pooling {list(cfg.feature_pool)}, tap {cfg.feature_tap}, "
        f"second moment {cfg.second_moment}, channels {list(cfg.feature_channels)}, networks {cfg.feature_nets}",
        "", "### Generator training (post-processing)", "",
        f"- {info.get('steps', 0)} steps, batch {cfg.batch_size}, Adam lr {cfg.lr:g} (decayed to x{cfg.lr_final:g}), "
        f"beta1 {cfg.beta1:g}; {info.get('train_s', 0.0):.0f} s",
        f"- sampling weights: {'closest to the released means' if cfg.select_best else 'last'} (step "
        f"{info.get('best_step', -1)}, distance to the released means {info.get('best_distance', float('nan')):.5f})",
    ]
    return "\n".join(lines)
