"""`evaluate`: downstream accuracy, fidelity, memorization and a sample grid for labelled synthetic images.

Works on image arrays only (never imports a method). Order of work: every
input check first (so bad input writes nothing), then classifiers, feature
network and fidelity, memorization, grid. The result is one JSON-ready dict
whose keys are those of a benchmark results line (acc_cnn, acc_mlp,
acc_logreg, fid, kid, precision, recall, feature_net, memorization) plus the
details: how each classifier was selected, sample sizes, timings.

``smoke=True`` evaluates on small subsets with few epochs: for tests, no
quality claim (the result says ``"mode": "smoke"``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpimages import __version__
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.eval.classifiers import default_specs, train_classifier, wrn_specs
from dpimages.eval.feature_nets import FeatureNet, eval_feature_net, inception_feature_net
from dpimages.eval.fidelity import feature_stats, frechet_distance, kid, precision_recall
from dpimages.eval.grid import save_grid
from dpimages.eval.memorization import memorization_report
from dpimages.eval.splits import RealData, load_real
from dpimages.runs import check_private_eval_path

MIN_PER_CLASS = 10
CLASSIFIER_SETS = ("default", "wrn")
SMOKE_LIMITS = {"train": 5000, "val": 1000, "test": 2000, "fidelity": 2000, "memorization": 1000}
RESULT_KEYS = ("acc_cnn", "acc_mlp", "acc_logreg", "fid", "kid", "precision", "recall", "feature_net", "memorization")


@dataclass
class EvalOptions:
    """How to evaluate: classifier protocol, feature network, smoke mode, seed, device, threads."""

    classifiers: str = "default"
    fid_weights: str | None = None
    smoke: bool = False
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    progress: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    pr_max_n: int = 10000


def validate_synthetic(data: ImageData, image_shape: tuple[int, int, int], num_classes: int, real_name: str,
                       min_per_class: int = MIN_PER_CLASS) -> None:
    """Refuse synthetic data the evaluation cannot use; messages name shapes, dtypes and counts only."""
    if data.labels is None:
        raise InputError(f"{data.name}: labels missing: evaluation needs an integer array 'labels' of shape (N,)")
    if data.image_shape != tuple(image_shape):
        raise InputError(f"{data.name}: images have shape (H, W, C) = {data.image_shape}, but {real_name} "
                         f"images have {tuple(image_shape)}")
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"{data.name}: labels must be in [0, {num_classes}) for {real_name}, "
                         f"got values in [{lo}, {hi}]")
    counts = np.bincount(data.labels, minlength=num_classes)
    if counts.min() < min_per_class:
        k = int(counts.argmin())
        raise InputError(f"{data.name}: class {k} has {int(counts[k])} images; evaluation needs at least "
                         f"{min_per_class} per class")


def machine_description(device: torch.device) -> str:
    """Where the numbers were measured: accelerator name or CPU model, cores and torch threads."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _subset(data: ImageData, limit: int | None, seed: int) -> ImageData:
    if limit is None or len(data) <= limit:
        return data
    index = np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False))
    return data.subset(index)


def _fidelity(fnet: FeatureNet, synthetic: ImageData, real: RealData, opts: EvalOptions,
              log: Callable[[str], None]) -> dict:
    syn = _subset(synthetic, SMOKE_LIMITS["fidelity"] if opts.smoke else None, opts.seed)
    log(f"features of {len(real.train)} real training images ({fnet.name}; cached after the first time)")
    ref = fnet.reference_features(real.train)
    log(f"features of {len(syn)} synthetic images")
    feats = fnet(syn.images)
    if not np.isfinite(feats).all():
        raise InputError(f"{synthetic.name}: the feature network produced non-finite features")
    mu_r, s_r = feature_stats(ref)
    mu_s, s_s = feature_stats(feats)
    kid_size = min(opts.kid_subset_size, len(ref), len(feats), 500 if opts.smoke else len(feats))
    kid_mean, kid_std = kid(ref, feats, n_subsets=10 if opts.smoke else opts.kid_subsets, subset_size=kid_size,
                            seed=opts.seed)
    pr_n = min(opts.pr_max_n, SMOKE_LIMITS["fidelity"]) if opts.smoke else opts.pr_max_n
    precision, recall = precision_recall(ref, feats, k=opts.pr_k, max_n=pr_n, seed=opts.seed)
    return {
        "fid": frechet_distance(mu_s, s_s, mu_r, s_r), "kid": kid_mean, "kid_std": kid_std,
        "precision": precision, "recall": recall,
        "fidelity_detail": {"n_synthetic": len(syn), "n_real": len(ref), "real_reference": real.train.name,
                            "kid_subsets": 10 if opts.smoke else opts.kid_subsets, "kid_subset_size": kid_size,
                            "pr_k": opts.pr_k, "pr_n": min(pr_n, len(ref), len(feats)), "feature_dim": fnet.dim},
    }


