"""The report's lines for privacy.json's ``budget_book`` and ``tuning`` sections (plain data in, markdown out)."""

from __future__ import annotations

from typing import Any


def report_lines(privacy: dict[str, Any]) -> list[str]:
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
