"""report.md for a run: what was trained, the privacy spent, metrics, grids."""

from __future__ import annotations

import json

from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.runs import Run


def render_report(run: Run, method_section: str = "") -> str:
    """Markdown report built from the run directory's own files (config, ledger, metrics, grids)."""
    cfg = run.read_config()
    privacy = json.loads(run.privacy_path.read_text()) if run.privacy_path.exists() else {}
    lines = [
        f"# dpimages run: {cfg.get('method')} on {cfg.get('data')}",
        "",
        f"- preset: `{cfg.get('preset')}`, seed {cfg.get('seed')}, secure RNG: {cfg.get('secure_rng')}",
        f"- private data: {cfg.get('data')} ({cfg.get('dataset_size')} images), "
        f"fingerprint `{cfg.get('data_fingerprint')}`",
        f"- public data: {cfg.get('public') or 'none'}",
        f"- versions: {cfg.get('versions')}",
        "",
        "## Privacy",
        "",
        f"- neighbouring relation: {NEIGHBOURING_TEXT}",
    ]
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
    if method_section:
        lines += ["", "## Method", "", method_section.strip()]
    metrics = [m for m in run.read_metrics() if m.get("step", -1) >= 0]
    if metrics:
        last = metrics[-1]
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items() if k != "time"
        )
        lines += ["", "## Last logged metrics", "", shown]
    grids = sorted(run.samples_dir.glob("*.png")) if run.samples_dir.exists() else []
    if grids:
        lines += ["", "## Samples", "", f"![samples](samples/{grids[-1].name})"]
    return "\n".join(lines) + "\n"
