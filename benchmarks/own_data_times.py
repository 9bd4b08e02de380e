"""Fit times of each method's cpu preset on a folder of the user's own images (docs/own-data.md).

Writes the walkthrough's generated folder (`dpimages.data.toy.toy_shapes`: 900
RGB images in three classes, at each ``--sizes``; a second folder drawn with
another seed is the public set of `pe`) and runs the real ``dpimages fit
METHOD --preset cpu`` on it, with the overrides the walkthrough documents for
900 images. A fit that ends within ``--minutes`` gives its measured
``fit_s``. A longer one is stopped there, and its time is estimated from its
progress bars: each stage (one bar) takes its elapsed time plus, for the stage
it was stopped in, the remaining steps at that stage's rate so far (capped at
the preset's ``max_minutes`` for a stage that ends when they are spent: dp-mepf's
generator training, `TIME_CAPPED`). A stage
that the first run never reached is timed by a *probe*: a second run whose
overrides make the earlier stages trivial without changing the later stage's
work (e.g. dpdm with ``warm_preset=smoke``: its dp-mepf stage shrinks, its
pretraining and DP-SGD are unchanged). Time outside the bars (loading,
calibration, sampling the warm-start images, grids) is counted from the
first run only: it is measured up to the stop, so later unbarred work is
missing and an estimate is a lower bound for it.

    python benchmarks/own_data_times.py --methods dpaf,dpdfd,dpdm,pe --sizes 32,64 --minutes 3 \\
        --out benchmarks/results/own_data_times.json
    # each preset as it is at 128x128 (its image scaling applies), smoke and cpu:
    python benchmarks/own_data_times.py --methods dp-mepf,dpaf,dpdfd,dpdm,pe --sizes 128 --minutes 5 \\
        --preset smoke --no-overrides --out benchmarks/results/own_data_times_128_smoke.json

Run it on an idle machine with ``--threads 2`` (the torch threads of each fit);
other jobs on the same cores distort every number. The ledgers spend a budget
on generated data only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpimages.data.toy import toy_shapes
from dpimages.data.writers import save_folder

PER_CLASS = 300
# the walkthrough's overrides for 900 images (docs/own-data.md, section 2)
OVERRIDES = {
    "dp-mepf": [],
    "dpaf": ["agg_batch=256", "f1_batch=512"],
    "dpdfd": [],
    "dpdm": ["batch_size=256"],
    "pe": [],
}
# stages a stopped first run never reached: (the stage's bar, overrides that make the earlier stages trivial and
# leave that stage's work unchanged)
PROBES = {
    "dpdm": [("dpdm pretraining", ["warm_preset=smoke"]), ("dpdm DP-SGD steps", ["warm_start=none"])],
}
# pe's first stage (training the public model, cached only once complete) takes most of a short stop at 64x64
MINUTES_SCALE = {"pe": 3.0}
# stages that end when the preset's max_minutes is spent (the fit finishes, it does not pause): an estimate from
# the stage's rate is capped at max_minutes
TIME_CAPPED = {"dp-mepf": "dp-mepf generator steps"}
BAR = re.compile(r"^(?P<desc>[^\r\n|]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)")


def seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def bars(stderr: str) -> dict[str, dict]:
    """The last state of each progress bar in a tqdm log: {description: {n, total, elapsed_s}}."""
    out: dict[str, dict] = {}
    for line in re.split(r"[\r\n]", stderr):
        m = BAR.match(line.strip())
        if m:
            out[m["desc"].strip()] = {"n": int(m["n"]), "total": int(m["total"]),
                                      "elapsed_s": seconds(m["elapsed"])}
    return out


def stage_estimate(bar: dict) -> float:
    """A stage's time: measured when it finished, else elapsed x total / n (its rate so far)."""
    if bar["n"] >= bar["total"]:
        return bar["elapsed_s"]
    return bar["elapsed_s"] * bar["total"] / bar["n"] if bar["n"] else float("inf")


