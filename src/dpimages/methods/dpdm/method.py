"""DPDM (Dockhorn, Cao, Vahdat, Kreis; TMLR 2023): a class-conditional diffusion model trained with DP-SGD.

Privacy contract
----------------
Neighbouring relation: add or remove one image together with its label.
The only access to private data is `dpimages.privacy.dpsgd.DPSGD` and, with a
warm start, the stage's `dpimages.privacy` mechanisms (see "Warm start" below):

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
   is keyed so that it cannot carry one example's membership into another
   example's gradient: each step takes one secret key from the run's
   `NoiseSource` (`dpimages.privacy.keyed.shared_secret_key`), whatever the
   batch, and each example's draws are a function of (that key, the
   example's content digest) alone (`DPDM._draws`, `draws.keyed_normals`),
   never of its dataset index. So the draws of every other example are the
   same with or without any one example in the data, wherever it sits: one
   example changes the clipped sum by one clipped gradient. (Until issue 34
   the key came from the public seed stream and the draws followed the
   dataset index, so inserting an image shifted every later image's draws.)

Warm start (``warm_start``, `dpimages.methods.dpdm.warm`): a first stage
whose events are planned from public facts, sigma calibrated over them and
the schedule together (one PLD composition), everything reserved before any
private access; its releases go through `dpimages.privacy` mechanisms and
the U-Net is pretrained on its images (post-processing) before step 1. In a
process group rank 0 alone runs the stage and its weights are broadcast.

Without a warm start the ledger holds one event: ``subsampled_gaussian(sigma, q, steps)`` labelled
``dpdm``; with one, the stage's events come first. A resumed run continues only the steps its ledger still lacks
(`DPSGD.steps_remaining`), so a crash can over-count but never under-count.
``max_minutes`` and ``steps_per_run`` only split the fixed schedule into several
processes (`RunClock` in the kit's `TrainLoop`: each stops at a step boundary
after a checkpoint).

Several processes (torchrun, ``distributed = True``): the engine's process
group mode. Rank 0 draws each Poisson batch, each step key and the noise;
every rank clips its shard (the batch's positions rank, rank + world, ...)
and the sums are all-reduced, so the schedule, sigma, ledger and noise are
those of one process. Every rank gets rank 0's step key and draws only its
own examples' training randomness, keyed by their content, so the draws do
not depend on the number of processes either. Rank 0 alone writes the run
directory; sigma and the ``max_minutes`` decision
(``RunClock(distributed=True)``) are rank 0's on every rank, so all ranks
run and stop at the same steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpimages.data import ImageData
from dpimages.distributed import broadcast_module, dist_world, rank0_values
from dpimages.errors import InputError
from dpimages.methods.base import TrainedSynthesizer, load_frozen
from dpimages.methods.dpdm import warm
from dpimages.methods.dpdm.config import DPDMConfig
from dpimages.methods.dpdm.draws import keyed_normals
from dpimages.methods.labeller import labeller_text
from dpimages.methods.pretrain import PretrainSchedule, train_denoiser
from dpimages.methods.prior import refuse_spent_stage
from dpimages.methods.training import RunClock, TrainLoop, ema_update, warmup_decay, write_grid
from dpimages.nets.edm import EDMDenoiser, edm_loss
from dpimages.nets.unet import UNet, fit_levels, num_parameters
from dpimages.privacy import calibrate_dpsgd
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.keyed import content_digests, keyed_values, shared_secret_key
from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, unprefixed
from dpimages.synthesizer import FitContext

RELEASE_LABEL = "dpdm"


def warm_report(info: dict[str, Any], cfg: DPDMConfig) -> list[str]:
    """The report's lines on the warm start (its stage, share and pretraining), from `train_info["warm"]`."""
    mode = info.get("mode", "none")
    if mode == "none":
        return ["- Warm start: none (DP-SGD from a random initialisation, as published)."]
    what = {
        "central": f"{cfg.central_releases} noisy central images per class (DP-FETA): per-class means of "
                   f"{cfg.central_size}x{cfg.central_size} downsampled images over Poisson batches of rate "
                   f"{info.get('central_rate', 0.0):.4g}, noise multiplier {info.get('central_noise', 0.0):.4g}",
        "dp-mepf": f"a DP-MEPF prior (preset {cfg.warm_preset}) fitted on the private data; "
                   f"{cfg.warm_images:,} of its samples",
        "public": (f"the public images of the {len(info.get('selected_classes', []))} public classes chosen by "
                   "one noisy histogram of the private images' predicted public classes (noise multiplier "
                   f"{info.get('select_noise', 0.0):.4g}, sensitivity 1): "
                   f"{', '.join(map(str, info.get('selected_classes', [])))}" if info.get("select_keep")
                   else "the public images (no privacy cost)"),
    }[mode]
    pre = info.get("pretrain", {})
    lines = [f"- Warm start `{mode}`: {what}. Pretraining (post-processing, no privacy cost): "
             f"{pre.get('steps', 0)} steps of batch {pre.get('batch', cfg.warm_batch)} "
             f"({pre.get('epochs_done', 0)} passes, "
             f"{'class-conditional' if info.get('conditional') else 'null label'}), {pre.get('train_s', 0)} s; "
             "then DP-SGD from the pretrained weights."]
    if info.get("events"):
        lines.append(f"- Joint plan: the stage's releases ({'; '.join(info['events'])}) were calibrated to "
                     f"epsilon {info.get('epsilon_share', 0.0):.4g} (share {cfg.warm_share:g} of the budget) on "
                     "their own; DP-SGD's noise multiplier was then calibrated over the stage's events and the "
                     "DP-SGD steps together (one PLD composition), and all of it was reserved in the ledger "
                     "before any private pixel was read.")
    return lines


