"""Independent check of a run's privacy.json: recompute epsilon with dp-accounting alone.

    python benchmarks/recompute_epsilon.py [--allow-seeded] RUN_DIR [RUN_DIR ...]

Imports nothing from dpimages. Exit code 1 if a ledger's reported epsilon is
below the recomputed one (an under-count) or above its budget, and if its
noise was not drawn from the OS CSPRNG (``noise_source`` other than
``os-csprng``: seeded noise can be recomputed by anyone who knows the seed, so
no epsilon holds for them; ledgers written before ``noise_source`` existed
were seeded). ``--allow-seeded`` checks only the accounting of such ledgers
(for tests), still naming them not private.
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


def main(args: list[str]) -> int:
    allow_seeded = "--allow-seeded" in args
    paths = [a for a in args if a != "--allow-seeded"]
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    failed = 0
    for arg in paths:
        path = Path(arg)
        path = path / "privacy.json" if path.is_dir() else path
        privacy = json.loads(path.read_text())
        eps = recompute(privacy)
        ok = privacy["epsilon"] >= eps * (1 - 1e-6) and eps <= privacy["epsilon_budget"] * (1 + 1e-9)
        source = privacy.get("noise_source", "unrecorded (seeded)")
        secure = source == "os-csprng"
        failed += not ok or not (secure or allow_seeded)
        verdict = "OK" if ok else "MISMATCH"
        if not secure:
            verdict += (f"  NOT PRIVATE: noise_source {source}: its noise can be recomputed from the seed, so the "
                        "epsilon does not hold for anyone who knows it")
        print(
            f"{path}: recomputed {eps:.6f}  reported {privacy['epsilon']:.6f}  budget {privacy['epsilon_budget']:g}"
            f"  {verdict}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