def run_fit(method: str, data: Path, public: Path, run_dir: Path, extra: list[str], minutes: float,
            threads: int, preset: str = "cpu", overrides: bool = True) -> dict:
    cmd = [sys.executable, "-m", "dpimages", "fit", method, "--data", f"folder:{data}", "--epsilon", "10",
           "--delta", "1e-4", "--preset", preset, "--threads", str(threads), "--run-dir", str(run_dir),
           *(OVERRIDES[method] if overrides else []), *extra]
    if method == "pe":
        cmd += ["--public", f"folder:{public}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=minutes * 60)
        stderr, finished, rc = proc.stderr, proc.returncode == 0, proc.returncode
    except subprocess.TimeoutExpired as stop:
        stderr = stop.stderr.decode() if isinstance(stop.stderr, bytes) else (stop.stderr or "")
        finished, rc = False, None
    wall = time.time() - start
    if rc not in (0, None):
        raise SystemExit(f"{method} at {data.name} failed (exit {rc}): {stderr.strip().splitlines()[-1]}")
    fit_s = None
    if finished:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "fit_done":
                fit_s = event["fit_s"]
    return {"command": " ".join(["dpimages", *cmd[3:]]), "finished": finished, "wall_s": round(wall, 1),
            "fit_s": fit_s, "bars": bars(stderr)}


def time_method(method: str, size: int, folders: dict, work: Path, minutes: float, threads: int,
                preset: str = "cpu", overrides: bool = True) -> dict:
    data, public = folders[size]
    minutes *= MINUTES_SCALE.get(method, 1.0)
    first = run_fit(method, data, public, work / f"{method}-{size}", [], minutes, threads, preset, overrides)
    row = {"method": method, "size": size, "preset": preset, "runs": [first]}
    if first["finished"]:
        row.update(fit_s=first["fit_s"], measured=True)
        return row
    stages = dict(first["bars"])
    for k, (target, extra) in enumerate(PROBES.get(method, [])):
        if any(desc.startswith(target) for desc in stages):
            continue
        probe = run_fit(method, data, public, work / f"{method}-{size}-probe{k}", extra, minutes, threads, preset,
                        overrides)
        probe["probe_overrides"] = extra
        row["runs"].append(probe)
        # only stages the first run never showed: a probe's earlier stages are the trivial ones
        stages.update({desc: bar for desc, bar in probe["bars"].items() if desc not in first["bars"]})
    row["stages_not_reached"] = [t for t, _ in PROBES.get(method, []) if not any(d.startswith(t) for d in stages)]
    outside = max(0.0, first["wall_s"] - sum(b["elapsed_s"] for b in first["bars"].values()))
    estimates = {desc: stage_estimate(bar) for desc, bar in stages.items()}
    if method in TIME_CAPPED:
        from dpimages.api import create

        cap_s = 60.0 * create(method, preset).config.max_minutes or math.inf
        estimates = {desc: min(t, cap_s) if desc.startswith(TIME_CAPPED[method]) else t
                     for desc, t in estimates.items()}
        row["capped_at_s"] = cap_s
    total = sum(estimates.values()) + outside
    # a stage seen at step 0 has no rate yet: no estimate (None, not an infinite time)
    row.update(stages_s={desc: round(t, 1) if math.isfinite(t) else None for desc, t in estimates.items()},
               outside_bars_s=round(outside, 1), fit_s=round(total, 1) if math.isfinite(total) else None,
               measured=False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dpaf,dpdfd,dpdm,pe", help=f"any of {','.join(OVERRIDES)}")
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="stop each fit after this long (pe: 3 times this)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--no-overrides", action="store_true",
                        help="fit the preset as it is (at 128x128 the walkthrough's 900-image batches would stop "
                             "the preset's image scaling)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(OVERRIDES))
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)} (known: {', '.join(OVERRIDES)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpimages-own-data-") as tmp:
        work = Path(tmp)
        folders = {}
        for size in (int(s) for s in args.sizes.split(",")):
            folders[size] = (save_folder(toy_shapes(PER_CLASS, size, seed=0), work / f"data{size}"),
                             save_folder(toy_shapes(PER_CLASS, size, seed=1), work / f"public{size}"))
        for size in folders:
            for method in methods:
                row = time_method(method, size, folders, work, args.minutes, args.threads, args.preset,
                                  not args.no_overrides)
                how = "measured" if row["measured"] else "estimate; unbarred work after a stop not counted"
                if row.get("stages_not_reached"):
                    how += f"; lower bound, not reached: {', '.join(row['stages_not_reached'])}"
                minutes = "     ?" if row["fit_s"] is None else f"{row['fit_s'] / 60:6.1f}"
                print(f"{method:8s} {size}x{size}: {minutes} min ({how})", flush=True)
                rows.append(row)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "images": 3 * PER_CLASS, "minutes_per_run": args.minutes, "preset": args.preset,
              "overrides": {} if args.no_overrides else OVERRIDES,
              "minutes_scale": MINUTES_SCALE, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
