"""report.md for a run: what was trained, the privacy spent, metrics, grids."""

from __future__ import annotations

import json

from dpimages.budget.report import report_lines
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
        lines += report_lines(privacy)
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
