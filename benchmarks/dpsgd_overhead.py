"""DP-SGD step cost: a non-private step vs dpimages' DP step vs Opacus' two modes.

Same model, same batch, same optimizer, one process. Each "step" is a whole
optimizer step, and the columns are:

* ``nonprivate``: eager forward + backward of the whole batch + SGD step;
* ``dpimages``: `DPSGD.step` as the methods run it (``per_example="auto"``:
  book-keeping clipping where it applies; clip, ledger spend, noise, scale)
  + SGD step, in physical chunks of ``--physical`` (default: the engine's);
* ``dpimages_torch_func``: the same with ``per_example="torch.func"`` (vmap
  over grad: the engine before book-keeping), the engine's "auto" chunks;
* ``opacus_gsm``: Opacus' GradSampleModule (per-sample gradients by hooks)
  + DPOptimizer;
* ``opacus_ghost``: Opacus' fast gradient clipping with ghost norms
  (GradSampleModuleFastGradientClipping + DPLossFastGradientClipping, two
  backward passes) + DPOptimizerFastGradientClipping.

Models: SmallCNN (the dpsgd-classifier's CNN) at batch 256 and 1,024; the
dpdm ``cpu`` preset's U-Net with the EDM loss at its preset batch 2,048; the
DPDM paper's U-Net (1.75 M parameters) at batch 256 on a CPU. U-Nets run
with K = 1 (Opacus has no noise multiplicity). Steps are interleaved
(ABCDE...) and the median is reported, because the machine may be shared.

The ledger here is in memory (no privacy.json), so the DP step time excludes
the file write; `--ledger-file` also times a spend written to privacy.json.

`--noise` measures instead what secure noise costs: the whole DP step
(Poisson sampling of N = 55,000, per-example clipped gradients, ledger spend,
noise) of the dpdm cpu preset's U-Net and loss at its preset batch, with the
noise and sampling from the OS CSPRNG (the default) against a seeded
generator (``--insecure-seeded-noise``), interleaved, medians; the two
sources' raw draw times are reported beside it. Target: secure within 5% of
seeded. Written to ``results/dpsgd_noise_source.json``.

    python benchmarks/dpsgd_overhead.py [--threads 1,2] [--repeats 7] [--physical 512] [--out FILE]
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpimages.allocator import keep_freed_memory
from dpimages.methods.dpdm.config import PAPER_UNET
from dpimages.nets import SmallCNN, num_parameters
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler

RESULTS = Path(__file__).parent / "results" / "dpsgd_overhead.json"
NOISE_RESULTS = Path(__file__).parent / "results" / "dpsgd_noise_source.json"


def classifier_loss(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each step, run interleaved (ABCABC...) `repeats` times after `warmup` calls of each."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            _sync()
            t0 = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _PerExampleLoss:
    """Opacus' fast-gradient-clipping loss wrapper wants a criterion with a `reduction`: our per-example loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        self.model, self.loss_fn, self.reduction = model, loss_fn, "sum"

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(self.model, *batch)
        return losses if self.reduction == "none" else losses.sum()


