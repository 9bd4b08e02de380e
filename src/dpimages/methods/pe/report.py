"""PE's section of report.md, written from the run's public facts (``train_info``) and its config.

It states the privacy contract of `release`: T noisy vote histograms of L2
sensitivity 1, calibrated before any private access; everything after each
histogram is post-processing.
"""

from __future__ import annotations

from typing import Any

from dpimages.methods.pe.config import PEConfig
from dpimages.privacy.ledger import NEIGHBOURING_TEXT


def _api_text(api: dict[str, Any]) -> str:
    if api.get("kind") == "diffusion":
        arch = api.get("arch") or {}
        fingerprint = api.get("public_fingerprint")
        source = (f"without privacy on the public set **{api.get('trained_on')}** ({fingerprint})" if fingerprint
                  else f"on **{api.get('trained_on')}** (post-processing: no further privacy cost)")
        return (f"our own EDM U-Net diffusion model ({api.get('parameters') or '?'} parameters, channels "
                f"{arch.get('channels')}, multipliers {arch.get('channel_mult')}) trained {source}, loaded "
                f"from `{api.get('path')}` ({api.get('sha256')}); random: {api.get('sampler')} sampler, "
                f"{api.get('sample_steps')} steps; variation: SDEdit from sigma(degree), "
                f"ceil(degree x {api.get('variation_steps')}) steps")
    if api.get("kind") == "diffusers":
        return (f"a local diffusers pipeline `{api.get('pipeline')}` from `{api.get('path')}` "
                f"({api.get('sha256')}); random: {api.get('random_mode')}; variation: img2img "
                f"(strength = degree)")
    return f"a custom API ({api})"


def _features_text(cfg: PEConfig, feat: dict[str, Any]) -> str:
    if feat.get("source") == "public":
        return (f"a conv net ({list(cfg.feature_channels)}) trained on the public set {feat.get('public')} "
                f"({feat.get('epochs')} epochs, public validation accuracy "
                f"{feat.get('public_val_accuracy', float('nan')):.3f})")
    if feat.get("source") == "path":
        return f"weights from `{feat.get('path')}` ({feat.get('sha256')})"
    return f"a seeded random conv net (seed {feat.get('seed')})"


def _prior_lines(cfg: PEConfig, prior: dict[str, Any] | None) -> list[str]:
    if not prior:
        return []
    return [f"- DP prior (`api=dp-prior`): a {prior.get('method')} fit (preset {cfg.prior_preset}) on the private "
            f"data with epsilon {prior.get('epsilon_share', 0.0):.4g} (share {cfg.prior_share:g} of the budget, "
            f"calibrated on its own; releases: {'; '.join(prior.get('events', []))}); the API was trained on "
            f"{cfg.prior_images:,} of its samples. The vote noise was then calibrated over the prior's events and "
            "the votes together (one PLD composition), and all of it was reserved before any private access."]


def report_text(cfg: PEConfig, num_classes: int, image_shape: tuple[int, int, int], info: dict[str, Any]) -> str:
    """API, public data, feature network, releases and schedule."""
    h, w, c = image_shape
    degrees = info.get("degrees", [])
    t = info.get("iterations", 0)
    lost = info.get("lost_releases")
    lines = [
        f"PE (Private Evolution; Lin et al., ICLR 2024) on {h}x{w}x{c} images, {num_classes} classes. "
        + ("No model is trained on private data: the private images only vote." if not info.get("prior") else
           "The API is trained on samples of a DP prior (post-processing); otherwise the private images only "
           "vote."),
        "",
        f"- Generative-model API: {_api_text(info.get('api', {}))}.",
        *_prior_lines(cfg, info.get("prior")),
        f"- Vote embeddings: {_features_text(cfg, info.get('features', {}))}; layers "
        f"{list(cfg.feature_layers) or 'all'}, pooling {list(cfg.feature_pool)}, dimension "
        f"{info.get('embedding_dim')}, unit norm. Never trained on private data.",
        f"- Privacy: neighbouring relation {NEIGHBOURING_TEXT} (add/remove). Released: {t} noisy vote "
        f"histograms over the population of {num_classes} x {info.get('population_per_class')} samples "
        f"(per-class histograms concatenated: classes are disjoint, so one image changes one bin by 1; L2 "
        f"sensitivity 1), each a Gaussian mechanism with noise multiplier {info.get('noise_multiplier', 0):.5g} "
        f"calibrated with dp-accounting PLD for the target epsilon before any private access. Synthetic "
        "labels are uniform: the private class sizes are not released and cost no budget.",
        f"- Evolution: {t} iterations, lookahead k = {info.get('lookahead')} (mean embedding of k variations), "
        f"threshold H = {info.get('threshold', 0):.4g} ({cfg.threshold_sigmas:g} x the noise std), resampling "
        f"in proportion to the thresholded noisy counts per class, variation degrees "
        f"{', '.join(f'{d:.3g}' for d in degrees)}. Everything after each noisy histogram is post-processing.",
        f"- Fit time {info.get('train_s', 0):.0f} s"
        + (f"; {lost} release(s) recorded before a crash and not redone" if lost else "") + ".",
        f"- Sampling: the final population ({num_classes * int(info.get('population_per_class', 0))} images); "
        f"larger requests add variations of degree {degrees[-1] if degrees else float('nan'):.3g} of its "
        "members (post-processing).",
    ]
    return "\n".join(lines)
