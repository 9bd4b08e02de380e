"""DPAF throughput: CPU seconds per aggregation iteration, per f1 DP-SGD step and per ablation step.

Sizes a preset without running a fit: builds the networks of the preset for 28x28x1 images and 10 classes,
times the method's own iteration functions on random images (no private data, a throw-away ledger) with
process CPU time (robust to other jobs on a shared machine), and extrapolates the whole schedule::

    .venv/bin/python benchmarks/dpaf_throughput.py --preset cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dpimages.api import FitContext, create
from dpimages.methods.dpaf import DPAF
from dpimages.methods.dpaf.nets import Nets
from dpimages.methods.dpaf.release import Schedule, noise_plan
from dpimages.nets.discriminators import SplitDiscriminator
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler


def _timed(fn, k: int, threads: int) -> float:  # noqa: ANN001
    """Process CPU seconds per call (per thread), after one warm-up call."""
    fn()
    t = time.process_time()
    for _ in range(k):
        fn()
    return (time.process_time() - t) / k / threads


def measure(preset: str, overrides: list[str], aggregation: bool, n: int, repeats: int, threads: int) -> dict:
    """CPU seconds of one iteration / step of the preset's schedule, and the whole schedule extrapolated."""
    over = dict(o.split("=", 1) for o in overrides)
    over["aggregation"] = str(aggregation)
    synth: DPAF = create("dpaf", preset, **over)  # type: ignore[assignment]
    cfg = synth.config
    synth.num_classes, synth.image_shape, synth.classes = 10, (28, 28, 1), [str(k) for k in range(10)]
    synth.counts = torch.full((10,), n / 10, dtype=torch.float64)
    sched = Schedule.from_config(cfg, n)
    plan = noise_plan(1.0, sched)
    synth.train_info = {"sample_rate_agg": sched.q_agg, "noise": {"agg": plan.agg or 1.0}, "dataset_size": n}
    x = torch.rand(n, 1, 28, 28) * 2 - 1
    y = torch.arange(n) % 10
    f1, f2 = synth.new_discriminator()
    gen = synth.new_generator()
    nets = Nets(f1, f2, gen, synth.new_generator(), torch.optim.Adam(f1.parameters()),
                torch.optim.Adam(f2.parameters()), torch.optim.Adam(gen.parameters()), torch.Generator())
    ledger = PrivacyLedger(1e6, 1e-5)  # a throw-away ledger: no budget matters here
    noise = NoiseSource(0)
    ctx = FitContext(ledger, noise, progress=False)
    if aggregation:
        synth.center = synth._new_center(nets)  # as at the start of a cycle (the f1 step needs it)
        agg = PoissonSampler.for_batch_size(n, cfg.agg_batch, noise)
        engine = DPSGD(f1, synth._f1_loss, sampler=PoissonSampler.for_batch_size(n, cfg.f1_batch, noise),
                       noise_multiplier=1.0, clip_norm=cfg.grad_clip, ledger=ledger, noise=noise,
                       max_physical_batch=cfg.physical_batch)
        it = _timed(lambda: synth._aggregation_iteration(ctx, nets, agg, 1.0, x, y), repeats, threads)
        f1s = _timed(lambda: synth._f1_step(ctx, nets, engine, x, y), max(1, repeats // 2), threads)
        total = cfg.cycles * (cfg.agg_steps * it + cfg.f1_steps * f1s)
        return {"iteration_cpu_s": round(it, 3), "f1_step_cpu_s": round(f1s, 3),
                "schedule_cpu_min": round(total / 60, 1)}
    disc = SplitDiscriminator(f1, f2, cfg.feature_clip)
    engine = DPSGD(disc, synth._d_loss, sampler=PoissonSampler.for_batch_size(n, cfg.plain_batch, noise),
                   noise_multiplier=1.0, clip_norm=cfg.grad_clip, ledger=ledger, noise=noise,
                   max_physical_batch=cfg.physical_batch)

    def plain_step() -> None:  # as DPAF._train_plain does it
        idx = engine.sampler.sample()
        engine.clip_and_accumulate(x[idx], y[idx], torch.zeros(idx.numel(), dtype=torch.bool))
        yf = synth._fake_labels(round(engine.sampler.expected_batch_size), nets.rng)
        with torch.no_grad():
            xf = gen(synth._latents(yf.numel(), nets.rng), yf)
        engine.clip_and_accumulate(xf, yf, torch.ones(yf.numel(), dtype=torch.bool))
        engine.add_noise()
        yg = torch.arange(10).repeat_interleave(cfg.fake_per_class)
        loss = torch.nn.functional.softplus(-disc(gen(synth._latents(yg.numel(), nets.rng), yg), yg)).mean()
        torch.autograd.grad(loss, list(gen.parameters()))

    st = _timed(plain_step, repeats, threads)
    return {"step_cpu_s": round(st, 3), "schedule_cpu_min": round(cfg.cycles * cfg.agg_steps * st / 60, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=55000, help="data set size (random images)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"preset": a.preset, "threads": a.threads, "overrides": a.overrides}
    out["dpaf"] = measure(a.preset, a.overrides, True, a.n, a.repeats, a.threads)
    out["ablation"] = measure(a.preset, a.overrides, False, a.n, a.repeats, a.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
