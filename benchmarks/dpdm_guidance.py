"""DPDM classifier-free guidance scale: sample a finished run at several scales, train a small CNN, measure accuracy.

Guidance is a sampling-time choice (post-processing of the released model:
no privacy cost). For each scale the script draws ``--n`` class-balanced
images from the run's EMA weights with ``guidance=W`` (every other setting
as fitted), trains the small ReLU CNN of ``dp_mepf_study.py`` on them
(5 epochs) and reports the accuracy on ``fashion-mnist:val`` (the 5,000
held-out training images; never the test set), one JSON line per scale::

    .venv/bin/python benchmarks/dpdm_guidance.py benchmarks/runs/dpdm+lr1e-3-eps10-cpu \
        --scales 0,1,2 --n 6000 --out benchmarks/results/dpdm_guidance.jsonl

Guidance evaluates the denoiser with and without the label, so sampling
costs about twice the network evaluations of ``guidance=0``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from dp_mepf_study import train_eval_cnn

from dpimages.api import load_synthesizer
from dpimages.data import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--scales", default="0,1,2", help="comma-separated guidance weights")
    ap.add_argument("--n", type=int, default=6000, help="synthetic images per scale")
    ap.add_argument("--eval-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/dpdm_guidance.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    val = load("fashion-mnist:val")
    for scale in (float(s) for s in args.scales.split(",")):
        synth = load_synthesizer(args.run_dir, "cpu", [f"guidance={scale}"])
        t0 = time.time()
        samples = synth.sample(args.n, synth.balanced_labels(args.n), seed=args.seed)
        sample_s = time.time() - t0
        acc = train_eval_cnn(samples, {"val": val}, args.eval_epochs, seed=0)
        row = {"run": args.run_dir, "guidance": scale, "n": args.n, "sample_s": round(sample_s, 1),
               "eval_epochs": args.eval_epochs, "threads": args.threads, "acc_val": round(acc["val"], 4)}
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
