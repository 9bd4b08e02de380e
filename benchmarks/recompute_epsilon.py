"""Independent check of a run's privacy.json: recompute epsilon with dp-accounting alone.

    python benchmarks/recompute_epsilon.py RUN_DIR [RUN_DIR ...]

Imports nothing from dpimages. Exit code 1 if a ledger's reported epsilon is
below the recomputed one (an under-count) or above its budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def recompute(privacy: dict) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-4,
    )
    for event in privacy["events"]:
        mechanism: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(float(event["noise_multiplier"]))
        if event["kind"] == "subsampled_gaussian":
            mechanism = dp_accounting.PoissonSampledDpEvent(float(event["sample_rate"]), mechanism)
        elif event["kind"] != "gaussian":
            raise ValueError(f"unknown event kind {event['kind']!r}")
        accountant.compose(mechanism, int(event["steps"]))
    return float(accountant.get_epsilon(float(privacy["delta"])))


def main(paths: list[str]) -> int:
    failed = 0
    for arg in paths:
        path = Path(arg)
        path = path / "privacy.json" if path.is_dir() else path
        privacy = json.loads(path.read_text())
        eps = recompute(privacy)
        ok = privacy["epsilon"] >= eps * (1 - 1e-6) and eps <= privacy["epsilon_budget"] * (1 + 1e-9)
        failed += not ok
        print(
            f"{path}: recomputed {eps:.6f}  reported {privacy['epsilon']:.6f}  budget {privacy['epsilon_budget']:g}"
            f"  {'OK' if ok else 'MISMATCH'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