def _downstream(synthetic: ImageData, real: RealData, opts: EvalOptions, device: torch.device,
                emit: Callable[[str], None], timings: dict[str, float]) -> tuple[dict, dict, dict[str, int]]:
    """Classifiers trained on the synthetic images, each epoch chosen on the validation split, tested once on the
    test split: (accuracies, per-classifier details, split sizes)."""
    lim = SMOKE_LIMITS if opts.smoke else dict.fromkeys(SMOKE_LIMITS)
    train = _subset(synthetic, lim["train"], opts.seed)
    val, test = _subset(real.val, lim["val"], opts.seed), _subset(real.test, lim["test"], opts.seed)
    specs = default_specs(opts.smoke) + (wrn_specs(opts.smoke) if opts.classifiers == "wrn" else [])
    result, details = {}, {}
    for spec in specs:
        emit(f"training {spec.name} on {len(train)} synthetic images (up to {spec.epochs} epochs)")
        r = train_classifier(spec, (train.images, train.labels), (val.images, val.labels),
                             (test.images, test.labels), real.num_classes, seed=opts.seed, device=device,
                             progress=emit)
        emit(f"{spec.name}: test accuracy {r.test_acc:.4f} (best validation epoch {r.best_epoch})")
        details[spec.name] = r.to_dict()
        result[f"acc_{spec.name}"] = r.test_acc
        timings[f"classifier_{spec.name}_s"] = r.seconds
    if opts.classifiers == "wrn":
        best = max(("wrn", "resnet"), key=lambda n: details[n]["val_acc"])  # chosen on validation only
        result["acc_dpimagebench"], result["dpimagebench_arch"] = details[best]["test_acc"], best
    return result, details, {"n_classifier_train": len(train), "n_val": len(val), "n_test": len(test)}


def _memorization(synthetic: ImageData, real: RealData, opts: EvalOptions, pairs: Path | None,
                  emit: Callable[[str], None]) -> dict:
    """Each synthetic image's distance to its nearest private training image against held-out real images'."""
    mem_syn = _subset(synthetic, SMOKE_LIMITS["memorization"] if opts.smoke else None, opts.seed)
    heldout = _subset(real.test, SMOKE_LIMITS["memorization"] if opts.smoke else None, opts.seed)
    emit(f"memorization: nearest of {len(real.train)} private images for {len(mem_syn)} synthetic "
         f"and {len(heldout)} held-out images")
    report = memorization_report(mem_syn.images, real.train.images, heldout.images, pairs_png=pairs)
    report["heldout_set"] = real.test.name
    return report


def evaluate(
    synthetic: ImageData,
    real: RealData | str,
    *,
    artifacts: str | Path | None = None,
    options: EvalOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate labelled synthetic images against `real` (a `RealData` or a ``--real`` spec).

    `artifacts` is a path prefix for the PNGs: ``PREFIX.grid.png`` (samples
    per class) and ``PREFIX.closest_pairs.png`` (memorization; shows private
    images, do not publish). With None no file is written except the
    evaluation network cache.
    """
    opts = options or EvalOptions()
    t_start = time.time()
    if opts.classifiers not in CLASSIFIER_SETS:
        raise InputError(f"--classifiers must be one of {', '.join(CLASSIFIER_SETS)}, got {opts.classifiers!r}")
    real = load_real(real) if isinstance(real, str) else real
    validate_synthetic(synthetic, real.image_shape, real.num_classes, real.train.name)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    emit = log or ((lambda msg: print(f"[evaluate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
                   if opts.progress else (lambda msg: None))
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    prefix = None if artifacts is None else Path(artifacts)
    pairs = None if prefix is None else check_private_eval_path(  # before any work: it shows private images
        prefix.with_name(prefix.name + ".closest_pairs.png"), "the closest-pairs image")
    try:
        # the user's Inception weights are checked before any work is done
        fnet_inception = inception_feature_net(opts.fid_weights, device=device) if opts.fid_weights else None
        timings: dict[str, float] = {}
        # 1. downstream classifiers: train on synthetic, select on validation, test once
        result, details, sizes = _downstream(synthetic, real, opts, device, emit, timings)
        # 2. fidelity in the feature space of one named network
        t = time.time()
        fnet = fnet_inception or eval_feature_net(real.train, real.val, device=device, log=emit)
        timings["feature_net_s"] = round(time.time() - t, 2)
        t = time.time()
        result.update(_fidelity(fnet, synthetic, real, opts, emit))
        result["feature_net"] = fnet.name
        result["feature_net_info"] = fnet.info
        timings["fidelity_s"] = round(time.time() - t, 2)
        # 3. memorization against the private training images, with real held-out images as the yardstick
        t = time.time()
        result["memorization"] = _memorization(synthetic, real, opts, pairs, emit)
        timings["memorization_s"] = round(time.time() - t, 2)
        # 4. a grid of samples per class
        result["grid_png"] = None if prefix is None else str(save_grid(
            prefix.with_name(prefix.name + ".grid.png"), synthetic.images, synthetic.labels, real.num_classes))
        timings["total_s"] = round(time.time() - t_start, 2)
        result.update({
            "classifiers": details, "classifier_protocol": opts.classifiers, "mode": "smoke" if opts.smoke else "full",
            "n_synthetic": len(synthetic), **sizes, "real": real.spec, "val_set": real.val.name,
            "test_set": real.test.name, "seed": opts.seed, "device": machine_description(device),
            "dpimages_version": __version__, "timings": timings,
        })
        ordered = {k: result.get(k) for k in RESULT_KEYS}
        return {**ordered, **{k: v for k, v in result.items() if k not in ordered}}
    finally:
        torch.set_num_threads(old_threads)
