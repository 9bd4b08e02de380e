"""DP-MEPF feature-design study: fit one variant, sample, train a small CNN on the samples, measure accuracy.

Usage (one variant per call; run them sequentially on a shared machine)::

    .venv/bin/python benchmarks/dp_mepf_study.py --name base --epsilon 10 \
        --out benchmarks/results/dp_mepf_study.jsonl -- feature_pool=4 steps=1500

Everything after ``--`` is a dp-mepf config override (key=value). Accuracy is
measured on ``fashion-mnist:val`` (the 5,000 held-out training images) for
choices; ``--test`` adds ``fashion-mnist:test`` (report only, never for
choosing). The classifier is a small ReLU CNN (conv32-pool-conv64-pool-fc128)
trained with Adam on the synthetic images only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpimages.api import fit_run
from dpimages.data import ImageData, load


class EvalCNN(nn.Module):
    """conv3x3(32)-ReLU-maxpool-conv3x3(64)-ReLU-maxpool-fc128-ReLU-fc(K)."""

    def __init__(self, in_ch: int = 1, k: int = 10, size: int = 28) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(in_ch, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * (size // 4) ** 2, 128), nn.Linear(128, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def accuracy(model: nn.Module, data: ImageData) -> float:
    model.eval()
    x, y = data.to_tensor(), torch.from_numpy(data.labels)
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    return float((pred == y).float().mean())


def train_eval_cnn(train: ImageData, evals: dict[str, ImageData], epochs: int, seed: int = 0) -> dict[str, float]:
    """Train EvalCNN on `train` (Adam 1e-3, batch 128) and report the accuracy on each of `evals`."""
    torch.manual_seed(seed)
    x, y = train.to_tensor(), torch.from_numpy(train.labels)
    model = EvalCNN(x.shape[1], train.num_classes, x.shape[2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            b = perm[i : i + 128]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {name: accuracy(model, d) for name, d in evals.items()}


def render_table(rows: list[dict]) -> str:
    """Markdown table of study rows (one line per variant, in the order they were run)."""
    out = ["| variant | epsilon | public | overrides | feature dims (1st / 2nd moment) | cells per class | best step "
           "| val acc % | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dims = f"{r['dims_first']}" + (f" / {r['dims_second']}" if r.get("dims_second") else "")
        out.append(f"| {r['name']} | {r['epsilon']:g} | {r['public'] or '-'} | {' '.join(r['overrides'])} | {dims} "
                   f"| {r.get('cells') or 1} | {r['best_step']} | {100 * r['acc_val']:.1f} | {r['fit_s']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--public", default=None, help="public data spec (for features=public)")
    ap.add_argument("--n-synth", type=int, default=20000)
    ap.add_argument("--eval-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", action="store_true", help="also report fashion-mnist:test (final numbers only)")
    ap.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary directory)")
    ap.add_argument("--out", default="benchmarks/results/dp_mepf_study.jsonl")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out's rows")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.table:
        print(render_table([json.loads(t) for t in Path(args.out).read_text().splitlines() if t.strip()]), end="")
        return
    torch.set_num_threads(args.threads)

    private = load("fashion-mnist")
    evals = {"val": load("fashion-mnist:val")}
    if args.test:
        evals["test"] = load("fashion-mnist:test")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        t0 = time.time()
        res = fit_run("dp-mepf", private, epsilon=args.epsilon, run_dir=run_dir, preset=args.preset,
                      public=args.public, overrides=args.overrides, seed=args.seed, progress=False)
        fit_s = time.time() - t0
        synth = res.synthesizer
        samples = synth.sample(args.n_synth, synth.balanced_labels(args.n_synth), seed=args.seed + 1)
        t1 = time.time()
        acc = train_eval_cnn(samples, evals, args.eval_epochs, seed=args.seed)
        eval_s = time.time() - t1
        metrics = res.run.read_metrics()
    release = next((m for m in metrics if m.get("event") == "release"), {})
    done = next((m for m in metrics if m.get("event") == "train_done"), {})
    row = {
        "name": args.name, "epsilon": args.epsilon, "epsilon_spent": res.ledger.epsilon(), "preset": args.preset,
        "public": args.public, "overrides": args.overrides, "dims_first": release.get("dims_first"),
        "dims_second": release.get("dims_second"), "cells": release.get("cells"),
        "best_step": done.get("best_step"),
        "best_released_distance": done.get("best_released_distance"), "fit_s": round(fit_s, 1),
        "eval_s": round(eval_s, 1), "n_synth": args.n_synth, "eval_epochs": args.eval_epochs,
        "threads": args.threads, **{f"acc_{k}": round(v, 4) for k, v in acc.items()},
    }
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