def schedule(n: int, batch_size: int, epochs: float, max_steps: int = 0) -> tuple[float, int]:
    """(sample rate q, steps) of the DP-SGD schedule for N = n examples: public choices only.

    ``max_steps`` > 0 caps the steps (the smoke preset: seconds on any data set size).
    """
    if batch_size > n:
        raise InputError(f"batch_size {batch_size} is larger than the data set ({n} images): lower batch_size")
    q = batch_size / n
    steps = max(1, round(epochs * n / batch_size))
    return q, min(steps, max_steps) if max_steps > 0 else steps


class DPDM(TrainedSynthesizer[DPDMConfig]):
    """DPDM: EDM-preconditioned class-conditional U-Net trained with DP-SGD and noise multiplicity."""

    name = "dpdm"
    Config = DPDMConfig
    description = "DP diffusion model (EDM U-Net) trained with DP-SGD and noise multiplicity"
    device_modules = ("ema_model",)
    distributed = True

    def __init__(self, config: DPDMConfig) -> None:
        super().__init__(config)
        self.ema_model: EDMDenoiser | None = None

    @classmethod
    def contract_cases(cls, workdir: Path) -> list[dict[str, Any]]:
        """The stages with private reads that the smoke preset (dp-mepf prior) leaves off: central images (with
        the DP labeller's stage after it), and the public class selection (foreign public classes; the other
        private set is the contract's in negative, whose images the selection classifier puts in other public
        classes)."""
        from dpimages.data.toy import toy_bars, toy_other_bars

        bars = toy_bars(seed=9, shift=3)
        public = ImageData(bars.images, bars.labels, [f"public-{c}" for c in bars.classes], "foreign toy bars")
        other = toy_other_bars()
        negative = ImageData(255 - toy_bars().images, other.labels, other.classes, "negative toy bars")
        return [{"name": "central+labeller", "overrides": ["warm_start=central", "labeller=relabel"]},
                {"name": "public-selection", "overrides": ["warm_start=public", "public_classes=3",
                                                           "select_epochs=10"], "public": public, "other": negative}]

    # -- model ---------------------------------------------------------------------------------
    def new_model(self) -> EDMDenoiser:
        """A fresh denoiser for this synthesizer's image shape and classes (public facts only)."""
        h, w, c = self.image_shape
        cfg = self.config
        levels = tuple(self.train_info.get("unet_levels") or fit_levels(cfg.channel_mult, (h, w)))
        net = UNet((h, w), c, self.num_classes, cfg.channels, levels, cfg.num_res_blocks,
                   cfg.attn_resolutions, 0.0, cfg.num_heads)
        return EDMDenoiser(net, cfg.sigma_data, cfg.p_mean, cfg.p_std)

    def _loss_fn(self, model: Any, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 drop: torch.Tensor) -> torch.Tensor:
        """Per-example loss for the engine: EDM loss averaged over the K draws (labels dropped to null)."""
        labels = torch.where(drop, self.num_classes, y.unsqueeze(1).expand(drop.shape))
        return edm_loss(model, x, labels, sigma, noise, self.config.sigma_data)

    def _draws(self, digests: np.ndarray, key: int, model: EDMDenoiser) -> tuple[torch.Tensor, ...]:
        """Training randomness of the examples with content `digests` under a step's secret `key`: sigma (b, K),
        noise (b, K, C, H, W), drop.

        Privacy contract: an example's draws are a function of (`key`, its content digest) only, the same whatever
        else is in the batch (or on other ranks) and wherever the example sits in the data: a generator on this
        synthesizer's device is seeded with ``keyed_values(digests, key)[j]`` for row j and fills that row with
        K (2 + C H W) standard normals (`keyed_normals`): the first K give ln sigma = p_mean + p_std z (EDM's
        log-normal noise levels), the next K the label dropout (z below the standard normal's `label_dropout`
        quantile: probability `label_dropout`), the rest the diffusion noise. Everything after the per-row draws
        is elementwise, so no row depends on another.
        """
        k = self.config.multiplicity
        h, w, c = self.image_shape
        z = keyed_normals(keyed_values(digests, key), k * (2 + c * h * w), self.device)
        sigma = torch.exp(model.p_mean + model.p_std * z[:, :k])
        p = self.config.label_dropout
        cut = -math.inf if p <= 0 else math.inf if p >= 1 else statistics.NormalDist().inv_cdf(p)
        drop = z[:, k : 2 * k] < cut
        noise = z[:, 2 * k :].reshape(-1, k, c, h, w)
        return sigma, noise, drop

    def _shard(self, idx: torch.Tensor, digests: np.ndarray, key: int,
               model: EDMDenoiser) -> Iterator[tuple[torch.Tensor, ...]]:
        """One DP step's training draws for this rank's examples `idx`: (idx, sigma, noise, drop) pieces.

        Pieces of at most ``physical_batch`` examples, in `idx`'s order, each with its keyed draws (`_draws`,
        from the examples' content `digests` and the step's secret `key`). `idx` is this rank's shard of the
        Poisson batch (the whole batch in one process); no rank needs another's examples, and the batch size is
        neither shared between ranks, logged nor returned.
        """
        pb = self.config.physical_batch
        for start in range(0, idx.numel(), pb):
            part = idx[start : start + pb]
            yield (part, *self._draws(digests[part.cpu().numpy()], key, model))

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Calibrate, reserve the schedule, then train with DP-SGD (see the module docstring)."""
        cfg = self.config
        if private.labels is None:
            raise InputError(f"{private.name}: dpdm needs labelled private data (class-conditional model)")
        tensors, state = self.begin_fit(private, ctx)
        n = ctx.public_size(private)
        # 1. the schedule and sigma, from public choices only, before any private pixel is read
        q, steps = schedule(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        stage = warm.plan(cfg, private, public, ctx.target_epsilon, ctx.ledger.delta, n)
        labeller = self.labeller_plan(n, ctx.target_epsilon, ctx.ledger.delta)
        if labeller is not None and dist_world()[1] > 1:
            raise InputError("labeller: the DP labeller runs in one process; fit without torchrun, or labeller=none")
        before = [*stage.events, *([] if labeller is None else labeller.events())]
        sigma = calibrate_dpsgd(ctx.target_epsilon, ctx.ledger.delta, q, steps, before)
        (sigma,) = rank0_values(sigma)  # a process group: every rank records rank 0's sigma
        with ctx.seeded_init("model"):
            model = self.new_model().to(self.device)
            ema = self.new_model().to(self.device)
        sampler = PoissonSampler.for_batch_size(len(private), cfg.batch_size, ctx.noise, dataset_size=n)
        engine = DPSGD(model, self._loss_fn, sampler=sampler, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                       ledger=ctx.ledger, noise=ctx.noise, label=RELEASE_LABEL, max_physical_batch=cfg.physical_batch,
                       per_example=cfg.per_example)
        ctx.ledger.reserve(*before)  # the whole joint plan is reserved before any private access
        engine.plan(steps)
        self.train_info = {"sample_rate": q, "steps": steps, "noise_multiplier": sigma, "dataset_size": n,
                           "unet_levels": list(fit_levels(cfg.channel_mult, self.image_shape[:2])),
                           "parameters": num_parameters(model), "train_s": 0.0, "warm": stage.describe()}
        resumed = "ema.net.conv_in.weight" in tensors
        if not resumed and stage.mode != "none":
            if dist_world()[0] == 0:  # rank 0 alone makes the stage's releases (its ledger is the run's)
                self._warm_start(stage, private, public, ctx, model)
            broadcast_module(model)  # every rank starts DP-SGD from rank 0's pretrained weights
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        if resumed:
            model.load_state_dict(unprefixed("model", tensors))
            ema.load_state_dict(unprefixed("ema", tensors))
            load_optimizer("opt", opt, tensors, state["optimizer"], self.device)
            self.train_info["train_s"] = float(state.get("train_s", 0.0))
            self.train_info["warm"] = state.get("warm", self.train_info["warm"])
            if abs(float(state.get("noise_multiplier", sigma)) - sigma) > 1e-12:
                raise InputError("--resume: the calibrated noise multiplier differs from the checkpoint's")
        if labeller is not None:  # after the warm stage, before DP-SGD; restored when resumed
            self.fit_labeller(labeller, private, ctx, tensors)
        if not resumed and (stage.mode != "none" or labeller is not None) and ctx.run is not None and ctx.run.writer:
            self._checkpoint(ctx, model, ema, opt, 0, finished=False)  # a crash after this keeps the stages
        self.ema_model = ema
        if state.get("finished"):
            return
        # 2. DP-SGD: the only access to private data
        x_all = private.to_tensor(self.device)
        y_all = private.label_tensor(self.device)
        self._train(ctx, engine, model, ema, opt, x_all, y_all, content_digests(private.images, private.labels))

    def _warm_start(self, stage: warm.WarmStart, private: ImageData, public: ImageData | None, ctx: FitContext,
                    model: EDMDenoiser) -> None:
        """Run the warm start's stage (its DP releases, in the reserved plan) and pretrain `model` on its images.

        Pretraining is post-processing of the stage's releases (or public images): no ledger, no noise. A run
        that stopped inside the stage (its events spent, no checkpoint after it) cannot go on without spending
        them again, so it is refused.
        """
        cfg = self.config
        refuse_spent_stage(ctx.ledger, stage.events, "warm-start")
        images, labels = warm.run_stage(stage, cfg, private, public, ctx)
        with ctx.seeded_init("warm-ema"):
            ema = self.new_model().to(self.device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        schedule = PretrainSchedule(epochs=cfg.warm_epochs, batch_size=cfg.warm_batch, lr=cfg.warm_lr,
                                    ema=cfg.warm_ema, label_dropout=cfg.label_dropout,
                                    augment=stage.mode == "central", log_every=10 * cfg.log_every)
        run = ctx.run
        log = None if run is None else (  # losses on the stage's (DP or public) images: post-processing
            lambda step, **values: run.log(0, event="warm_start_pretraining", pretrain_step=step, **values))
        facts = train_denoiser(model, ema, images, labels, schedule, ctx.generator("pretrain"), device=self.device,
                               progress=ctx.progress, desc=f"dpdm pretraining on {stage.mode} images (no privacy cost)",
                               log=log)
        model.load_state_dict(ema.state_dict())  # DP-SGD starts from the pretrained EMA weights
        self.train_info["warm"].update(images=int(images.shape[0]), conditional=labels is not None, pretrain=facts)
        if stage.selected:
            self.train_info["warm"]["selected_classes"] = stage.selected
        if stage.prior is not None:
            self.train_info["warm"]["prior"] = getattr(stage.prior.synthesizer, "train_info", {})
        if ctx.run is not None:
            ctx.run.log(0, event="warm_start_done", mode=stage.mode, images=int(images.shape[0]),
                        pretrain_steps=facts["steps"], pretrain_s=facts["train_s"])

    def _train(self, ctx: FitContext, engine: DPSGD, model: EDMDenoiser, ema: EDMDenoiser,
               opt: torch.optim.Optimizer, x_all: torch.Tensor, y_all: torch.Tensor, digests: np.ndarray) -> None:
        """The DP-SGD steps the ledger still lacks, in a `TrainLoop`; every rank pauses at rank 0's decision."""
        cfg = self.config

        def step(t: int) -> dict[str, Any]:
            idx = engine.sampler.sample().to(self.device)
            key = shared_secret_key(ctx.noise)  # one secret key per step, whatever the batch (rank 0's on every rank)
            for part, sigma, noise, drop in self._shard(idx, digests, key, model):
                engine.clip_and_accumulate(x_all[part], y_all[part], sigma, noise, drop)
            info = engine.add_noise()  # ledger spend, then noise; sets .grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            decay = warmup_decay(cfg.ema, info.step) if cfg.ema_warmup else cfg.ema
            ema_update(ema, model, decay)
            # no loss, batch size or time: see the module docstring
            return {"noisy_grad_norm": round(info.noisy_grad_norm, 6), "ema_decay": round(decay, 6)}

        def after_step(t: int) -> None:
            self.train_info["train_s"] = loop.train_s()

        planned = int(self.train_info["steps"])
        loop = TrainLoop(
            ctx.run, planned, step,
            checkpoint=lambda t, finished: self._checkpoint(ctx, model, ema, opt, t, finished=finished),
            clock=RunClock(cfg.max_minutes, cfg.steps_per_run, distributed=True),  # rank 0's time decision
            grid=lambda path: write_grid(path, lambda y, g: self._generate(ema, y, g), self.num_classes),  # EMA weights
            log_every=cfg.log_every, grid_every=cfg.grid_every,
            checkpoint_every=cfg.checkpoint_every, progress=ctx.progress, desc="dpdm DP-SGD steps",
            train_s0=float(self.train_info["train_s"]), after_step=after_step)
        loop(planned - engine.steps_remaining)  # steps already in the ledger (a resumed run) are not run again

    def _checkpoint(self, ctx: FitContext, model: EDMDenoiser, ema: EDMDenoiser, opt: torch.optim.Optimizer,
                    step: int, *, finished: bool) -> None:
        assert ctx.run is not None
        opt_tensors, opt_groups = optimizer_tensors("opt", opt)
        tensors = {**prefixed("model", model.state_dict()), **prefixed("ema", ema.state_dict()), **opt_tensors,
                   **self.labeller_tensors()}
        self.save_checkpoint(ctx, tensors, step=step, finished=finished, optimizer=opt_groups,
                             noise_multiplier=self.train_info["noise_multiplier"],
                             train_s=round(float(self.train_info["train_s"]), 2), warm=self.train_info.get("warm", {}))

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
        model = self.ema_model
        if model is None:
            raise InputError("dpdm: fit or load the synthesizer before sampling")
        bs = self.config.sample_batch
        with tqdm(total=n, desc="dpdm sampling", unit="image", disable=n <= bs) as bar:

            def generate(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                bar.update(len(y))
                return self._generate(model, y, g)

            return self.sample_in_batches(n, labels, seed, bs, generate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling (EMA) weights, prefixed ``ema.``, and the DP labeller's (``labeller.``) if any."""
        return {**self.ema_state_dict(), **self.labeller_tensors()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ema_model = load_frozen(self.new_model, "ema", tensors, "dpdm", self.device)
        self.load_labeller(tensors)

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
            *warm_report(t.get("warm", {}), cfg),
            *([f"- {labeller_text(t['labeller'])}"] if "labeller" in t else []),
            "- Logged during training: only the noisy gradient's norm (a function of released values) and the EMA "
            "decay, and with a warm start the pretraining loss on the stage's images and their count "
            "(post-processing); times only for a whole run or stage (a step's time grows with its private batch "
            "size).",
        ])
