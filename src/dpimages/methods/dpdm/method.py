"""DPDM (Dockhorn, Cao, Vahdat, Kreis; TMLR 2023): a class-conditional diffusion model trained with DP-SGD.

Privacy contract
----------------
Neighbouring relation: add or remove one image together with its label.
The only access to private data is `dpimages.privacy.dpsgd.DPSGD`:

1. Before any private pixel is read, the schedule is fixed from public
   choices: sample rate ``q = batch_size / N`` and ``steps = round(epochs *
   N / batch_size)`` (N, the data set size, is treated as public, as in
   every DP-SGD library), and the noise multiplier sigma is calibrated for
   the target (epsilon, delta) with `dpimages.privacy.calibrate_dpsgd`. The
   whole schedule is reserved in the ledger (refused up front if it would
   exceed the budget).
2. Each step is one Poisson-subsampled Gaussian mechanism of the engine: the
   per-example loss is EDM's weighted denoising loss averaged over K noise
   draws (noise multiplicity, `dpimages.nets.edm.edm_loss`); the engine
   clips the gradient of that one value per example to ``clip_norm``, sums,
   records the step in the ledger, adds ``N(0, (sigma C)^2)`` and divides by
   the expected batch size. Averaging before clipping keeps each example's
   contribution at most C, so K does not change the privacy cost.
3. Everything else is post-processing of the noisy gradients: Adam, the EMA
   of weights, sample grids, the final samples. Nothing computed from private
   data other than the noisy gradients is logged: not per-batch losses, not
   batch sizes (``noisy_grad_norm``, a function of the released gradient, is
   logged), and no per-step time (the time of a step grows with its private
   batch size): times are logged only for a whole run, in the ``paused`` and
   ``train_done`` events.
4. The training randomness (diffusion noise, noise levels, label dropout)
   comes from a training generator ``g`` seeded with the public seed, and is
   keyed so that it cannot carry one example's membership into another
   example's gradient: each step takes exactly one 63-bit step key from
   ``g`` (`step_key`), whatever the batch, and each example's draws are a
   function of (step key, its dataset index) alone (`example_seeds`,
   `DPDM._draws`). So ``g``'s state after any step, and the draws of every
   other example, are the same with or without any one example in the
   batch: one example changes the clipped sum by one clipped gradient.

The ledger holds one event: ``subsampled_gaussian(sigma, q, steps)`` labelled
``dpdm``. A resumed run continues only the steps its ledger still lacks
(`DPSGD.steps_remaining`), so a crash can over-count but never under-count.
``max_minutes`` and ``steps_per_run`` only split the fixed schedule into several
processes (each stops at a step boundary after a checkpoint).

Several processes (torchrun, ``distributed = True``): the engine's process
group mode. Rank 0 draws each Poisson batch and the noise; every rank clips
its shard (the batch's positions rank, rank + world, ...) and the sums are
all-reduced, so the schedule, sigma, ledger and noise are those of one
process. Every rank holds the same training generator and takes the same
step key each step; each rank draws only its own examples' training
randomness, keyed by their dataset indices, so the draws do not depend on
the number of processes either. Rank 0 alone writes the run directory; sigma
and the ``max_minutes`` decision are rank 0's on every rank, so all ranks run
and stop at the same steps.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpimages.api import FitContext, register
from dpimages.data import ImageData, to_uint8
from dpimages.distributed import rank0_values
from dpimages.errors import InputError
from dpimages.eval.grid import save_grid
from dpimages.methods.common import TrainedSynthesizer, load_frozen
from dpimages.methods.dpdm.config import DPDMConfig
from dpimages.nets.edm import EDMDenoiser, edm_loss
from dpimages.nets.unet import UNet, num_parameters
from dpimages.privacy import calibrate_dpsgd
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed

RELEASE_LABEL = "dpdm"
_TRAIN_SEED_OFFSET = 7919  # training randomness (diffusion noise) is seeded apart from the privacy noise


def schedule(n: int, batch_size: int, epochs: float, max_steps: int = 0) -> tuple[float, int]:
    """(sample rate q, steps) of the DP-SGD schedule for N = n examples: public choices only.

    ``max_steps`` > 0 caps the steps (the smoke preset: seconds on any data set size).
    """
    if batch_size > n:
        raise InputError(f"batch_size {batch_size} is larger than the data set ({n} images): lower batch_size")
    q = batch_size / n
    steps = max(1, round(epochs * n / batch_size))
    return q, min(steps, max_steps) if max_steps > 0 else steps


def step_key(g: torch.Generator) -> int:
    """One DP step's training key: a 63-bit integer taken from the training generator `g`.

    Privacy contract: this is the only use of `g` in a DP step, and it takes the same fixed amount of `g` (one
    64-bit integer draw on `g`'s device) whatever the step's Poisson batch, so `g`'s later states do not depend on
    the private data. Every rank of a process group holds the same `g` and takes the same key.
    """
    return int(torch.empty((), dtype=torch.int64, device=g.device).random_(generator=g))


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on a uint32 array: a bijection (distinct inputs give distinct outputs)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def example_seeds(key: int, idx: torch.Tensor) -> list[int]:
    """The 64-bit generator seed of each dataset index in `idx` (any device) under a step's `key`.

    Privacy contract: each seed is a function of (`key`, that index) only, never of the other indices, their
    number or their order. With the key's halves k_lo, k_hi and f = MurmurHash3's 32-bit finaliser (a bijection),
    the low 32 bits are ``low = f(f(i ^ k_lo) + k_hi)``: a key-dependent bijection of the index, so the examples
    of one step have distinct seeds even on the CPU, whose mt19937 generator keeps only a seed's low 32 bits; the
    high 32 bits ``f(f(low ^ k_hi) + k_lo)`` complete the 64-bit Philox key of a CUDA generator.
    """
    i = idx.detach().cpu().numpy().astype(np.int64)
    if i.size and (int(i.min()) < 0 or int(i.max()) >= 2**32):
        raise InputError("dpdm: dataset indices must be in [0, 2**32)")
    k_lo, k_hi = np.uint32(key & 0xFFFFFFFF), np.uint32((key >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        low = _fmix32(_fmix32(i.astype(np.uint32) ^ k_lo) + k_hi)
        high = _fmix32(_fmix32(low ^ k_hi) + k_lo)
    return ((high.astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)).tolist()

@register
class DPDM(TrainedSynthesizer):
    """DPDM: EDM-preconditioned class-conditional U-Net trained with DP-SGD and noise multiplicity."""

    name = "dpdm"
    Config = DPDMConfig
    description = "DP diffusion model (EDM U-Net) trained with DP-SGD and noise multiplicity"
    device_modules = ("ema_model",)
    distributed = True

    def __init__(self, config: DPDMConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.config: DPDMConfig = config
        self.ema_model: EDMDenoiser | None = None

    # -- model ---------------------------------------------------------------------------------
    def new_model(self) -> EDMDenoiser:
        """A fresh denoiser for this synthesizer's image shape and classes (public facts only)."""
        h, w, c = self.image_shape
        cfg = self.config
        net = UNet((h, w), c, self.num_classes, cfg.channels, cfg.channel_mult, cfg.num_res_blocks,
                   cfg.attn_resolutions, 0.0, cfg.num_heads)
        return EDMDenoiser(net, cfg.sigma_data, cfg.p_mean, cfg.p_std)

    def _loss_fn(self, model: Any, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 drop: torch.Tensor) -> torch.Tensor:
        """Per-example loss for the engine: EDM loss averaged over the K draws (labels dropped to null)."""
        labels = torch.where(drop, self.num_classes, y.unsqueeze(1).expand(drop.shape))
        return edm_loss(model, x, labels, sigma, noise, self.config.sigma_data)

    def _draws(self, idx: torch.Tensor, key: int, model: EDMDenoiser) -> tuple[torch.Tensor, ...]:
        """Training randomness of the examples `idx` under a step's `key`: sigma (b, K), noise (b, K, C, H, W), drop.

        Privacy contract: the draws of dataset index i are a function of (`key`, i) only, the same whatever else
        is in `idx` (or on other ranks): a generator on this synthesizer's device is seeded with
        ``example_seeds(key, idx)[j]`` for row j and fills that row with K (2 + C H W) standard normals: the first
        K give ln sigma = p_mean + p_std z (EDM's log-normal noise levels), the next K the label dropout (z below
        the standard normal's `label_dropout` quantile: probability `label_dropout`), the rest the diffusion noise.
        Everything after the per-row draws is elementwise, so no row depends on another.
        """
        k = self.config.multiplicity
        h, w, c = self.image_shape
        z = torch.empty((idx.numel(), k * (2 + c * h * w)), device=self.device)
        gen = torch.Generator(device=self.device)
        for row, seed in zip(z, example_seeds(key, idx), strict=True):
            gen.manual_seed(seed)
            row.normal_(generator=gen)
        sigma = torch.exp(model.p_mean + model.p_std * z[:, :k])
        p = self.config.label_dropout
        cut = -math.inf if p <= 0 else math.inf if p >= 1 else statistics.NormalDist().inv_cdf(p)
        drop = z[:, k : 2 * k] < cut
        noise = z[:, 2 * k :].reshape(-1, k, c, h, w)
        return sigma, noise, drop

    def _shard(self, idx: torch.Tensor, g: torch.Generator, model: EDMDenoiser) -> Iterator[tuple[torch.Tensor, ...]]:
        """One DP step's training draws for this rank's examples `idx`: (idx, sigma, noise, drop) pieces.

        Takes the step key from `g` at once, on the call (exactly one `step_key` per step, whatever `idx`; call it
        every step on every rank, with an empty `idx` too), then returns an iterator of pieces of at most
        ``physical_batch`` examples, in `idx`'s order, each with its keyed draws (`_draws`). `idx` is this rank's
        shard of the Poisson batch (the whole batch in one process); no rank needs another's examples, and the
        batch size is neither shared between ranks, logged nor returned.
        """
        key = step_key(g)
        pb = self.config.physical_batch

        def pieces() -> Iterator[tuple[torch.Tensor, ...]]:
            for start in range(0, idx.numel(), pb):
                part = idx[start : start + pb]
                yield (part, *self._draws(part, key, model))

        return pieces()

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Calibrate, reserve the schedule, then train with DP-SGD (see the module docstring)."""
        cfg = self.config
        if private.labels is None:
            raise InputError(f"{private.name}: dpdm needs labelled private data (class-conditional model)")
        tensors, state = self.begin_fit(private, ctx)
        n = len(private)
        # 1. the schedule and sigma, from public choices only, before any private pixel is read
        q, steps = schedule(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        sigma = calibrate_dpsgd(ctx.ledger.epsilon_budget, ctx.ledger.delta, q, steps)
        (sigma,) = rank0_values(sigma)  # a process group: every rank records rank 0's sigma
        model = self.new_model().to(self.device)
        sampler = PoissonSampler.for_batch_size(n, cfg.batch_size, ctx.noise)
        engine = DPSGD(model, self._loss_fn, sampler=sampler, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                       ledger=ctx.ledger, noise=ctx.noise, label=RELEASE_LABEL, max_physical_batch=cfg.physical_batch)
        engine.plan(steps)
        self.train_info = {"sample_rate": q, "steps": steps, "noise_multiplier": sigma, "dataset_size": n,
                           "parameters": num_parameters(model), "train_s": 0.0}
        ema = self.new_model().to(self.device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator(device=self.device).manual_seed(ctx.seed + _TRAIN_SEED_OFFSET)
        if "ema.net.conv_in.weight" in tensors:
            model.load_state_dict(unprefixed("model", tensors))
            ema.load_state_dict(unprefixed("ema", tensors))
            load_optimizer("opt", opt, tensors, state["optimizer"], self.device)
            set_rng_state(g, state["train_rng"])
            self.train_info["train_s"] = float(state.get("train_s", 0.0))
            if abs(float(state.get("noise_multiplier", sigma)) - sigma) > 1e-12:
                raise InputError("--resume: the calibrated noise multiplier differs from the checkpoint's")
        self.ema_model = ema
        if state.get("finished"):
            return
        # 2. DP-SGD: the only access to private data
        x_all = private.to_tensor(self.device)
        y_all = private.label_tensor(self.device)
        self._train(ctx, engine, model, ema, opt, g, x_all, y_all)

    def _train(self, ctx: FitContext, engine: DPSGD, model: EDMDenoiser, ema: EDMDenoiser,
               opt: torch.optim.Optimizer, g: torch.Generator, x_all: torch.Tensor, y_all: torch.Tensor) -> None:
        cfg = self.config
        run = ctx.run
        writer = run is not None and run.writer  # in a process group: rank 0 only
        planned = int(self.train_info["steps"])
        remaining = engine.steps_remaining
        first = planned - remaining  # steps already in the ledger (a resumed run)
        t_start = time.time()
        elapsed0 = float(self.train_info["train_s"])
        bar = tqdm(total=planned, initial=first, disable=not ctx.progress, desc="dpdm DP-SGD steps")
        step = engine.steps_spent
        ema_params = list(ema.parameters())
        model_params = list(model.parameters())
        while engine.steps_remaining > 0:
            idx = engine.sampler.sample().to(self.device)
            for part, sigma, noise, drop in self._shard(idx, g, model):
                engine.clip_and_accumulate(x_all[part], y_all[part], sigma, noise, drop)
            info = engine.add_noise()  # ledger spend, then noise; sets .grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            step = info.step
            decay = min(cfg.ema, (1.0 + step) / (10.0 + step)) if cfg.ema_warmup else cfg.ema
            with torch.no_grad():
                for e, p in zip(ema_params, model_params, strict=True):
                    e.lerp_(p, 1.0 - decay)
            bar.update(1)
            elapsed = elapsed0 + time.time() - t_start
            self.train_info["train_s"] = elapsed
            if run is not None:
                if step % cfg.log_every == 0 or engine.steps_remaining == 0:  # no time: see the module docstring
                    run.log(step, noisy_grad_norm=round(info.noisy_grad_norm, 6), ema_decay=round(decay, 6))
                if writer and step % cfg.grid_every == 0 and engine.steps_remaining > 0:
                    self._grid(ema, run.samples_dir / f"grid-{step:07d}.png")
                out_of_time = cfg.max_minutes > 0 and time.time() - t_start > 60.0 * cfg.max_minutes
                if cfg.max_minutes > 0:
                    out_of_time = bool(rank0_values(float(out_of_time))[0])  # every rank stops at rank 0's step
                out_of_steps = cfg.steps_per_run > 0 and step - first >= cfg.steps_per_run
                pause = (out_of_time or out_of_steps) and engine.steps_remaining > 0
                if writer and engine.steps_remaining > 0 and (step % cfg.checkpoint_every == 0 or pause):
                    self._checkpoint(ctx, model, ema, opt, g, step, finished=False)
                if pause:
                    reason = f"max_minutes={cfg.max_minutes:g}" if out_of_time else f"steps_per_run={cfg.steps_per_run}"
                    run.log(step, event="paused", reason=reason, steps_left=engine.steps_remaining,
                            **self._run_times(step - first, t_start))
                    bar.close()
                    return
        bar.close()
        if writer:
            assert run is not None
            self._checkpoint(ctx, model, ema, opt, g, step, finished=True)
            self._grid(ema, run.samples_dir / "grid-final.png")
            run.log(step, event="train_done", steps=planned, **self._run_times(step - first, t_start))

    def _run_times(self, steps_run: int, t_start: float) -> dict[str, float]:
        """Whole-run times for the ``paused`` / ``train_done`` events: the training time so far (all processes of
        the run) and this process's mean DP steps per second over its `steps_run` steps. Never per step."""
        rate = steps_run / max(1e-9, time.time() - t_start)
        return {"train_s": round(float(self.train_info["train_s"]), 1), "steps_per_s": round(rate, 4)}

    def _checkpoint(self, ctx: FitContext, model: EDMDenoiser, ema: EDMDenoiser, opt: torch.optim.Optimizer,
                    g: torch.Generator, step: int, *, finished: bool) -> None:
        assert ctx.run is not None
        opt_tensors, opt_groups = optimizer_tensors("opt", opt)
        tensors = {**prefixed("model", model.state_dict()), **prefixed("ema", ema.state_dict()), **opt_tensors}
        state = {
            "step": step, "finished": finished, "optimizer": opt_groups, "train_rng": rng_state(g),
            "noise_rng": ctx.noise_state(), "noise_multiplier": self.train_info["noise_multiplier"],
            "train_s": round(float(self.train_info["train_s"]), 2), **self.meta(),
        }
        ctx.run.save_checkpoint(tensors, state)

    def _grid(self, model: EDMDenoiser, path: Path, per_class: int = 10) -> None:
        """Per-class sample grid from the EMA weights (post-processing; fixed seed)."""
        y = torch.arange(self.num_classes * per_class) // per_class
        x = self._generate(model, y, torch.Generator().manual_seed(7))
        save_grid(path, to_uint8(x), y.numpy(), self.num_classes, per_class)

    @torch.no_grad()
    def _generate(self, model: EDMDenoiser, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg = self.config
        h, w, c = self.image_shape
        was = model.training
        model.eval()
        x = model.generate(labels.to(self.device), (c, h, w), steps=cfg.sample_steps, sampler=cfg.sampler,
                           guidance=cfg.guidance, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho,
                           generator=g)
        model.train(was)
        return x

    # -- sampling and state -----------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the EMA weights; labels (n,) int64, or None for balanced classes."""
        if self.ema_model is None:
            raise InputError("dpdm: fit or load the synthesizer before sampling")
        labels = self.checked_labels(n, labels)
        g = torch.Generator().manual_seed(int(seed or 0))
        bs = self.config.sample_batch
        out = []
        for i in tqdm(range(0, n, bs), desc="dpdm sampling", unit="batch", disable=n <= bs):
            y = torch.from_numpy(labels[i : i + bs])
            out.append(to_uint8(self._generate(self.ema_model, y, g)))
        return ImageData(np.concatenate(out), labels, list(self.classes), "dpdm samples")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling (EMA) weights, prefixed ``ema.``."""
        if self.ema_model is None:
            raise InputError("dpdm: nothing to save before fit")
        return prefixed("ema", self.ema_model.state_dict())

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ema_model = load_frozen(self.new_model, "ema", tensors, "dpdm", self.device)

    # -- report ------------------------------------------------------------------------------------
    def report_section(self) -> str:
        cfg = self.config
        t = self.train_info
        if not t:
            return ""
        h, w, c = self.image_shape
        return "\n".join([
            f"DPDM (Dockhorn et al., TMLR 2023): a class-conditional U-Net ({t.get('parameters', 0):,} parameters; "
            f"channels {cfg.channels}, multipliers {list(cfg.channel_mult)}, {cfg.num_res_blocks} residual blocks "
            f"per level, attention at {list(cfg.attn_resolutions)}) with EDM preconditioning (sigma_data "
            f"{cfg.sigma_data:.4f}, ln sigma ~ N({cfg.p_mean:g}, {cfg.p_std:g}^2)) on {h}x{w}x{c} images, "
            f"{self.num_classes} classes.",
            "",
            f"- Privacy: neighbouring relation {NEIGHBOURING_TEXT} (add/remove). DP-SGD on the private images only: "
            f"Poisson sampling with rate q = {t['sample_rate']:.6g} (expected batch {cfg.batch_size}), "
            f"{t['steps']} steps ({cfg.epochs:g} epochs), per-example clipping C = {cfg.clip_norm:g}, "
            f"noise multiplier {t['noise_multiplier']:.5g} (calibrated for the target epsilon before training).",
            f"- Noise multiplicity K = {cfg.multiplicity}: each example's loss is the mean over K noise draws "
            "before clipping, so its contribution stays <= C and the privacy cost does not depend on K.",
            f"- Post-processing: Adam lr {cfg.lr:g}, EMA {cfg.ema:g}{' with warm-up' if cfg.ema_warmup else ''} "
            f"(samples use the EMA weights), label dropout {cfg.label_dropout:g} for classifier-free guidance; "
            f"training time {t.get('train_s', 0.0):.0f} s.",
            f"- Sampling: {cfg.sampler} sampler, {cfg.sample_steps} EDM steps (sigma {cfg.sigma_max:g} to "
            f"{cfg.sigma_min:g}, rho {cfg.rho:g}), guidance {cfg.guidance:g}.",
            "- Logged during training: only the noisy gradient's norm (a function of released values) and the EMA "
            "decay; times only for a whole run (a step's time grows with its private batch size).",
        ])
