"""DP-SGD engine: per-example gradients, clipping, noise, sampling, accounting, resume, DDP.

Run as a script under torchrun (``--ddp-worker OUT``) this file is also the
worker of the multi-process test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from dpimages.errors import BudgetExceeded, InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger
from dpimages.privacy.dpsgd import (
    DPSGD,
    PoissonSampler,
    auto_physical_batch,
    check_model,
    mean_over_repeats,
    repeat_examples,
    validate_model,
)
from dpimages.privacy.ledger import epsilon_pld

torch.set_num_threads(1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


def xent(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def data(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def engine(model: nn.Module, loss_fn=xent, *, n: int = 100, q: float = 0.1, sigma: float = 1.0, clip: float = 1.0,
           ledger: PrivacyLedger | None = None, noise: NoiseSource | None = None, **kw) -> DPSGD:
    noise = noise or NoiseSource(0)
    ledger = ledger or PrivacyLedger(1e6, 1e-5)
    sampler = PoissonSampler(n, q, noise)
    return DPSGD(model, loss_fn, sampler=sampler, noise_multiplier=sigma, clip_norm=clip, ledger=ledger, noise=noise,
                 **kw)


def test_per_example_grads_equal_a_loop() -> None:
    model = tiny_cnn()
    x, y = data(6)
    grads = engine(model).per_example_grads(x, y)
    for i in range(6):
        model.zero_grad()
        xent(model, x[i : i + 1], y[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-6)


def _multiplicity_loss(k: int):
    """Per-example denoising-style loss averaged over K inner draws passed in as (B, K, ...) noise."""

    def loss(model, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xk = repeat_examples(x, k) + z.reshape(-1, *x.shape[1:])  # (B*K, C, H, W)
        per_draw = F.cross_entropy(model(xk), repeat_examples(y, k), reduction="none") * 50.0  # large: clipping acts
        return mean_over_repeats(per_draw, k)

    return loss


def test_clipped_contribution_at_most_c_with_multiplicity() -> None:
    k, clip = 4, 0.7
    model = tiny_cnn()
    x, y = data(5)
    z = torch.randn(5, k, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    eng = engine(model, _multiplicity_loss(k), clip=clip)
    # the per-example gradient is the mean of the K inner gradients (before any clipping)
    g = eng.per_example_grads(x, y, z)
    name, p = next(iter(model.named_parameters()))
    inner = []
    for j in range(k):
        model.zero_grad()
        (F.cross_entropy(model(x[:1] + z[:1, j]), y[:1], reduction="none") * 50.0).sum().backward()
        inner.append(p.grad.clone())
    torch.testing.assert_close(g[name][0], torch.stack(inner).mean(0), rtol=1e-5, atol=1e-6)
    # each example's clipped contribution has norm <= C (and = C here: the raw gradients are larger)
    raw = torch.cat([t.reshape(5, -1) for t in g.values()], dim=1).norm(dim=1)
    assert (raw > clip).all()
    for i in range(5):
        eng.zero_accumulated()
        eng.clip_and_accumulate(x[i : i + 1], y[i : i + 1], z[i : i + 1])
        norm = float(eng.accumulated().norm())
        assert norm <= clip * (1 + 1e-6)
        assert norm > 0.99 * clip
    # a small gradient is left as it is
    eng.zero_accumulated()
    small = engine(model, xent, clip=1e6)
    small.clip_and_accumulate(x[:1], y[:1])
    flat = torch.cat([t[0].reshape(-1) for t in small.per_example_grads(x[:1], y[:1]).values()])
    torch.testing.assert_close(small.accumulated(), flat, rtol=1e-5, atol=1e-6)


def test_noise_is_gaussian_with_std_sigma_c() -> None:
    sigma, clip, n, q = 1.3, 0.5, 1000, 0.05
    model = nn.Linear(100, 40)  # 4,040 coordinates
    eng = engine(model, xent, n=n, q=q, sigma=sigma, clip=clip)
    eng.step(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))  # empty batch: noise only
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * (q * n)
    assert stats.kstest(noise.double().numpy() / (sigma * clip), "norm").pvalue > 1e-3
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.05


def test_poisson_inclusion_frequency() -> None:
    n, q, steps = 300, 0.07, 300
    sampler = PoissonSampler(n, q, NoiseSource(5))
    assert sampler.steps_per_epoch == round(1 / q) == len(sampler)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        idx = sampler.sample()
        assert idx.dtype == torch.int64 and len(set(idx.tolist())) == len(idx)
        counts[idx.numpy()] += 1
        sizes.append(len(idx))
    lo, hi = stats.binom.interval(1 - 1e-4, n * steps, q)
    assert lo <= counts.sum() <= hi
    lo1, hi1 = stats.binom.interval(1 - 1e-3 / n, steps, q)  # every example, Bonferroni
    assert counts.min() >= lo1 and counts.max() <= hi1
    assert len(set(sizes)) > 5  # the batch size varies: it is not a fixed loader


def test_noise_draws_equal_ledger_steps_and_sample_rate_from_sampler() -> None:
    model = tiny_cnn()
    x, y = data(40)
    noise = NoiseSource(2)
    ledger = PrivacyLedger(50.0, 1e-5)
    eng = engine(model, n=40, q=0.1, noise=noise, ledger=ledger, label="clf")
    eng.plan(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        idx = eng.sampler.sample()
        eng.step(x[idx], y[idx])
        opt.step()
    eng.step(x[:0], y[:0])  # an empty batch also spends and draws noise
    assert noise.gaussian_draws == 7 == sum(e.steps for e in ledger.events)
    assert ledger.events == [PrivacyEvent.subsampled_gaussian(1.0, 0.1, 7, "clf")]
    assert eng.steps_remaining == 0


def test_ledger_refuses_before_noise_is_drawn() -> None:
    model = tiny_cnn()
    x, y = data(10)
    noise = NoiseSource(0)
    ledger = PrivacyLedger(1.0, 1e-5)
    eng = engine(model, n=10, q=0.5, sigma=0.5, noise=noise, ledger=ledger)  # one step costs epsilon > 1
    with pytest.raises(BudgetExceeded):
        eng.step(x[:5], y[:5])
    assert noise.gaussian_draws == 0 and ledger.events == []
    assert all(p.grad is None for p in model.parameters())


def test_virtual_batches_equal_one_batch() -> None:
    x, y = data(11)
    grads = []
    for chunk in (None, 3, 1):
        model = tiny_cnn()
        eng = engine(model, noise=NoiseSource(9), max_physical_batch=chunk)
        eng.step(x, y)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-6)
    # accumulating two calls by hand is the same as one
    model = tiny_cnn()
    eng = engine(model, noise=NoiseSource(9))
    eng.clip_and_accumulate(x[:4], y[:4])
    eng.clip_and_accumulate(x[4:], y[4:])
    eng.add_noise()
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), grads[0],
                               rtol=1e-5, atol=1e-6)


def test_batchnorm_refused_with_layer_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block1 = nn.Sequential()
            self.block1.add_module("conv", nn.Conv2d(1, 4, 3))
            self.block1.add_module("bn", nn.BatchNorm2d(4))
            self.inorm = nn.InstanceNorm2d(4, track_running_stats=True)
            self.ok = nn.GroupNorm(2, 4)

    problems = validate_model(Net())
    assert len(problems) == 2
    with pytest.raises(InputError) as err:
        engine(Net())
    msg = str(err.value)
    assert "model.block1.bn: BatchNorm2d mixes examples in a batch; use GroupNorm" in msg
    assert "model.inorm" in msg and "\n" not in msg
    check_model(tiny_cnn())  # a GroupNorm model passes
    assert validate_model(tiny_cnn()) == []


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="sample_rate"):
        PoissonSampler(10, 1.5, NoiseSource(0))
    with pytest.raises(InputError, match="one loss per example"):
        engine(tiny_cnn(), lambda m, x, y: xent(m, x, y).mean()).step(*data(3))
    with pytest.raises(InputError, match="first"):
        engine(tiny_cnn()).step(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(BudgetExceeded):  # the whole plan is refused before any step
        engine(tiny_cnn(), ledger=PrivacyLedger(0.5, 1e-5), q=0.5, sigma=0.6).plan(100)
    assert auto_physical_batch(26_000, torch.device("cpu")) == 256


def test_resume_runs_only_the_remaining_planned_steps(tmp_path: Path) -> None:
    n, q, planned = 50, 0.2, 10
    x, y = data(n)
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(20.0, 1e-5, path=path)
    eng = engine(tiny_cnn(), n=n, q=q, ledger=ledger)
    eng.plan(planned)
    for step in range(4):
        idx = eng.sampler.sample()
        eng.step(x[idx], y[idx])
        if step == 1:
            checkpoint = {"step": 2}  # the last checkpoint: two steps before the process is killed
    # killed here: privacy.json holds 4 steps, the checkpoint 2
    resumed = PrivacyLedger.load(path)
    eng2 = engine(tiny_cnn(), n=n, q=q, ledger=resumed)
    eng2.plan(planned)
    assert checkpoint["step"] == 2 and eng2.steps_spent == 4
    assert eng2.steps_remaining == planned - resumed.steps(like=eng2.event()) == 6
    for _ in range(eng2.steps_remaining):
        idx = eng2.sampler.sample()
        eng2.step(x[idx], y[idx])
    final = PrivacyLedger.load(path)
    assert sum(e.steps for e in final.events) == planned
    assert final.epsilon() == pytest.approx(epsilon_pld([PrivacyEvent.subsampled_gaussian(1.0, q, planned, "dp-sgd")],
                                                        1e-5))
    assert eng2.steps_remaining == 0


def test_tiny_dp_training_reduces_loss() -> None:
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 10, generator=g) + 1.5 * (2 * y[:, None].float() - 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))

    def loss_all() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = loss_all()
    eng = engine(model, n=n, q=0.1, sigma=1.0, clip=1.0, noise=NoiseSource(4))
    eng.plan(60)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(eng.steps_remaining):
        idx = eng.sampler.sample()
        eng.step(x[idx], y[idx])
        opt.step()
    assert loss_all() < 0.6 * before


# -- multi-process (torchrun, gloo) ------------------------------------------------------
DDP_STEPS = 5


def _ddp_job(out: Path) -> None:
    """The same small DP training in one process or, under torchrun, in several."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    x, y = data(60, seed=7)
    noise = NoiseSource(11)
    ledger = PrivacyLedger(30.0, 1e-5, path=out / f"privacy-{rank}.json" if rank == 0 else None)
    model = tiny_cnn()
    if rank:
        for p in model.parameters():  # other ranks start elsewhere: the engine broadcasts rank 0's weights
            p.data.add_(1.0)
    eng = DPSGD(model, xent, sampler=PoissonSampler(60, 0.2, noise), noise_multiplier=1.1, clip_norm=1.0,
                ledger=ledger, noise=noise, max_physical_batch=4)
    eng.plan(DDP_STEPS)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(eng.steps_remaining):
        idx = eng.sampler.sample()
        eng.step(x[idx], y[idx])
        opt.step()
    result = {
        "events": [e.to_json() for e in ledger.events],
        "epsilon": ledger.epsilon(),
        "gaussian_draws": noise.gaussian_draws,
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
    }
    (out / f"result-{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # two processes under torchrun: seconds on an idle machine, flaky under heavy load
def test_ddp_two_processes_same_accounting(tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    _ddp_job(single)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--ddp-worker", str(multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((single / "result-0.json").read_text())
    r0, r1 = (json.loads((multi / f"result-{r}.json").read_text()) for r in (0, 1))
    assert r0["events"] == r1["events"] == ref["events"]
    assert sum(e["steps"] for e in ref["events"]) == DDP_STEPS
    assert r0["epsilon"] == r1["epsilon"] == ref["epsilon"]
    assert r0["gaussian_draws"] == DDP_STEPS and r1["gaussian_draws"] == 0  # noise drawn once, on rank 0
    assert json.loads((multi / "privacy-0.json").read_text())["events"] == ref["events"]
    assert not (multi / "privacy-1.json").exists()
    np.testing.assert_allclose(r0["params"], ref["params"], rtol=1e-4, atol=1e-5)
    assert r0["params"] == r1["params"]
    assert math.isfinite(ref["epsilon"])


def test_a_process_group_refuses_an_unsharded_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsharded, every rank would clip and add its own whole Poisson batch: one example counted up to world
    times against a ledger that records sensitivity C."""
    import dpimages.privacy.dpsgd as dpsgd_module

    monkeypatch.setattr(dpsgd_module, "dist_world", lambda: (0, 2))
    noise = NoiseSource(0)
    with pytest.raises(InputError, match="sharded sampler"):
        DPSGD(tiny_cnn(), xent, sampler=PoissonSampler(100, 0.1, noise, shard=False), noise_multiplier=1.0,
              clip_norm=1.0, ledger=PrivacyLedger(1e6, 1e-5), noise=noise)


if __name__ == "__main__" and "--ddp-worker" in sys.argv:
    torch.distributed.init_process_group("gloo")
    try:
        _ddp_job(Path(sys.argv[sys.argv.index("--ddp-worker") + 1]))
    finally:
        torch.distributed.destroy_process_group()