def measure(name: str, make_model: Callable[[], nn.Module], loss_fn: Callable, batch: tuple[torch.Tensor, ...],
            repeats: int, ledger_file: bool, physical: int | None, opacus_modes: tuple[str, ...],
            device: torch.device) -> dict:
    """Median step seconds of the non-private step, both dpimages paths and Opacus' modes on one model and batch."""
    torch.manual_seed(0)
    base = make_model().to(device)
    batch = tuple(t.to(device) for t in batch)
    b = batch[0].shape[0]
    n_data = 60_000
    columns = ["nonprivate", "dpimages", "dpimages_torch_func", *opacus_modes]
    models = {k: make_model().to(device) for k in columns}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    steps: dict[str, Callable[[], None]] = {}

    m0 = models["nonprivate"]
    opt0 = torch.optim.SGD(m0.parameters(), lr=1e-3)

    def step_nonprivate() -> None:
        opt0.zero_grad(set_to_none=True)
        loss_fn(m0, *batch).mean().backward()
        opt0.step()

    steps["nonprivate"] = step_nonprivate
    noise = NoiseSource.seeded(0)  # the step cost, not the noise source, is measured here (see --noise)
    sampler = PoissonSampler(n_data, b / n_data, noise)
    engines = {}
    for column, per_example in (("dpimages", "auto"), ("dpimages_torch_func", "torch.func")):
        model = models[column]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        engine = DPSGD(model, loss_fn, sampler=sampler, noise_multiplier=1.0, clip_norm=1.0,
                       ledger=PrivacyLedger(1e9, 1e-6), noise=noise, per_example=per_example,
                       max_physical_batch=physical if per_example == "auto" else "auto")
        engine.plan(10**7)
        engines[column] = engine

        def step_dpimages(engine: DPSGD = engine, opt: torch.optim.Optimizer = opt) -> None:
            engine.step(*batch)
            opt.step()

        steps[column] = step_dpimages

    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "opacus_gsm" in opacus_modes:
            m2 = GradSampleModule(models["opacus_gsm"], loss_reduction="sum")
            opt2 = DPOptimizer(torch.optim.SGD(m2.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=b, loss_reduction="sum")

            def step_opacus() -> None:
                opt2.zero_grad(set_to_none=True)
                loss_fn(m2, *batch).sum().backward()
                opt2.step()

            steps["opacus_gsm"] = step_opacus
        if "opacus_ghost" in opacus_modes:
            m3 = GradSampleModuleFastGradientClipping(models["opacus_ghost"], loss_reduction="sum", max_grad_norm=1.0,
                                                      use_ghost_clipping=True)
            opt3 = DPOptimizerFastGradientClipping(torch.optim.SGD(m3.parameters(), lr=1e-3), noise_multiplier=1.0,
                                                   max_grad_norm=1.0, expected_batch_size=b, loss_reduction="sum")
            ghost_loss = DPLossFastGradientClipping(m3, opt3, _PerExampleLoss(m3, loss_fn), loss_reduction="sum")

            def step_ghost() -> None:
                opt3.zero_grad(set_to_none=True)
                ghost_loss(*batch).backward()
                opt3.step()

            steps["opacus_ghost"] = step_ghost

    med = interleaved_medians(steps, repeats, warmup=2)
    row = {
        "model": name,
        "parameters": num_parameters(base),
        "batch": b,
        "dpimages_per_example": engines["dpimages"].per_example,
        "dpimages_physical_batch": engines["dpimages"].max_physical_batch,
        "dpimages_torch_func_physical_batch": engines["dpimages_torch_func"].max_physical_batch,
        "input_shape": list(batch[0].shape[1:]),
        "step_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_vs_nonprivate": {k: round(v / med["nonprivate"], 3) for k, v in med.items() if k != "nonprivate"},
    }
    if opacus_modes:
        row["dpimages_below_opacus"] = all(med["dpimages"] < med[k] for k in opacus_modes)
    if ledger_file:
        with tempfile.TemporaryDirectory() as d:
            led = PrivacyLedger(1e9, 1e-6, path=Path(d) / "privacy.json")
            spend = []
            for _ in range(5):
                t0 = time.perf_counter()
                led.spend(engines["dpimages"].event(1))
                spend.append(time.perf_counter() - t0)
            row["ledger_spend_with_privacy_json_s"] = round(statistics.median(spend), 5)
    return row


def _edm_case(preset_overrides: dict, batch: int, g: torch.Generator,
              k: int | None = None) -> tuple[Callable, Callable, tuple, Any]:
    """A dpdm U-Net (EDM loss, K draws, label dropout) with a fixed batch of draws: (make_model, loss_fn, batch,
    config); K defaults to the preset's."""
    from dpimages.api import create
    from dpimages.nets.edm import edm_loss

    synth = create("dpdm", "cpu", **preset_overrides)
    synth.num_classes, synth.image_shape, synth.device = 10, (28, 28, 1), torch.device("cpu")
    cfg = synth.config
    k = cfg.multiplicity if k is None else k

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = synth.new_model()
        with torch.no_grad():  # move off the zero-initialised output layers, as after a few steps
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return model

    def loss_fn(model: Callable, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, n: torch.Tensor,
                d: torch.Tensor) -> torch.Tensor:
        return edm_loss(model, x, torch.where(d, 10, y.unsqueeze(1).expand(d.shape)), s, n, cfg.sigma_data)

    x = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=g)
    sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn((batch, k), generator=g))
    z = torch.randn((batch, k, 1, 28, 28), generator=g)
    drop = torch.rand((batch, k), generator=g) < cfg.label_dropout
    return make, loss_fn, (x, y, sigma, z, drop), cfg


