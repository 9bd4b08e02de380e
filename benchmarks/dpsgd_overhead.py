"""DP-SGD step cost: non-private step vs dpimages' DP step vs Opacus' GradSampleModule step.

Same model, same batch, same optimizer, one process. Each "step" is a whole
optimizer step: non-private = forward + backward + SGD step; dpimages =
`DPSGD.step` (per-example grads via torch.func, clip, ledger spend, noise,
scale) + SGD step; Opacus = GradSampleModule forward/backward + DPOptimizer
(clip, noise, scale) + SGD step. Steps are interleaved (ABCABC...) and the
median is reported, because the machine may be shared.

The ledger here is in memory (no privacy.json), so the DP step time excludes
the file write; `--ledger-file` also times a spend written to privacy.json.

`--noise` measures instead what secure noise costs: the whole DP step
(Poisson sampling of N = 55,000, per-example clipped gradients, ledger spend,
noise) of the dpdm cpu preset's U-Net and loss at its preset batch, with the
noise and sampling from the OS CSPRNG (the default) against a seeded
generator (``--insecure-seeded-noise``), interleaved, medians; the two
sources' raw draw times are reported beside it. Target: secure within 5% of
seeded. Written to ``results/dpsgd_noise_source.json``.

    python benchmarks/dpsgd_overhead.py [--threads 1,2] [--repeats 15] [--machine "2-core CPU"]
    python benchmarks/dpsgd_overhead.py --noise [--threads 1] [--repeats 5] [--batch 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpimages.nets import SmallCNN, num_parameters
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler

RESULTS = Path(__file__).parent / "results" / "dpsgd_overhead.json"
NOISE_RESULTS = Path(__file__).parent / "results" / "dpsgd_noise_source.json"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        h = self.conv2(F.silu(self.norm1(h)))
        return self.norm2(h) + self.skip(x)


class TinyUNet(nn.Module):
    """A small U-Net-ish denoiser (28x28 -> 14 -> 7 and back, GroupNorm, skips): ~0.4M parameters."""

    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.d1, self.d2, self.mid = Block(ch, ch), Block(ch, 2 * ch), Block(2 * ch, 2 * ch)
        self.u2, self.u1 = Block(4 * ch, ch), Block(2 * ch, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.d1(self.inp(x))  # 28
        h2 = self.d2(F.avg_pool2d(h1, 2))  # 14
        m = self.mid(F.avg_pool2d(h2, 2))  # 7
        u = self.u2(torch.cat([F.interpolate(m, scale_factor=2.0), h2], 1))  # 14
        u = self.u1(torch.cat([F.interpolate(u, scale_factor=2.0), h1], 1))  # 28
        return self.out(F.silu(u))


def classifier_loss(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def denoise_loss(model: Callable, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (model(x + 0.5 * z) - x).pow(2).flatten(1).mean(1)


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each step, run interleaved (ABCABC...) `repeats` times after `warmup` calls of each."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, make_model: Callable[[], nn.Module], loss_fn: Callable, batch: tuple[torch.Tensor, ...],
            repeats: int, ledger_file: bool) -> dict:
    torch.manual_seed(0)
    base = make_model()
    b = batch[0].shape[0]
    n_data = 60_000
    models = {k: make_model() for k in ("nonprivate", "dpimages", "opacus")}
    for m in models.values():
        m.load_state_dict(base.state_dict())

    # non-private
    m0 = models["nonprivate"]
    opt0 = torch.optim.SGD(m0.parameters(), lr=1e-3)

    def step_nonprivate() -> None:
        opt0.zero_grad(set_to_none=True)
        loss_fn(m0, *batch).mean().backward()
        opt0.step()

    # dpimages
    m1 = models["dpimages"]
    opt1 = torch.optim.SGD(m1.parameters(), lr=1e-3)
    noise = NoiseSource.seeded(0)  # the step cost, not the noise source, is measured here (see --noise)
    sampler = PoissonSampler(n_data, b / n_data, noise)
    ledger = PrivacyLedger(1e9, 1e-6)
    engine = DPSGD(m1, loss_fn, sampler=sampler, noise_multiplier=1.0, clip_norm=1.0, ledger=ledger, noise=noise)
    engine.plan(10**7)

    def step_dpimages() -> None:
        engine.step(*batch)
        opt1.step()

    # opacus
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = GradSampleModule(models["opacus"], loss_reduction="sum")
    opt2 = DPOptimizer(torch.optim.SGD(m2.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=b, loss_reduction="sum")

    def step_opacus() -> None:
        opt2.zero_grad(set_to_none=True)
        loss_fn(m2, *batch).sum().backward()
        opt2.step()

    med = interleaved_medians({"nonprivate": step_nonprivate, "dpimages": step_dpimages, "opacus": step_opacus},
                              repeats, warmup=2)
    row = {
        "model": name,
        "parameters": num_parameters(base),
        "batch": b,
        "dpimages_physical_batch": engine.max_physical_batch,
        "input_shape": list(batch[0].shape[1:]),
        "step_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_dpimages_vs_nonprivate": round(med["dpimages"] / med["nonprivate"], 3),
        "ratio_opacus_vs_nonprivate": round(med["opacus"] / med["nonprivate"], 3),
        "ratio_dpimages_vs_opacus": round(med["dpimages"] / med["opacus"], 3),
    }
    if ledger_file:
        with tempfile.TemporaryDirectory() as d:
            led = PrivacyLedger(1e9, 1e-6, path=Path(d) / "privacy.json")
            eng = DPSGD(m1, loss_fn, sampler=sampler, noise_multiplier=1.0, clip_norm=1.0, ledger=led, noise=noise)
            eng.plan(10**7)
            spend = []
            for _ in range(5):
                t0 = time.perf_counter()
                led.spend(eng.event(1))
                spend.append(time.perf_counter() - t0)
            row["ledger_spend_with_privacy_json_s"] = round(statistics.median(spend), 5)
    return row


def measure_noise_source(repeats: int, batch: int) -> dict:
    """Secure (OS CSPRNG) against seeded noise: the dpdm cpu preset's whole DP step, and the raw draws."""
    from dpimages.api import create
    from dpimages.nets.edm import edm_loss

    synth = create("dpdm", "cpu")
    cfg = synth.config
    synth.num_classes, synth.image_shape, synth.device = 10, (28, 28, 1), torch.device("cpu")
    n_data, k = 55_000, cfg.multiplicity
    g = torch.Generator().manual_seed(0)
    base = synth.new_model()
    x = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=g)
    sigma = base.training_sigmas((batch, k), g)
    z = torch.randn((batch, k, 1, 28, 28), generator=g)
    drop = torch.rand((batch, k), generator=g) < cfg.label_dropout

    def loss_fn(model: Callable, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n: torch.Tensor,
                d: torch.Tensor) -> torch.Tensor:
        labels = torch.where(d, 10, y.unsqueeze(1).expand(d.shape))
        return edm_loss(model, x, labels, s, n, cfg.sigma_data)

    def engine_step(noise: NoiseSource) -> Callable[[], None]:
        model = synth.new_model()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sampler = PoissonSampler.for_batch_size(n_data, batch, noise)
        engine = DPSGD(model, loss_fn, sampler=sampler, noise_multiplier=1.0, clip_norm=cfg.clip_norm,
                       ledger=PrivacyLedger(1e9, 1e-6), noise=noise, max_physical_batch=cfg.physical_batch)
        engine.plan(10**7)

        def step() -> None:
            sampler.sample()  # the Poisson mask over N, from the same source (its indices are not used here)
            engine.clip_and_accumulate(x, y, sigma, z, drop)
            engine.add_noise()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    med = interleaved_medians({"seeded-insecure": engine_step(NoiseSource.seeded(0)),
                               "os-csprng": engine_step(NoiseSource())}, repeats, warmup=1)
    params = num_parameters(base)

    def draw(src: NoiseSource) -> Callable[[], None]:
        return lambda: (src.normal((params,), 1.0), src.bernoulli(n_data, batch / n_data))

    draws = interleaved_medians({"seeded-insecure": draw(NoiseSource.seeded(0)), "os-csprng": draw(NoiseSource())},
                                20, warmup=0)
    return {
        "model": f"dpdm cpu preset U-Net (EDM loss, K={k}, physical batch {cfg.physical_batch})",
        "parameters": params, "batch": batch, "dataset_size": n_data,
        "step_s": {kk: round(v, 4) for kk, v in med.items()},
        "ratio_secure_vs_seeded": round(med["os-csprng"] / med["seeded-insecure"], 4),
        "draw_s": {kk: round(v, 5) for kk, v in draws.items()},
        "target": "os-csprng step within 5% of the seeded step",
    }


