"""`python -m dpimages.demo`: a short, real DP job with its accounting printed.

Until generation methods exist, the demo trains the DP-SGD reference
classifier (`dpimages.bench.dpsgd_classifier`, SmallCNN) on the 55,000
private Fashion-MNIST training images at epsilon 1 and 10 (delta 1e-5),
tests it on the 10,000 test images, and prints sigma, q, steps and epsilon
(PLD and RDP) from each run's ledger. Each run writes config.yaml,
privacy.json and metrics.jsonl to its own directory under ``runs/``.

The schedule is shortened (3 epochs by default, the `demo` preset) so the
demo takes a few minutes on 2 cores; the `cpu` preset (15-20 epochs) gives
the accuracy quoted in BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dpimages.bench.dpsgd_classifier import PRESETS, train_dpsgd_classifier
from dpimages.data import load
from dpimages.errors import DPImagesError
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.runs import Run


def run_one(private, test, epsilon: float, delta: float, preset: str, out: Path, seed: int, progress: bool) -> dict:
    """One DP-SGD classifier run in its own run directory; returns the result row."""
    run = Run(out / f"demo-eps{epsilon:g}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = {
        "method": "dpsgd-classifier", "preset": preset, "data": private.name, "data_fingerprint": private.fingerprint,
        "dataset_size": len(private), "test": test.name, "epsilon": epsilon, "delta": delta, "seed": seed,
        "threads": torch.get_num_threads(),
    }
    run.start(config, resume=False)
    ledger = PrivacyLedger(epsilon, delta, path=run.privacy_path, data_fingerprint=private.fingerprint,
                           dataset_size=len(private))
    ledger.write()
    result = train_dpsgd_classifier(private, test, epsilon=epsilon, delta=delta, preset=preset, ledger=ledger,
                                    noise=NoiseSource(seed), progress=progress, device="cpu", seed=seed)
    ledger.write(exact=True)
    run.log(result["steps"], event="done", test_accuracy=result["accuracy"], epsilon=result["epsilon"],
            epsilon_rdp=result["epsilon_rdp"], sigma=result["sigma"], fit_s=round(result["fit_s"], 1))
    result["run_dir"] = str(run.path)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpimages.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="1,10", help="comma-separated target epsilons (default 1,10)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs", help="parent folder of the run directories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        private = load("fashion-mnist")
        test = load("fashion-mnist:test")
        p = PRESETS[args.preset]
        print(f"dpimages demo: DP-SGD classifier (SmallCNN, GroupNorm, tanh) on {private.name} "
              f"({len(private):,} private images), tested on {test.name} ({len(test):,} images)")
        print(f"neighbouring relation: {NEIGHBOURING_TEXT}; delta = {args.delta:g}")
        print(f"preset {args.preset!r}: {p.epochs:g} epochs at batch {p.batch_size}"
              + (f" ({p.low_epsilon_epochs:g} at batch {p.low_epsilon_batch_size} for epsilon <= {p.low_epsilon:g})"
                 if p.low_epsilon_epochs else "")
              + ("; a short schedule for the demo, the 'cpu' preset trains 15-20 epochs" if args.preset == "demo"
                 else ""))
        rows = []
        for eps in epsilons:
            print(f"\n== epsilon {eps:g} ==")
            r = run_one(private, test, eps, args.delta, args.preset, Path(args.out), args.seed, not args.no_progress)
            rows.append(r)
            print(f"  noise multiplier sigma = {r['sigma']:.4f} (calibrated on PLD before reading data), "
                  f"clip C = {r['clip_norm']:g}")
            print(f"  Poisson sample rate q = {r['sample_rate']:.5f} (expected batch {r['batch_size']}), "
                  f"steps = {r['steps']} ({r['epochs']:.2f} epochs)")
            print(f"  epsilon (PLD) = {r['epsilon']:.4f}, epsilon (RDP) = {r['epsilon_rdp']:.4f} "
                  f"at delta = {r['delta']:g}  (target {eps:g})")
            print(f"  test accuracy = {100 * r['accuracy']:.2f}%  (fit {r['fit_s']:.0f} s)")
            print(f"  ledger: {r['run_dir']}/privacy.json")
        print("\nsummary:")
        for r in rows:
            print(f"  epsilon {r['epsilon_target']:>4g}: accuracy {100 * r['accuracy']:.2f}%, "
                  f"epsilon PLD {r['epsilon']:.3f} / RDP {r['epsilon_rdp']:.3f}, {r['run_dir']}/privacy.json")
    except DPImagesError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