def measure_noise_source(repeats: int, batch: int) -> dict:
    """Secure (OS CSPRNG) against seeded noise: the dpdm cpu preset's whole DP step, and the raw draws."""
    make, loss_fn, draws_batch, cfg = _edm_case({}, batch, torch.Generator().manual_seed(0))
    n_data, k = 55_000, cfg.multiplicity
    base = make()

    def engine_step(noise: NoiseSource) -> Callable[[], None]:
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sampler = PoissonSampler.for_batch_size(n_data, batch, noise)
        engine = DPSGD(model, loss_fn, sampler=sampler, noise_multiplier=1.0, clip_norm=cfg.clip_norm,
                       ledger=PrivacyLedger(1e9, 1e-6), noise=noise, max_physical_batch=cfg.physical_batch)
        engine.plan(10**7)

        def step() -> None:
            sampler.sample()  # the Poisson mask over N, from the same source (its indices are not used here)
            engine.clip_and_accumulate(*draws_batch)
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
    ap.add_argument("--unet-batch", type=int, default=2048, help="batch of the dpdm cpu U-Net (its preset's)")
    ap.add_argument("--paper-batch", type=int, default=256, help="batch of the paper U-Net (4,096 on a GPU)")
    ap.add_argument("--physical", type=int, default=None,
                    help="dpimages' physical batch on the U-Nets (default: the engine's 'auto')")
    ap.add_argument("--only", default="", help="measure only the models whose name contains this")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--multiplicity", type=int, default=1, help="K noise draws per example on the U-Nets "
                    "(K > 1: no Opacus columns, Opacus clips rows, not examples)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, every step
    allocator = keep_freed_memory()  # as `dpimages fit` does: every column runs with it
    if args.noise:
        main_noise(args)
        return
    load_start = list(os.getloadavg())
    rows = []
    device = torch.device(args.device)
    k = args.multiplicity
    opacus_modes = ("opacus_gsm", "opacus_ghost")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        cases = []
        for b in (256, 1024):
            x = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1
            cases.append(("SmallCNN (GroupNorm, tanh; dpsgd-classifier)", SmallCNN, classifier_loss,
                          (x, torch.randint(0, 10, (b,), generator=g)), None))
        make, loss_fn, batch, _ = _edm_case({}, args.unet_batch, g, k)
        cases.append((f"dpdm cpu preset U-Net (EDM loss, K={k})", make, loss_fn, batch, args.physical))
        make, loss_fn, batch, _ = _edm_case(PAPER_UNET, args.paper_batch, g, k)
        cases.append((f"dpdm paper U-Net (EDM loss, K={k})", make, loss_fn, batch, args.physical))
        for name, make, loss_fn, batch, physical in cases:
            if args.only and args.only not in name:
                continue
            modes = opacus_modes if k == 1 or "U-Net" not in name else ()  # Opacus: one row per example
            row = {"threads": threads, "device": str(device),
                   **measure(name, make, loss_fn, batch, args.repeats, not args.no_ledger_file, physical, modes,
                             device)}
            rows.append(row)
            s, r = row["step_s"], row["ratio_vs_nonprivate"]
            print(f"[{threads} thread(s)] {name}, {row['parameters']} params, batch {row['batch']}: "
                  f"non-private {s['nonprivate']:.4f} s; "
                  + "; ".join(f"{k} {s[k]:.4f} s ({r[k]:.2f}x)" for k in r)
                  + f"; dpimages uses {row['dpimages_per_example']} (physical batch {row['dpimages_physical_batch']})",
                  flush=True)
    out = {
        "machine": args.machine,
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "repeats": args.repeats,
        "statistic": "median of interleaved steps",
        "keep_freed_memory": allocator,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
