"""`python -m dpimages.demo`: a short, real DP-MEPF job on Fashion-MNIST, with its accounting and utility printed.

For each target epsilon (default 10; ``--epsilons 1,10`` for both) the demo
fits `dp-mepf` (random convolutional features, so no public data is needed)
on the 55,000 private Fashion-MNIST training images at delta 1e-5. The
private data is read exactly once, through one Gaussian release of the
per-class feature sums and noisy class counts recorded in the run's ledger;
the generator training that follows is post-processing. The demo then draws
10,000 synthetic images, writes them as an npz and a per-class grid, trains
the quick evaluation CNN on them and tests it on the 10,000 real test images
(smoke evaluation: a few epochs, no quality claim beyond the number shown).

The generator schedule is shortened (``steps=300``, a few minutes on 2
cores); `dpimages bench --methods dp-mepf --preset cpu` gives the numbers
in benchmarks/results/fmnist.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dpimages.errors import DPImagesError, InputError

# a short schedule, random features and no labeller stage: a couple of minutes (the cpu preset adds both)
DEMO_OVERRIDES = ("steps=300", "eval_every=100", "grid_every=100", "checkpoint_every=100", "features=random",
                  "labeller=none")


def run_one(real, epsilon: float, delta: float, preset: str, out: Path, n_samples: int, seed: int,  # noqa: ANN001
            progress: bool) -> dict:
    """Fit dp-mepf on `real.train` at `epsilon`, sample, evaluate on `real`; returns the numbers the demo prints."""
    import numpy as np

    from dpimages.eval import EvalOptions, evaluate
    from dpimages.fit_runner import fit_run

    run_dir = out / f"demo-dp-mepf-eps{epsilon:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.time()
    res = fit_run("dp-mepf", real.train, epsilon=epsilon, delta=delta, run_dir=run_dir, preset=preset,
                  overrides=list(DEMO_OVERRIDES) if preset == "cpu" else [], seed=seed, progress=progress)
    fit_s = time.time() - t
    synth = res.synthesizer
    samples = synth.sample(n_samples, synth.balanced_labels(n_samples), seed=seed)
    npz = run_dir / "samples" / "demo.npz"
    np.savez_compressed(npz, images=samples.images, labels=samples.labels, classes=np.array(samples.classes))
    t = time.time()
    ev = evaluate(samples, real, artifacts=res.run.private_eval_prefix(), options=EvalOptions(smoke=True, seed=seed))
    grids = sorted((run_dir / "samples").glob("*.png"))
    return {"epsilon_target": epsilon, "epsilon": res.ledger.epsilon(), "epsilon_rdp": res.ledger.epsilon_rdp(),
            "delta": delta, "events": [(e.label, e.noise_multiplier) for e in res.ledger.events],
            "acc_cnn": ev.get("acc_cnn"), "fid": ev.get("fid"), "feature_net": ev.get("feature_net"),
            "fit_s": fit_s, "eval_s": time.time() - t, "run_dir": str(run_dir), "npz": str(npz),
            "grid": str(grids[-1]) if grids else None, "private_eval": str(res.run.private_eval_dir),
            "noise_source": res.ledger.noise_source}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpimages.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="10", help="comma-separated target epsilons (default 10)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--n-samples", type=int, default=10000)
    ap.add_argument("--data", default="fashion-mnist", help="private data SPEC (default fashion-mnist)")
    ap.add_argument("--test-data", default=None, help="real test SPEC (needed unless --data is fashion-mnist)")
    ap.add_argument("--preset", default="cpu", help="dp-mepf preset; cpu runs the shortened demo schedule")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs", help="parent folder of the run directories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from dpimages.eval import load_real
        from dpimages.privacy.ledger import NEIGHBOURING_TEXT

        try:
            epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        except ValueError:
            raise InputError(f"--epsilons must be comma-separated numbers, got {args.epsilons!r}") from None
        real = load_real(args.data, args.test_data)
        print(f"dpimages demo: dp-mepf (random convolutional features, no public data) on {real.train.name} "
              f"({len(real.train):,} private training images)")
        print(f"neighbouring relation: {NEIGHBOURING_TEXT}; delta = {args.delta:g}; "
              f"shortened generator schedule ({', '.join(DEMO_OVERRIDES[:1])})")
        rows = []
        for eps in epsilons:
            print(f"\n== epsilon {eps:g} ==", flush=True)
            r = run_one(real, eps, args.delta, args.preset, Path(args.out), args.n_samples, args.seed,
                        not args.no_progress)
            rows.append(r)
            print("  releases (ledger events, noise multiplier): "
                  + ", ".join(f"{label} {sigma:.3f}" for label, sigma in r["events"]))
            print(f"  epsilon (PLD) = {r['epsilon']:.4f}, epsilon (RDP) = {r['epsilon_rdp']:.4f} "
                  f"at delta = {r['delta']:g}  (target {eps:g})")
            print(f"  CNN trained on {args.n_samples:,} synthetic images, tested on real test images: "
                  f"{100 * r['acc_cnn']:.1f}% (smoke evaluation); FID ({r['feature_net']}) {r['fid']:.2f}; "
                  f"fit {r['fit_s']:.0f} s, evaluation {r['eval_s']:.0f} s")
        print("\nwhere things are:")
        for r in rows:
            print(f"  epsilon {r['epsilon_target']:g}: run {r['run_dir']}/ (report.md, privacy.json; "
                  f"noise from {r['noise_source']})")
            print(f"    images {r['npz']}, grid {r['grid']}")
            print(f"    share: dpimages export {r['run_dir']} OUT_DIR  (copies only the DP outputs)")
            print(f"    owner only, do not share: {r['private_eval']}/ (evaluation against the private data)")
            print(f"    check the ledger: python benchmarks/recompute_epsilon.py {r['run_dir']}")
    except DPImagesError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
