"""report.md for a run: what was trained, the privacy spent, metrics, grids."""

from __future__ import annotations

import json
from typing import Any

from dpimages.privacy.ledger import ASSUMPTIONS_TEXT, PUBLIC_FACTS_TEXT
from dpimages.runs import Run

SEEDED_WARNING = (
    "> **NOT PRIVATE: seeded-insecure noise.** This run drew its privacy noise and Poisson sampling from "
    "`--seed` (`--insecure-seeded-noise`, for tests). Anyone who knows the seed can recompute the noise and "
    "subtract it: the guarantee below does not hold for them. Do not share its outputs as private."
)

ASSUMPTIONS = [
    f"- neighbouring relation: {ASSUMPTIONS_TEXT}",
    "- presets: the preset values were chosen by comparing runs on Fashion-MNIST (that selection is in no "
    "ledger); on your data they are fixed and do not depend on it. Any choice you make by looking at results on "
    "your private data is a privacy cost that no ledger counts",
    "- evaluation: figures computed against the private data (accuracy on a private split, FID against private "
    "features, closest pairs, memorization) use it without noise; they are outside the guarantee and live in "
    "`private-eval/` (owner only)",
    "- floating point: Gaussian noise is sampled in floating point (float64, rounded to the release's dtype), "
    "which leaves the known attack surface of floating-point noise (Mironov 2012), as in Opacus",
]

SHAREABLE = ("Shareable (no private data without noise): `report.md`, `privacy.json`, `config.yaml`, "
             "`metrics.jsonl`, `samples/`; `dpimages export RUN OUT` copies them with the DP model weights and a "
             "MANIFEST. Owner only: `checkpoints/` (training state and the keyed data check) and `private-eval/`.")


def render_report(run: Run, method_section: str = "") -> str:
    """Markdown report built from the run directory's own files (config, ledger, metrics, grids)."""
    cfg = run.read_config()
    privacy = json.loads(run.privacy_path.read_text()) if run.privacy_path.exists() else {}
    noise_source = privacy.get("noise_source", cfg.get("noise_source", "seeded-insecure"))
    lines = [SEEDED_WARNING, ""] if noise_source != "os-csprng" else []
    lines += [
        f"# dpimages run: {cfg.get('method')} on {cfg.get('data')}",
        "",
        f"- preset: `{cfg.get('preset')}`, seed {cfg.get('seed')} (initialisation, data split and generator "
        "sampling only)",
        f"- privacy noise and Poisson sampling: `{noise_source}`"
        + (" (the operating system's CSPRNG)" if noise_source == "os-csprng" else " (NOT private, see above)"),
        f"- private data: {cfg.get('data')} ({cfg.get('dataset_size')} images)",
        f"- public data: {cfg.get('public') or 'none'}",
        f"- versions: {cfg.get('versions')}",
        "",
        "## Privacy",
        "",
        *ASSUMPTIONS,
    ]
    public = privacy.get("assumptions", {}).get("public", {}) if isinstance(privacy.get("assumptions"), dict) else {}
    if public:
        lines += ["- public facts (published, not protected by the guarantee):"]
        lines += [f"  - {k}: {public[k]} ({PUBLIC_FACTS_TEXT.get(k, '')})" for k in public]
    if privacy:
        lines += [
            f"- budget: epsilon {privacy['epsilon_budget']:g}, delta {privacy['delta']:g}",
            f"- spent: epsilon **{privacy['epsilon']:.4f}** (PLD), {privacy['epsilon_rdp']:.4f} (RDP cross-check)"
            + ("" if privacy.get("epsilon_exact", True) else " — upper bound (run not finished)"),
            "",
            "| release | kind | noise multiplier | sample rate | steps |",
            "|---|---|---|---|---|",
        ]
        for e in privacy["events"]:
            lines.append(
                f"| {e.get('label') or '-'} | {e['kind']} | {e['noise_multiplier']:.5g} | "
                f"{e.get('sample_rate', '-')} | {e['steps']} |"
            )
        lines += ["", "Recompute independently: `python benchmarks/recompute_epsilon.py " f"{run.path}`"]
        lines += budget_lines(privacy)
    lines += ["", "## Sharing", "", SHAREABLE]
    if method_section:
        lines += ["", "## Method", "", method_section.strip()]
    metrics = [m for m in run.read_metrics() if m.get("step", -1) >= 0]
    if metrics:
        last = metrics[-1]
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items() if k != "time"
        )
        lines += ["", "## Last logged metrics", "", shown]
    grids = sorted(rel for rel in run.shareable() if rel.startswith("samples/") and (run.path / rel).is_file())
    if grids:
        lines += ["", "## Samples", "", f"![samples]({grids[-1]})"]
    return "\n".join(lines) + "\n"


def budget_lines(privacy: dict[str, Any]) -> list[str]:
    """Markdown lines stating the book's total after the run and, for a tuned run, what the tuning paid and chose."""
    lines: list[str] = []
    book = privacy.get("budget_book")
    if isinstance(book, dict):
        lines += [
            "", "## Budget book", "",
            f"- data set `{book['budget']}` in the owner's budget book, after this run: epsilon "
            f"**{book['epsilon_total']:.4f}** of {book['epsilon_budget']:g} at delta {book['delta']:g} "
            f"(PLD composition of the events of all {book['runs']} runs on it; RDP "
            f"{book.get('epsilon_total_rdp', float('nan')):.4f}); the naive sum of the runs' epsilons would be "
            f"{book['epsilon_sum']:.4f}",
        ]
    tuning = privacy.get("tuning")
    if isinstance(tuning, dict):
        lines += [
            "", "## Tuning", "",
            f"- {len(tuning['candidates'])} candidate configurations of {tuning['method']} (preset "
            f"`{tuning['preset']}`), each fitted on a content-keyed training split (public N "
            f"{tuning['train_size_public']}) at epsilon {tuning['epsilon_per_candidate']:.4g}, each scored by the "
            f"held-out images (fraction {tuning['heldout_fraction']:g}, public size {tuning['heldout_size_public']}) "
            f"that a {tuning['score_classifier']} trained on its samples classifies correctly, released with "
            f"Gaussian noise (noise multiplier {tuning['score_noise_multiplier']:.4g}, sensitivity 1)",
            "- chosen by report-noisy-max: the largest noisy score; every candidate's events and every score "
            "release are in this run's ledger, so its epsilon is the whole tuning's",
            "",
            "| candidate | settings | noisy correct | noisy accuracy |",
            "|---|---|---|---|",
        ]
        for i, c in enumerate(tuning["candidates"]):
            mark = " (chosen)" if i == tuning["chosen"] else ""
            settings = ", ".join(f"{k}={v}" for k, v in c["overrides"].items()) or "preset"
            lines.append(f"| c{i}{mark} | {settings} | {c['noisy_correct']:.1f} | {c['noisy_accuracy']:.4f} |")
    return lines
