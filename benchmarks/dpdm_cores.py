"""DPDM fit speed on the cores of this machine: one process with 1 or 2 threads, or torchrun processes.

Runs the real `dpimages fit dpdm` on Fashion-MNIST (the preset's schedule,
calibrated sigma, ledger and all) for ``--steps`` DP steps in each
configuration, reads the ``steps_per_s`` of the run's ``paused`` (or
``train_done``) event in metrics.jsonl (the mean over the run's steps: no
per-step time is logged), and extrapolates the preset's whole fit. Run it on
an idle machine: other jobs on the same cores distort every number.

    python benchmarks/dpdm_cores.py --preset cpu --steps 40 --out benchmarks/results/dpdm_cores.json

Each configuration reports DP examples per CPU-second (steps/s x expected
batch / cores used). ``--baseline "per_example=torch.func physical_batch=64"``
also runs every configuration with those overrides and with
``DPIMAGES_KEEP_FREED_MEMORY=0`` (the engine, preset and allocator before
book-keeping clipping) and reports the speed-up of the default.

Each configuration is a separate run directory under a temporary folder
(removed afterwards); its ledger spends a fraction of a budget on data that
is only read here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpimages.api import create
from dpimages.config import parse_overrides
from dpimages.methods.dpdm.method import schedule

N_PRIVATE = 55_000  # fashion-mnist (the 55,000 training images the fit reads)
CONFIGS = {  # name: (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "torchrun 2 processes x 1 thread": (2, 1),
}


def run_config(processes: int, threads: int, preset: str, steps: int, overrides: list[str], run_dir: Path,
               total: int, batch: int, extra_env: dict[str, str]) -> dict:
    fit = ["fit", "dpdm", "--data", "fashion-mnist", "--epsilon", "10", "--preset", preset, "--device", "cpu",
           "--run-dir", str(run_dir), f"steps_per_run={steps}", *overrides]
    if processes == 1:
        cmd = [sys.executable, "-m", "dpimages", *fit]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "dpimages", *fit]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra_env}
    t = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["steps_per_s"] for m in metrics if m.get("event") in ("paused", "train_done")]
    return {"processes": processes, "threads": threads, "steps_run": steps, "wall_s": round(wall, 1),
            "steps_per_s": rates[-1], "dp_examples_per_cpu_s": round(rates[-1] * batch / (processes * threads), 1),
            "preset_steps": total, "fit_min_extrapolated": round(total / rates[-1] / 60, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (e.g. batch_size=2048 epochs=28)")
    p.add_argument("--baseline", default=None, help="also run every configuration with these KEY=VALUE overrides "
                   "added (e.g. 'per_example=torch.func physical_batch=64') and report the speed-up")
    args = p.parse_args()
    cfg = create("dpdm", args.preset, **parse_overrides(args.overrides)).config
    _, total = schedule(N_PRIVATE, cfg.batch_size, cfg.epochs, cfg.max_steps)  # the preset's whole fit
    load_before = os.getloadavg()[0]
    variants = {"configs": args.overrides}
    if args.baseline:
        variants["baseline"] = [*args.overrides, *args.baseline.split()]
    result: dict = {"preset": args.preset, "overrides": args.overrides, "baseline_overrides": args.baseline,
                    "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "load_before": load_before, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (procs, threads) in CONFIGS.items():
            for variant, overrides in variants.items():
                run_dir = Path(tmp) / f"{variant}_{name.replace(' ', '_')}"
                env = {"DPIMAGES_KEEP_FREED_MEMORY": "0"} if variant == "baseline" else {}
                row = run_config(procs, threads, args.preset, args.steps, overrides, run_dir, total, cfg.batch_size,
                                 env)
                result.setdefault(variant, {})[name] = row
                print(f"{variant:9s} {name:34s} {row['steps_per_s']:.3f} DP steps/s, "
                      f"{row['dp_examples_per_cpu_s']} DP examples per CPU-s -> preset fit "
                      f"{row['fit_min_extrapolated']} min ({row['preset_steps']} steps)", flush=True)
    if args.baseline:
        result["speedup_vs_baseline"] = {name: round(result["configs"][name]["steps_per_s"]
                                                     / result["baseline"][name]["steps_per_s"], 3) for name in CONFIGS}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
