"""DPDM cost per preset: DP-SGD step throughput (with noise multiplicity K), sampling speed, peak memory.

For each preset the script builds the preset's U-Net for 28x28x1 images and
10 classes, times `DPSGD.clip_and_accumulate` + `add_noise` + Adam on
random data (one physical chunk of ``physical_batch`` examples with K draws
each, as in training), times EMA-style sampling forward passes, and
extrapolates the fit and the sampling of 60,000 images on Fashion-MNIST
(55,000 private images). Each preset runs in its own process so that peak
memory (max RSS on a CPU, max allocated on a GPU) is its own.

    python benchmarks/dpdm_throughput.py --presets cpu --threads 2 [--device cuda] [--out FILE.json]

Numbers on a shared machine are upper bounds of the time; the CPU-seconds
column is less sensitive to other load.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

N_PRIVATE = 55_000
N_SAMPLES = 60_000


def measure(preset: str, threads: int, device: str, repeats: int) -> dict:
    import torch

    from dpimages.api import create
    from dpimages.nets.unet import num_parameters
    from dpimages.privacy import NoiseSource, PrivacyLedger
    from dpimages.privacy.dpsgd import DPSGD, PoissonSampler

    torch.set_num_threads(threads)
    dev = torch.device(device)
    synth = create("dpdm", preset)
    cfg = synth.config
    synth.num_classes, synth.image_shape, synth.device = 10, (28, 28, 1), dev
    model = synth.new_model().to(dev)
    noise = NoiseSource(0)
    engine = DPSGD(model, synth._loss_fn, sampler=PoissonSampler(N_PRIVATE, cfg.batch_size / N_PRIVATE, noise),
                   noise_multiplier=1.0, clip_norm=cfg.clip_norm, ledger=PrivacyLedger(1e9, 1e-6), noise=noise,
                   max_physical_batch=cfg.physical_batch)
    engine.plan(repeats + 1)  # a reserved schedule: each spend is then bookkeeping only, as in a fit
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator(device=dev).manual_seed(0)
    b = cfg.physical_batch
    x = torch.rand(b, 1, 28, 28, device=dev) * 2 - 1
    y = torch.randint(0, 10, (b,), device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    idx = torch.arange(b)  # dataset indices of the chunk: keyed training draws, one step key per step

    def step() -> None:
        for part, sigma, nz, drop in synth._shard(idx, g, model):
            engine.clip_and_accumulate(x[part], y[part], sigma, nz, drop)
        engine.add_noise()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        sync()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    wall, cpu = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
    ex_s = b / wall
    # sampling: one batch through the preset's sampler
    model.eval()
    labels = torch.arange(cfg.sample_batch) % 10
    synth._generate(model, labels[: min(50, cfg.sample_batch)], torch.Generator().manual_seed(0))  # warm-up
    sync()
    t = time.perf_counter()
    synth._generate(model, labels, torch.Generator().manual_seed(0))
    sync()
    sample_s = time.perf_counter() - t
    steps = max(1, round(cfg.epochs * N_PRIVATE / cfg.batch_size))
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset, "device": str(dev), "threads": threads, "parameters": num_parameters(model),
        "multiplicity": cfg.multiplicity, "physical_batch": b, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
        "steps": steps, "dp_chunk_wall_s": round(wall, 4), "dp_chunk_cpu_s": round(cpu, 4),
        "examples_per_s": round(ex_s, 2), "draws_per_s": round(ex_s * cfg.multiplicity, 1),
        "draws_per_cpu_s": round(b * cfg.multiplicity / cpu, 1),
        "est_train_min": round(steps * cfg.batch_size / ex_s / 60, 1),
        "sample_images_per_s": round(cfg.sample_batch / sample_s, 1),
        "est_sample_60k_min": round(N_SAMPLES / (cfg.sample_batch / sample_s) / 60, 1),
        "peak_memory_mb": round(peak_mb, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="smoke,cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--machine", default=platform.processor() or platform.machine())
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads, args.device, args.repeats)))
        return
    rows = []
    for preset in args.presets.split(","):
        res = subprocess.run([sys.executable, __file__, "--one", preset, "--threads", str(args.threads), "--device",
                              args.device, "--repeats", str(args.repeats)], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{preset}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        row = {**json.loads(res.stdout.strip().splitlines()[-1]), "machine": args.machine}
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
