"""Is private tuning worth its cost? dp-mepf's preset at a total epsilon E against `dpimages tune` at the same E.

Usage (Fashion-MNIST; one process, run it on an otherwise idle machine)::

    .venv/bin/python benchmarks/tune_dp_mepf.py --epsilon 1 --repeats 2 \
        --out benchmarks/results/tune_dp_mepf_eps1.json -- cell_noise=0.1,0.2,0.3

    # the check that it runs (seconds, no quality claim):
    .venv/bin/python benchmarks/tune_dp_mepf.py --preset smoke --limit 1000 --test-limit 1000 --n-synth 500 \
        --eval-epochs 1 --out /tmp/tune_smoke.json -- lr=1e-3,3e-3

Each repeat fits (1) the preset alone at epsilon E on the private training images and (2) `tune` over the
grid (everything after ``--``: KEY=v1,v2 ...; default ``cell_noise=0.1,0.2,0.3``) at the same total E,
which pays for every candidate and every held-out score out of E (`dpimages.tune`). Both are then
judged the same way: a small CNN (`dp_mepf_study.train_eval_cnn`) trained on ``--n-synth`` synthetic
images, accuracy on the real test images (never used by either fit). Privacy noise is secret, so every
repeat differs: the summary gives mean and sd over ``--repeats``. Results: one JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_mepf_study import train_eval_cnn  # noqa: E402  (the study's evaluation CNN, shared)

from dpimages.api import fit_run, load_synthesizer  # noqa: E402
from dpimages.data import ImageData, load  # noqa: E402
from dpimages.tune import TuneOptions, tune  # noqa: E402


def first(data: ImageData, limit: int | None) -> ImageData:
    """The first `limit` images (a public, fixed subset for quick checks), or all of them."""
    return data if limit is None or limit >= len(data) else data.subset(np.arange(limit))


def judge(run_dir: Path, test: ImageData, n_synth: int, epochs: int, seed: int) -> float:
    synth = load_synthesizer(run_dir, "cpu")
    samples = synth.sample(n_synth, synth.balanced_labels(n_synth), seed=seed + 1)
    return train_eval_cnn(samples, {"test": test}, epochs, seed=seed)["test"]


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, default=1.0, help="the total epsilon of each arm")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--data", default="fashion-mnist", help="private training data SPEC")
    ap.add_argument("--test", default="fashion-mnist:test", help="real test data SPEC (judging only)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N private images (quick checks)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--score-share", type=float, default=0.1)
    ap.add_argument("--score-samples", type=int, default=None)
    ap.add_argument("--n-synth", type=int, default=20000)
    ap.add_argument("--eval-epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: temporary)")
    ap.add_argument("--out", default="benchmarks/results/tune_dp_mepf.json")
    ap.add_argument("grid", nargs="*", help="KEY=v1,v2 ... (after --)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = args.grid or ["cell_noise=0.1,0.2,0.3"]
    private, test = first(load(args.data), args.limit), first(load(args.test), args.test_limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        for r in range(args.repeats):
            seed = args.seed + r
            t0 = time.time()
            base = fit_run("dp-mepf", private, epsilon=args.epsilon, delta=args.delta, run_dir=runs / f"preset-r{r}",
                           preset=args.preset, seed=seed, progress=False)
            base_s = time.time() - t0
            t0 = time.time()
            tuned = tune("dp-mepf", private, grid, epsilon=args.epsilon, delta=args.delta, preset=args.preset,
                         run_dir=runs / f"tuned-r{r}", options=TuneOptions(
                             heldout=args.heldout, score_share=args.score_share, score_samples=args.score_samples,
                             seed=seed, progress=False))
            tune_s = time.time() - t0
            row = {
                "repeat": r, "seed": seed,
                "preset_epsilon": base.ledger.epsilon(), "tuned_epsilon": tuned.epsilon,
                "acc_preset": judge(base.run.path, test, args.n_synth, args.eval_epochs, seed),
                "acc_tuned": judge(tuned.run_dir, test, args.n_synth, args.eval_epochs, seed),
                "chosen": tuned.tuning["chosen_overrides"],
                "candidates": tuned.tuning["candidates"],
                "epsilon_per_candidate": tuned.tuning["epsilon_per_candidate"],
                "score_noise_multiplier": tuned.tuning["score_noise_multiplier"],
                "preset_s": round(base_s, 1), "tune_s": round(tune_s, 1),
            }
            rows.append(row)
            print(f"repeat {r}: preset {row['acc_preset']:.4f} (eps {row['preset_epsilon']:.3f})  tuned "
                  f"{row['acc_tuned']:.4f} (eps {row['tuned_epsilon']:.3f}, chosen {row['chosen']}, each candidate "
                  f"at eps {row['epsilon_per_candidate']:.3f})", flush=True)
    result = {
        "what": "dp-mepf preset at total epsilon E vs dpimages tune over the grid at the same total E; accuracy of "
                "a small CNN trained on the synthetic images, on the real test images",
        "epsilon": args.epsilon, "delta": args.delta, "preset": args.preset, "grid": grid, "data": args.data,
        "n_private": len(private), "test": args.test, "n_test": len(test), "heldout": args.heldout,
        "score_share": args.score_share, "n_synth": args.n_synth, "eval_epochs": args.eval_epochs,
        "repeats": args.repeats, "threads": args.threads, "machine": platform.platform(),
        "noise_source": "os-csprng", "rows": rows,
        "acc_preset": mean_sd([r["acc_preset"] for r in rows]),
        "acc_tuned": mean_sd([r["acc_tuned"] for r in rows]),
    }
    print(f"preset {result['acc_preset']['mean']:.4f} ± {result['acc_preset']['sd']:.4f}   tuned "
          f"{result['acc_tuned']['mean']:.4f} ± {result['acc_tuned']['sd']:.4f}   ({args.repeats} repeats, epsilon "
          f"{args.epsilon:g} each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
