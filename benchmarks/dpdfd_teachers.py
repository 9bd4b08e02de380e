"""DPDFD teacher ensembles: accuracy versus the number of teachers T on the validation split.

For each T, the teachers of `dpimages fit dpdfd teachers=T --seed 0` are
trained by the method's own `DPDFD._train_teachers` (sharding by a keyed
hash of each image, one teacher per shard). Printed and written per T: the mean and
minimum single-teacher accuracy and the ensemble's accuracy (mean of the
teachers' softmax) on ``fashion-mnist:val`` (5,000 held-out training images,
used for choosing the preset; never part of a run), teacher training time,
and the teachers' forward time on one synthetic batch (the per-step cost).

This is a preset-design measurement on Fashion-MNIST: its numbers are about
the teachers, which a real run never reports (they would be unaccounted
releases of the private data).

Usage::

    .venv/bin/python benchmarks/dpdfd_teachers.py --teachers 1,10,50,100,200 --threads 2 \
        --out benchmarks/results/dpdfd_teachers.json -- teacher_channels=16,32 teacher_hidden=32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dpimages.api import FitContext, create
from dpimages.data import load
from dpimages.methods.dpdfd import release as rel
from dpimages.privacy import NoiseSource, PrivacyLedger


def epochs_for(teachers: int, base: int, cap: int) -> int:
    """Epochs per teacher: ``base`` x sqrt(T) (smaller shards need more passes), at most ``cap``."""
    return int(min(cap, round(base * teachers**0.5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="1,10,50,100,200")
    ap.add_argument("--epochs", default="", help="epochs per T (comma list); default: 2 x sqrt(T), at most 30")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="synthetic batch for the forward timing")
    ap.add_argument("--out", default="benchmarks/results/dpdfd_teachers.json")
    ap.add_argument("overrides", nargs="*", help="dpdfd config key=value (teacher size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(v) for v in args.teachers.split(",")]
    epochs = [int(v) for v in args.epochs.split(",")] if args.epochs else [epochs_for(t, 2, 30) for t in counts]
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    private, val = load("fashion-mnist"), load("fashion-mnist:val")
    xv, yv = val.to_tensor(), val.label_tensor()
    rows = []
    for count, ep in zip(counts, epochs, strict=True):
        synth = create("dpdfd", preset="cpu", **overrides, teachers=count, teacher_epochs=ep)
        ctx = FitContext(PrivacyLedger(1.0, 1e-5), NoiseSource(), seed=0, progress=False, method="dpdfd")
        synth.begin_fit(private, ctx)
        cfg = synth.config
        t0 = time.time()
        teachers = synth._train_teachers(private, ctx, 0)  # the fit's own sharding, seeds and teacher loop
        train_s = time.time() - t0
        logits = torch.cat([rel.teacher_logits(teachers, xv[i:i + 1000]) for i in range(0, len(xv), 1000)], dim=1)
        single = (logits.argmax(-1) == yv).float().mean(1)
        ensemble = float((logits.softmax(-1).mean(0).argmax(-1) == yv).float().mean())
        batch = xv[: args.batch]
        t1 = time.time()
        for _ in range(5):
            rel.teacher_logits(teachers, batch)
        row = {"teachers": count, "shard_images": round(len(private) / count), "teacher_epochs": ep,
               "teacher_steps": rel.teacher_steps(ep, len(private), count, cfg.teacher_batch),
               "teacher_batch": cfg.teacher_batch,
               "teacher_channels": list(cfg.teacher_channels), "teacher_hidden": cfg.teacher_hidden,
               "single_mean": round(float(single.mean()), 4), "single_min": round(float(single.min()), 4),
               "ensemble": round(ensemble, 4), "train_s": round(train_s, 1),
               "forward_ms": round(1000 * (time.time() - t1) / 5, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "dpdfd_teachers", "data": "fashion-mnist (55,000) / fashion-mnist:val (5,000)",
           "threads": args.threads, "machine": platform.processor() or platform.machine(),
           "forward_batch": args.batch, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
