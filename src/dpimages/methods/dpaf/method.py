"""DPAF (Lin et al., 2023): a conditional GAN whose discriminator aggregates real features privately (forward phase).

The discriminator is split, ``D(x, y) = f2(f1(x), y)`` (`nets`). Real images reach f2 only as noisy per-class
aggregates of f1 features; f1 itself is trained with DP-SGD on a loss linearised around released aggregates.
The original paper gives no complete privacy proof; ours is the docstring of `release` (and docs/dpaf.md).

Privacy contract
----------------
Neighbouring relation: add or remove one image together with its label. The schedule and its noise are
fixed, calibrated and reserved in the ledger before any private pixel or label is read (`release.Schedule`,
`release.calibrate_plan`). Private data is read only by the functions of `release`: the class counts once
(`release_counts`), ``cycles * agg_steps`` aggregation releases (`aggregation_release`) and the private half
of each DP-SGD step of f1 (`accumulate_private`, released by the `DPSGD` engine). f2, the generator, its EMA,
the per-class feature references, the f1 targets, the grids and every sample are functions of those releases
and of a training generator seeded apart from the privacy noise: post-processing. The ablation
(``aggregation=false``, method ``dpaf-noagg``) trains the whole discriminator with DP-SGD instead of the
aggregation and f1 releases.

Schedule and resume: each cycle is phase A (``agg_steps`` releases, each followed by f2 and G updates) then
phase B (``f1_steps`` f1 DP-SGD steps). A resumed run counts what the ledger already holds of each release
(`PrivacyLedger.steps`) and runs only the rest, so a crash can over-count but never re-spends. Logged: f2's
losses on released aggregates and on fakes, the generator loss, noisy gradient norms; times only for a whole
run; never a private batch size or a per-example quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.methods.base import TrainedSynthesizer, load_frozen
from dpimages.methods.dpaf import nets as dpaf_nets
from dpimages.methods.dpaf.config import DPAFConfig, DPAFNoAggConfig
from dpimages.methods.dpaf.nets import Nets, build_nets
from dpimages.methods.dpaf.post import PostProcessing
from dpimages.methods.dpaf.release import (
    LABEL_AGG,
    LABEL_D,
    LABEL_F1,
    NoisePlan,
    Schedule,
    accumulate_private,
    aggregation_release,
    calibrate_plan,
    release_counts,
)
from dpimages.methods.dpaf.report import report_section
from dpimages.methods.training import RunClock, TimeEstimate, TrainLoop, write_grid
from dpimages.nets.discriminators import BackHead, FrontFeatures, SplitDiscriminator
from dpimages.nets.generators import ConditionalGenerator
from dpimages.privacy import PrivacyEvent
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler, StepInfo
from dpimages.privacy.keyed import content_digests
from dpimages.privacy.mechanisms import clip_rows
from dpimages.synthesizer import FitContext

# the public per-example inputs of a DP-SGD loss, from the labels of a real (False) or fake (True) batch
PerLabel = Callable[[torch.Tensor, bool], tuple[torch.Tensor, ...]]


class DPAF(TrainedSynthesizer[DPAFConfig], PostProcessing):
    """DPAF: conditional GAN with DP feature aggregation in the discriminator's forward pass."""

    name = "dpaf"
    Config = DPAFConfig
    description = "conditional GAN; discriminator front trained with DP-SGD, back on noisy feature aggregates"
    device_modules = ("ema_model",)

    def __init__(self, config: DPAFConfig) -> None:
        super().__init__(config)
        self.ema_model: ConditionalGenerator | None = None
        self.counts: torch.Tensor | None = None  # released (noisy) class counts, float64 (K,)
        self.buffer: list[torch.Tensor] = []  # this phase's released real aggregates (divided), (R, d) each
        self.center: torch.Tensor | None = None  # this cycle's per-class feature reference (K, d), from fakes

    @classmethod
    def contract_cases(cls, workdir: Path) -> list[dict[str, Any]]:
        """Aggregation groups (``agg_groups`` > 1), which every preset leaves at 1: each image's group follows its
        content and a secret key, so the contract's neighbours must not move any other image's group."""
        return [{"name": "groups", "overrides": ["agg_groups=2"]}] if cls.Config().aggregation else []

    # -- building blocks -------------------------------------------------------------------------
    def new_generator(self) -> ConditionalGenerator:
        return dpaf_nets.new_generator(self.config, self.image_shape, self.num_classes)

    def new_discriminator(self) -> tuple[FrontFeatures, BackHead]:
        return dpaf_nets.new_discriminator(self.config, self.image_shape, self.num_classes)

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Calibrate and reserve the whole schedule, release the counts, then train (module docstring)."""
        cfg = self.config
        if private.labels is None:
            raise InputError(f"{private.name}: dpaf needs labelled private data (class-conditional GAN)")
        tensors, state = self.begin_fit(private, ctx)
        if min(self.image_shape[:2]) < 2 ** len(cfg.d_channels) * 2:
            raise InputError(f"dpaf with d_channels of length {len(cfg.d_channels)} needs images of at least "
                             f"{2 ** len(cfg.d_channels) * 2} pixels per side, got {self.image_shape}")
        if cfg.fake_per_class < cfg.agg_groups:
            raise InputError(f"fake_per_class ({cfg.fake_per_class}) must be >= agg_groups ({cfg.agg_groups})")
        n = ctx.public_size(private)
        # 1. schedule, calibration and reservation: public choices only, before any private access
        sched = Schedule.from_config(cfg, n)
        scale, plan = calibrate_plan(ctx.ledger.epsilon_budget, ctx.ledger.delta, sched)
        events = plan.events(sched)
        with ctx.seeded_init("model"):
            nets = build_nets(cfg, self.image_shape, self.num_classes, self.device, ctx.generator("train"))
        engine = self._engine(ctx, nets, plan, len(private), n)
        ctx.ledger.reserve(*events[:-1])
        engine.plan(events[-1].steps)  # the plan's last event is the engine's DP-SGD release
        self.train_info = {
            "dataset_size": n, "scale": scale, "noise": asdict(plan), "events": [e.to_json() for e in events],
            "sample_rate_agg": sched.q_agg, "sample_rate_f1": sched.q_f1, "sample_rate_plain": sched.q_plain,
            "feature_dim": nets.f1.dim, **nets.param_counts(), "train_s": 0.0,
        }
        if "counts" in tensors:
            self._restore(nets, tensors, state, plan)
        self.ema_model = nets.ema
        if state.get("finished"):
            return
        # 2. the class counts: released once (and checkpointed at once)
        y_all = private.label_tensor(self.device)
        if self.counts is None:
            if ctx.ledger.steps(like=events[0]) > 0:
                raise InputError(f"{ctx.run.path if ctx.run else 'run'}: the class counts were released but the "
                                 "process stopped before saving them; start a new run (the ledger keeps the spend)")
            self.counts = release_counts(y_all, self.num_classes, plan.counts, ledger=ctx.ledger, noise=ctx.noise)
            self.train_info["noisy_counts"] = [round(float(v), 1) for v in self.counts]
            self._checkpoint(ctx, nets, False)
        # 3. training: the aggregation releases, f1's (or D's) DP-SGD steps, post-processing
        x_all = private.to_tensor(self.device)
        if cfg.aggregation:
            self._train_dpaf(ctx, nets, engine, x_all, y_all, content_digests(private.images, private.labels))
        else:
            self._train_plain(ctx, nets, engine, x_all, y_all)

    def _engine(self, ctx: FitContext, nets: Nets, plan: NoisePlan, examples: int, n: int) -> DPSGD:
        """The DP-SGD engine of f1 (DPAF) or of the whole discriminator (the ablation), on its own Poisson sampler
        over the `examples` private images at rate batch / N (N = `n`, public)."""
        cfg = self.config
        model: torch.nn.Module
        loss: Callable[..., torch.Tensor]
        if cfg.aggregation:
            model, loss, sigma, batch, label = nets.f1, self._f1_loss, plan.f1, cfg.f1_batch, LABEL_F1
        else:
            model, loss = SplitDiscriminator(nets.f1, nets.f2, cfg.feature_clip), self._d_loss
            sigma, batch, label = plan.d, cfg.plain_batch, LABEL_D
        assert sigma is not None
        sampler = PoissonSampler.for_batch_size(examples, batch, ctx.noise, dataset_size=n)
        return DPSGD(model, loss, sampler=sampler, noise_multiplier=sigma,
                     clip_norm=cfg.grad_clip, ledger=ctx.ledger, noise=ctx.noise, label=label,
                     max_physical_batch=cfg.physical_batch, per_example=cfg.per_example)

    def _restore(self, nets: Nets, tensors: dict[str, torch.Tensor], state: dict[str, Any], plan: NoisePlan) -> None:
        if state.get("noise") != asdict(plan):
            raise InputError("--resume: the calibrated noise multipliers differ from the checkpoint's")
        nets.restore(tensors, state, self.device)
        self.counts = tensors["counts"].double()
        self.buffer = list(tensors["buffer"].to(self.device).unbind(0)) if "buffer" in tensors else []
        self.center = tensors["center"].to(self.device) if "center" in tensors else None
        self.train_info.update({k: state["train_info"][k] for k in ("noisy_counts", "train_s", "g_updates")
                                if k in state.get("train_info", {})})

    # -- per-example losses for the DP-SGD engine --------------------------------------------------
    def _f1_loss(self, model: Any, x: torch.Tensor, target: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Linearised discriminator loss of one example: target . clip(f1(x) - center, C_f) (target, center: public)."""
        return (clip_rows(model(x) - center, self.config.feature_clip) * target).sum(1)

    def _d_loss(self, model: Any, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Ablation: non-saturating GAN loss of one example, softplus(-D) for real, softplus(D) for fake."""
        score = model(x, y)
        return F.softplus(torch.where(fake, score, -score))

    # -- DPAF training ----------------------------------------------------------------------------
    def _train_dpaf(self, ctx: FitContext, nets: Nets, engine: DPSGD, x_all: torch.Tensor,
                    y_all: torch.Tensor, digests: np.ndarray) -> None:
        """The cycles: phase A (aggregation releases), phase B (f1 steps); checkpoints after each phase, grids and
        pausing (`RunClock`: max_minutes, cycles_per_run) at cycle ends. `digests`: the images' content digests
        (`dpimages.privacy.keyed`), which place each image in its aggregation group."""
        cfg = self.config
        sigma = float(self.train_info["noise"]["agg"])
        sampler = PoissonSampler.for_batch_size(x_all.shape[0], cfg.agg_batch, ctx.noise,
                                                dataset_size=int(self.train_info["dataset_size"]))
        a = ctx.ledger.steps(like=PrivacyEvent.subsampled_gaussian(sigma, sampler.sample_rate, 1, LABEL_AGG))
        first = engine.steps_spent // cfg.f1_steps  # the cycle to go on with
        total = cfg.cycles * (cfg.agg_steps + cfg.f1_steps)
        done0 = done = a + engine.steps_spent
        clock = RunClock(cfg.max_minutes, cfg.cycles_per_run, unit_name="cycles_per_run")
        train_s0 = float(self.train_info.get("train_s", 0.0))
        estimate = TimeEstimate(total, done0, "dpaf private steps", enabled=ctx.progress)
        with tqdm(total=total, initial=done0, disable=not ctx.progress, desc="dpaf private steps") as bar:
            for cycle in range(first, cfg.cycles):
                if self.center is None:  # a new cycle (or a resumed one whose phase A had not ended)
                    self.center = self._new_center(nets)
                while a < (cycle + 1) * cfg.agg_steps:  # phase A: aggregation releases, f2 and G updates
                    logs = self._aggregation_iteration(ctx, nets, sampler, sigma, x_all, y_all, digests)
                    a += 1
                    bar.update(1)
                    estimate.update(a + engine.steps_spent)
                    if ctx.run is not None and a % cfg.log_every == 0:
                        ctx.run.log(a + engine.steps_spent, phase="A", cycle=cycle, agg_releases=a, **logs)
                    if a == (cycle + 1) * cfg.agg_steps:
                        self._checkpoint(ctx, nets, False, train_s0 + clock.elapsed())
                while engine.steps_spent < (cycle + 1) * cfg.f1_steps:  # phase B: f1 DP-SGD steps
                    logs = self._f1_step(ctx, nets, engine, x_all, y_all)
                    bar.update(1)
                    if ctx.run is not None:
                        ctx.run.log(a + engine.steps_spent, phase="B", cycle=cycle, f1_steps=engine.steps_spent,
                                    **logs)
                self.buffer, self.center = [], None
                done = a + engine.steps_spent
                if cycle + 1 == cfg.cycles or ctx.run is None:
                    continue
                self._checkpoint(ctx, nets, False, train_s0 + clock.elapsed())
                if (cycle + 1) % cfg.grid_every == 0:
                    self._grid(nets.ema, ctx.run.grid_path(f"grid-{done:07d}.png"))
                reason = clock.pause_reason(cycle + 1 - first)
                if reason:
                    ctx.run.log(done, event="paused", reason=reason, steps_left=total - done,
                                **clock.run_times(done - done0, train_s0 + clock.elapsed()))
                    return
        train_s = train_s0 + clock.elapsed()
        self._checkpoint(ctx, nets, True, train_s)
        if ctx.run is not None:
            self._grid(nets.ema, ctx.run.grid_path("grid-final.png"))
            ctx.run.log(done, event="train_done", steps=total, **clock.run_times(done - done0, train_s))

    def _aggregation_iteration(self, ctx: FitContext, nets: Nets, sampler: PoissonSampler, sigma: float,
                               x_all: torch.Tensor, y_all: torch.Tensor, digests: np.ndarray) -> dict[str, float]:
        """One aggregation release (private: `aggregation_release`), then f2 and G updates on it (post-processing)."""
        cfg = self.config
        rng = nets.rng
        released = aggregation_release(
            x_all, y_all, sampler, lambda x, y: self._features(nets, x, y), dim=nets.f1.dim,
            num_classes=self.num_classes, groups=cfg.agg_groups, digests=digests, clip_norm=cfg.feature_clip,
            noise_multiplier=sigma, ledger=ctx.ledger, noise=ctx.noise, chunk=cfg.physical_batch * 4)
        real = released / self._expected_rows()[:, None]  # post-processing from here on
        self.buffer.append(real.detach())
        k_rows = self._row_labels()
        y_fake = self._class_batch(cfg.fake_per_class)
        logs: dict[str, float] = {}
        for g_step in range(cfg.g_steps):
            fake_f = self._features(nets, nets.gen(self._latents(y_fake.numel(), rng), y_fake), y_fake)
            if g_step == 0:
                logs.update(self._f2_updates(nets, real, fake_f.detach(), k_rows))
            g_loss = F.softplus(-nets.f2(self._fake_aggregates(fake_f, rng), k_rows)).mean()
            self._generator_step(nets, g_loss)
            logs["g_loss"] = round(g_loss.item(), 5)
        return logs

    def _f1_step(self, ctx: FitContext, nets: Nets, engine: DPSGD, x_all: torch.Tensor,
                 y_all: torch.Tensor) -> dict[str, float]:
        """One DP-SGD step of f1 on the linearised loss with this phase's targets (`_dp_step`)."""
        t_real, t_fake = self._targets(nets)
        assert self.center is not None
        center = self.center
        stepped = self._dp_step(nets, engine, x_all, y_all,
                                lambda y, fake: ((t_fake if fake else t_real)[y], center[y]))
        return {"f1_noisy_grad_norm": round(stepped.noisy_grad_norm, 6)}

    def _dp_step(self, nets: Nets, engine: DPSGD, x_all: torch.Tensor, y_all: torch.Tensor,
                 per_label: PerLabel) -> StepInfo:
        """One DP-SGD step: the private Poisson batch (`accumulate_private`) and as many fakes as its expected
        size, clipped and summed; the release (ledger, then noise: ``add_noise``); an Adam step of `opt_d`."""
        cfg = self.config
        accumulate_private(engine, x_all, y_all, lambda y: per_label(y, False), cfg.physical_batch)
        n_fake = round(engine.sampler.expected_batch_size)
        for i in range(0, n_fake, cfg.physical_batch):
            y = self._fake_labels(min(cfg.physical_batch, n_fake - i), nets.rng)
            with torch.no_grad():
                x = nets.gen(self._latents(y.numel(), nets.rng), y)
            engine.clip_and_accumulate(x, *per_label(y, True))
        stepped = engine.add_noise()  # ledger spend, then noise; sets the discriminator's .grad
        nets.opt_d.step()
        nets.opt_d.zero_grad(set_to_none=True)
        return stepped

    # -- ablation: plain DP-SGD discriminator ------------------------------------------------------------
    def _train_plain(self, ctx: FitContext, nets: Nets, engine: DPSGD, x_all: torch.Tensor,
                     y_all: torch.Tensor) -> None:
        """`TrainLoop` over the discriminator's DP-SGD steps, each followed by `g_steps` generator updates; a
        checkpoint every cycle (``agg_steps`` steps)."""
        cfg = self.config
        disc = engine.module
        y_fake = self._class_batch(cfg.fake_per_class)

        def step(t: int) -> dict[str, float]:
            stepped = self._dp_step(nets, engine, x_all, y_all, lambda y, fake: (
                y, torch.full((y.numel(),), fake, dtype=torch.bool, device=y.device)))
            for _ in range(cfg.g_steps):
                g_loss = F.softplus(-disc(nets.gen(self._latents(y_fake.numel(), nets.rng), y_fake), y_fake)).mean()
                self._generator_step(nets, g_loss)
            return {"d_noisy_grad_norm": round(stepped.noisy_grad_norm, 6), "g_loss": round(g_loss.item(), 5)}

        loop = TrainLoop(
            ctx.run, cfg.cycles * cfg.agg_steps, step,
            checkpoint=lambda t, finished: self._checkpoint(ctx, nets, finished, loop.train_s()),
            clock=RunClock(cfg.max_minutes, cfg.cycles_per_run, unit_name="cycles_per_run",
                           steps_per_unit=cfg.agg_steps),
            grid=lambda path: self._grid(nets.ema, path), log_every=cfg.log_every,
            grid_every=cfg.grid_every * cfg.agg_steps, checkpoint_every=cfg.agg_steps, progress=ctx.progress,
            desc="dpaf (ablation) steps", train_s0=float(self.train_info.get("train_s", 0.0)))
        loop(engine.steps_spent)
        self.train_info["train_s"] = round(loop.train_s(), 2)

    # -- checkpoints and grids ---------------------------------------------------------------------------
    def _checkpoint(self, ctx: FitContext, nets: Nets, finished: bool, train_s: float | None = None) -> None:
        """Networks, optimisers, released counts, this phase's released aggregates and reference; the ledger's
        step count, the noise state and `train_info` (`train_s`: the whole run's training time so far)."""
        if train_s is not None:
            self.train_info["train_s"] = round(float(train_s), 2)
        if ctx.run is None:
            return
        assert self.counts is not None
        tensors, state = nets.checkpoint()
        tensors["counts"] = self.counts.clone()
        if self.buffer:
            tensors["buffer"] = torch.stack(self.buffer).cpu()
        if self.center is not None:
            tensors["center"] = self.center.cpu()
        self.save_checkpoint(ctx, tensors, step=ctx.ledger.steps(), finished=finished, noise=self.train_info["noise"],
                             **state)

    def _grid(self, gen: ConditionalGenerator, path: Path) -> None:
        """Per-class sample grid from the EMA generator (post-processing; `write_grid`'s fixed seed)."""
        write_grid(path, lambda y, g: self._generate(gen, y, g), self.num_classes)

    @torch.no_grad()
    def _generate(self, gen: ConditionalGenerator, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        was = gen.training
        gen.eval()
        z = torch.randn(labels.numel(), self.config.z_dim, generator=g).to(self.device)
        x = gen(z, labels.to(self.device))
        gen.train(was)
        return x

    # -- sampling, state and report --------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the EMA generator; labels (n,) int64, or None for balanced classes."""
        if self.ema_model is None:
            raise InputError("dpaf: fit or load the synthesizer before sampling")
        model = self.ema_model
        return self.sample_in_batches(n, labels, seed, self.config.sample_batch,
                                      lambda y, g: self._generate(model, y, g))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling (EMA) generator's weights, prefixed ``ema.``."""
        return self.ema_state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ema_model = load_frozen(self.new_generator, "ema", tensors, "dpaf", self.device)
        if "counts" in tensors:
            self.counts = tensors["counts"].double()

    def report_section(self) -> str:
        return report_section(self.config, self.train_info) if self.train_info else ""


class DPAFNoAggregation(DPAF):
    """DPAF's ablation as a method of its own (so a benchmark can run both): ``dpaf`` with ``aggregation=false``."""

    name = "dpaf-noagg"
    Config = DPAFNoAggConfig
    description = "DPAF ablation: the same conditional GAN with a plain DP-SGD discriminator (no aggregation)"
