"""How long the whole `dpimages evaluate` takes on 60,000 synthetic 28x28 images (target: < 10 minutes, 2 cores).

The 60,000 labelled stand-in images are the 55,000 private training images
plus 5,000 of them with +-8 grey levels of noise: realistic content, so early
stopping behaves as it would on a good generator (the validation and test
images are not among them). Content does not change the cost of the
feature, fidelity and memorization stages.

Stages: (1) the one-off evaluation network (trained unless cached) and the
features of the real reference set (cached after the first time), reported
separately; (2) the whole `evaluate` with a warm cache, broken down by stage.
Wall time and CPU time are both reported, with the load average: on a
machine shared with other jobs wall time exceeds CPU time / threads.

    .venv/bin/python benchmarks/eval_speed.py [--threads 2] [--cold] [--out benchmarks/results/eval_speed.json]

``--cold`` uses an empty temporary cache, so that stage (1) really trains the
evaluation network (as on a clean CI machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpimages.data import ImageData
from dpimages.eval import EvalOptions, evaluate, load_real
from dpimages.eval.evaluate import machine_description
from dpimages.eval.feature_nets import eval_feature_net


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stand_in(train: ImageData, n: int = 60000, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    extra = rng.choice(len(train), n - len(train), replace=False)
    jitter = rng.integers(-8, 9, (len(extra), *train.image_shape))
    images = np.concatenate([train.images, np.clip(train.images[extra] + jitter, 0, 255).astype(np.uint8)])
    labels = np.concatenate([train.labels, train.labels[extra]])
    return ImageData(images, labels, list(train.classes), "stand-in-60k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/eval_speed.json")
    ap.add_argument("--cold", action="store_true", help="start from an empty evaluation-network cache")
    args = ap.parse_args()
    if args.cold:
        os.environ["DPIMAGES_CACHE"] = tempfile.mkdtemp(prefix="dpimages-cache-")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    real = load_real("fashion-mnist")
    synthetic = stand_in(real.train)

    w0, c0 = time.time(), cpu_seconds()
    fnet = eval_feature_net(real.train, real.val, log=print)
    fnet.reference_features(real.train)
    one_off = {"cache": "cold (trained here)" if args.cold else "as found (warm if trained before)",
               "wall_s": round(time.time() - w0, 1), "cpu_s": round(cpu_seconds() - c0, 1),
               "eval_net_val_acc": fnet.info.get("val_acc"), "feature_net": fnet.name}
    print(f"one-off (evaluation network + reference features, cached afterwards): {one_off}")

    w0, c0 = time.time(), cpu_seconds()
    res = evaluate(synthetic, real, options=EvalOptions(threads=args.threads, progress=True))
    wall, cpu = time.time() - w0, cpu_seconds() - c0
    out = {
        "what": "dpimages evaluate, default classifiers, 60,000 synthetic 28x28x1 images vs fashion-mnist",
        "n_synthetic": len(synthetic),
        "threads": args.threads,
        "device": machine_description(torch.device("cpu")),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "target_s": 600,
        "breakdown_wall_s": res["timings"],
        "classifier_epochs": {k: v["epochs_run"] for k, v in res["classifiers"].items()},
        "one_off_cold_cache": one_off,
        "results_of_this_run": {k: res[k] for k in ("acc_cnn", "acc_mlp", "acc_logreg", "fid", "kid", "precision",
                                                    "recall", "feature_net")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("wall_s", "cpu_s", "breakdown_wall_s", "load_average_after")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