def main_noise(args: argparse.Namespace) -> None:
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        row = {"threads": threads, **measure_noise_source(args.repeats, args.batch)}
        rows.append(row)
        s = row["step_s"]
        print(f"[{threads} thread(s)] {row['model']}, {row['parameters']} params, batch {row['batch']}: "
              f"seeded {s['seeded-insecure']:.3f} s, secure {s['os-csprng']:.3f} s per DP step "
              f"({row['ratio_secure_vs_seeded']:.3f}x); raw draws (noise + Poisson mask) seeded "
              f"{row['draw_s']['seeded-insecure'] * 1e3:.2f} ms, secure {row['draw_s']['os-csprng'] * 1e3:.2f} ms",
              flush=True)
    out = {"machine": args.machine, "torch": torch.__version__, "repeats": args.repeats,
           "statistic": "median of interleaved steps", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "load_average_at_end": list(os.getloadavg()), "results": rows}
    path = Path(args.out) if args.out != str(RESULTS) else NOISE_RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured in turn")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()} CPU")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-ledger-file", action="store_true", help="skip timing a spend written to privacy.json")
    ap.add_argument("--noise", action="store_true", help="secure against seeded noise on the dpdm cpu U-Net")
    ap.add_argument("--batch", type=int, default=2048, help="--noise: expected batch (the dpdm cpu preset's)")
    args = ap.parse_args()
    if args.noise:
        main_noise(args)
        return
    load_start = list(os.getloadavg())
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        cases = [
            ("SmallCNN (GroupNorm, tanh)", SmallCNN, classifier_loss, 256),
            ("SmallCNN (GroupNorm, tanh)", SmallCNN, classifier_loss, 1024),
            ("TinyUNet (denoising loss)", TinyUNet, denoise_loss, 64),
        ]
        for name, make, loss_fn, b in cases:
            x = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1
            other = torch.randint(0, 10, (b,), generator=g) if loss_fn is classifier_loss else torch.randn(
                b, 1, 28, 28, generator=g)
            row = measure(name, make, loss_fn, (x, other), args.repeats, not args.no_ledger_file)
            row = {"threads": threads, **row}
            rows.append(row)
            s = row["step_s"]
            print(f"[{threads} thread(s)] {name}, {row['parameters']} params, batch {b}: "
                  f"non-private {s['nonprivate']:.4f} s, "
                  f"dpimages DP {s['dpimages']:.4f} s ({row['ratio_dpimages_vs_nonprivate']:.2f}x), "
                  f"Opacus GSM {s['opacus']:.4f} s ({row['ratio_opacus_vs_nonprivate']:.2f}x); "
                  f"dpimages/Opacus {row['ratio_dpimages_vs_opacus']:.2f}"
                  + (f"; ledger spend to privacy.json {row['ledger_spend_with_privacy_json_s']:.4f} s"
                     if "ledger_spend_with_privacy_json_s" in row else ""), flush=True)
    out = {
        "machine": args.machine,
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "repeats": args.repeats,
        "statistic": "median of interleaved steps",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
