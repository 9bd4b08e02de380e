"""DPAF's section of report.md: the networks, the releases and their noise, post-processing (public facts only)."""

from __future__ import annotations

from typing import Any

from dpimages.methods.dpaf.config import DPAFConfig
from dpimages.privacy.ledger import NEIGHBOURING_TEXT


def report_section(cfg: DPAFConfig, t: dict[str, Any]) -> str:
    """The section from the config and the run's `train_info` (schedule, noise, released counts, times)."""
    noise = t["noise"]
    n = t["dataset_size"]
    lines = [
        f"DPAF (Lin et al., 2023): a label-conditional {cfg.generator} generator ({t.get('params_g', 0):,} "
        f"parameters) against a discriminator split into f1 (conv blocks {list(cfg.d_channels)} with GroupNorm, "
        f"{t['params_f1']:,} parameters, {t['feature_dim']}-dimensional features) and f2 (convs "
        f"{list(cfg.f2_channels)} and a projection head, {t['params_f2']:,} parameters).",
        "",
        f"- Privacy: neighbouring relation {NEIGHBOURING_TEXT} (add/remove); budget split by a common noise "
        f"scale {t['scale']:.5g} (f1 share {cfg.f1_share:g}, counts share {cfg.counts_share:g}), calibrated "
        "for the target epsilon before any private access and reserved in the ledger.",
        f"- Class counts, released once with noise multiplier {noise['counts']:.5g} (sensitivity 1): "
        f"{t.get('noisy_counts')}.",
    ]
    if cfg.aggregation:
        lines += [
            f"- Feature aggregation: {cfg.cycles * cfg.agg_steps} releases of per-class (x{cfg.agg_groups} "
            f"groups) sums of f1 features clipped to C_f = {cfg.feature_clip:g}, each on a Poisson sample "
            f"(rate {t['sample_rate_agg']:.5g}, expected {cfg.agg_batch} of {n} images), noise multiplier "
            f"{noise['agg']:.5g}, sensitivity C_f (classes and groups are disjoint).",
            f"- f1: {cfg.cycles * cfg.f1_steps} DP-SGD steps (rate {t['sample_rate_f1']:.5g}, expected batch "
            f"{cfg.f1_batch}, clip {cfg.grad_clip:g}, noise multiplier {noise['f1']:.5g}) on the linearised "
            "discriminator loss whose targets come from released aggregates only.",
            f"- Asymmetric schedule: {cfg.cycles} cycles of {cfg.agg_steps} aggregation releases (each followed by "
            f"{cfg.f2_steps} f2 and {cfg.g_steps} generator update(s)) and {cfg.f1_steps} f1 steps. f2 and the "
            "generator are trained on released aggregates and generated images only: post-processing.",
        ]
    else:
        lines += [
            f"- Ablation (aggregation=false): the whole discriminator f2(clip(f1(x))) trained with DP-SGD, "
            f"{cfg.cycles * cfg.agg_steps} steps (rate {t['sample_rate_plain']:.5g}, expected batch "
            f"{cfg.plain_batch}, clip {cfg.grad_clip:g}, noise multiplier {noise['d']:.5g}), each followed by "
            f"{cfg.g_steps} generator update(s).",
        ]
    lines += [
        f"- Post-processing: Adam (G {cfg.lr_g:g}, f1/D {cfg.lr_f1:g}, f2 {cfg.lr_f2:g}, beta1 {cfg.beta1:g}); "
        f"samples from an EMA ({cfg.ema:g}) of the generator; training time {t.get('train_s', 0.0):.0f} s.",
        "- Logged during training: f2's losses on released aggregates and on fakes, the generator loss, noisy "
        "gradient norms; times only for a whole run (paused, train_done); never a loss, batch size or step time "
        "computed on private data.",
    ]
    return "\n".join(lines)
