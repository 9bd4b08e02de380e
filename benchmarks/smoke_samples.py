"""Fingerprints of every method's seeded smoke samples: a refactor must leave them unchanged.

Fits each registered method with the ``smoke`` preset on a generated 200-image,
10-class, 28x28 set (the tests' ``tiny_npz``), with ``--insecure-seeded-noise``
(bit-identical runs; NOT private: this is a regression check on generated
data), samples 20 images with seed 0 and records the SHA-256 of their bytes.
What a method needs besides the data (PE: a tiny public model) comes from its
`smoke_requirements` hook.

    python benchmarks/smoke_samples.py --out benchmarks/results/smoke_samples.json
    python benchmarks/smoke_samples.py --compare benchmarks/results/smoke_samples.json   # exit 1 on a change
    python benchmarks/smoke_samples.py --compare benchmarks/results/smoke_samples.json --methods dpdm,pe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from dpimages.api import fit_run, method_class, methods
from dpimages.data.toy import toy_bars


def fingerprints(only: list[str] | None = None) -> dict[str, dict]:
    torch.set_num_threads(1)
    out = {}
    private = toy_bars()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name in only or methods():
            req = method_class(name).smoke_requirements(root / f"{name}-requirements")
            res = fit_run(name, private, epsilon=10.0, delta=1e-3, run_dir=root / name, preset="smoke",
                          public=req.get("public"), overrides=list(req.get("overrides", [])), seed=0,
                          insecure_seeded_noise=True, progress=False)
            synth = res.synthesizer
            s = synth.sample(20, synth.balanced_labels(20), seed=0)
            out[name] = {"sha256": hashlib.sha256(s.images.tobytes() + s.labels.tobytes()).hexdigest(),
                         "mean_pixel": round(float(s.images.mean()), 4),
                         "events": [[e.label, e.noise_multiplier, e.steps] for e in res.ledger.events]}
            print(f"{name:<11} {out[name]['sha256'][:16]}  mean pixel {out[name]['mean_pixel']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the fingerprints to this JSON file")
    ap.add_argument("--compare", default=None, help="compare with this JSON file: exit 1 if any method changed")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    args = ap.parse_args()
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    now = fingerprints(only)
    if args.out:
        Path(args.out).write_text(json.dumps(now, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        changed = sorted(m for m in (set(now) if only else set(before) | set(now)) if before.get(m) != now.get(m))
        print("unchanged" if not changed else f"CHANGED: {', '.join(changed)}")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
