"""Choose the DP scattering classifier's schedule on Fashion-MNIST's validation split (never the test split).

The classifier is the DP labeller (`dpimages.methods.labeller`) and the reference row
``dpsgd-classifier+scatter``. Each candidate schedule is trained with DP-SGD (secure noise) on the 55,000
training images at the given epsilon and scored on the 5,000 validation images; the test accuracy is
printed beside it for the record only. One JSON line per (epsilon, schedule) goes to
benchmarks/results/scatter_classifier.jsonl.

    python benchmarks/scatter_classifier.py --epsilons 1,10 --schedules 4096:30:4:0.1 8192:40:4:0.1

A schedule is BATCH:EPOCHS:LR:CLIP. The validation images are private data too: a choice made here
is a choice made on Fashion-MNIST, stated as such in docs/dp-mepf.md, not one made on a user's data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dpimages.eval import load_real
from dpimages.eval.evaluate import machine_description
from dpimages.privacy import PrivacyLedger, calibrate_dpsgd
from dpimages.privacy.noise import NoiseSource
from dpimages.scatter_classifier import ClassifierSchedule, train_scatter_classifier
from dpimages.seeds import seeded_init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="1,10")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--schedules", nargs="+", default=["4096:30:4:0.1"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/scatter_classifier.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    real = load_real("fashion-mnist")
    n = len(real.train)
    for eps in (float(e) for e in args.epsilons.split(",")):
        for text in args.schedules:
            batch, epochs, lr, clip = text.split(":")
            schedule = ClassifierSchedule(int(batch), float(epochs), float(lr), float(clip))
            q, steps = schedule.steps(n)
            sigma = calibrate_dpsgd(eps, args.delta, q, steps)
            ledger = PrivacyLedger(eps, args.delta)
            t0 = time.time()
            model = train_scatter_classifier(
                real.train, schedule, sigma, ledger=ledger, noise=NoiseSource(), dataset_size=n,
                label="dpsgd-classifier+scatter", init=seeded_init(args.seed), device=torch.device("cpu"))
            fit_s = time.time() - t0
            val = float((model.predict(real.val.images) == real.val.labels).mean())
            test = float((model.predict(real.test.images) == real.test.labels).mean())
            line = {"epsilon": eps, "schedule": text, "steps": steps, "sample_rate": q, "sigma": sigma,
                    "epsilon_spent": ledger.epsilon(), "val_accuracy": val, "test_accuracy": test,
                    "fit_s": round(fit_s, 1), "device": machine_description(torch.device("cpu")),
                    "noise_source": "os-csprng", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            print(json.dumps(line), flush=True)
            with Path(args.out).open("a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
