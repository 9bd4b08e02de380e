"""DPAF (Lin et al., 2023): a conditional GAN whose discriminator aggregates real features privately (forward phase).

The discriminator is split: ``D(x, y) = f2(f1(x), y)``. f1 (`FrontFeatures`: conv blocks with GroupNorm)
maps each image to a feature vector; f2 (`BackHead`: later conv layers and a label-conditional projection head)
scores feature vectors. Real images reach f2 only as noisy per-class aggregates of f1 features; f1 itself is
trained with DP-SGD. The original paper gives no complete privacy proof; this is ours.

Privacy argument
----------------
Neighbouring relation: add or remove one image together with its label. N (the data set size) is public, as
in every DP-SGD library. The schedule (steps, sample rates, clip norms, noise multipliers) is a function of N
and the config only; it is fixed, calibrated (`dpimages.privacy.calibrate`, one common scale for all releases,
split by `noise_plan`) and reserved in the ledger before any private pixel or label is read. A run makes three
kinds of private releases and nothing else reads private data:

1. **Class counts**, once (``dpaf class counts``): the per-class image counts plus N(0, sigma_c^2)
   (`noisy_class_counts`; one image changes one count by 1, so L2 sensitivity 1): a Gaussian event.
   They set the class proportions of the generated batches (so real and fake aggregates are built from
   batches with the same class mix) and the divisors below.
2. **Feature aggregation** (``dpaf feature aggregation``), ``cycles * agg_steps`` times: a Poisson sample S of
   the private set (every image independently with probability q_a = agg_batch / N, `PoissonSampler`);
   each selected image i goes to row r(i) = y_i * M + g_i, where g_i is a group drawn uniformly from
   M = ``agg_groups`` groups by the training generator (independently of the data). Released: the
   (K*M, d) matrix of row sums of the clipped features ``clip(f1(x_i) - mu_{y_i}, C_f)`` plus
   N(0, sigma_a^2 C_f^2) noise per entry (`release_aggregates`); mu (K, d) is this cycle's per-class reference,
   the mean f1 feature of generated images (``center=true``; zero otherwise). Sensitivity: conditionally on
   everything released before, f1 and mu are fixed functions (f1's weights are themselves DP outputs, see 3,
   and post-processing of them; mu is computed from f1 and G only); the rows partition S,
   so adding or removing one image changes exactly one row, by a vector of norm at most C_f; the stacked
   matrix moves by at most C_f in L2 (Frobenius) norm. With Poisson sampling this is one subsampled Gaussian
   event (noise multiplier sigma_a, rate q_a), recorded by `gaussian_release(..., sample_rate=q_a)` before
   the noise is drawn. Dividing by the expected row sizes ``q_a * N_k / M`` (N_k from the *released* counts)
   is post-processing.
3. **f1's DP-SGD steps** (``dpaf f1 dp-sgd``), ``cycles * f1_steps`` times: the DP-SGD engine (`DPSGD`) on its
   own Poisson sample (rate q_1 = f1_batch / N, independent of the aggregation samples) with the per-example
   loss ``t_{y_i} . clip(f1(x_i) - mu_{y_i}, C_f)``. The target vectors t are the gradients of f2's loss with respect to
   the *released* aggregates (an average over the current phase's releases, evaluated with the current f2):
   functions of earlier releases only, fixed during the step. Each example's gradient is clipped to C, summed,
   noised N(0, sigma_1^2 C^2) and divided by the expected batch size: one subsampled Gaussian event per step.
   Fake images, whose per-example gradients are clipped and summed into the same step so that real and
   fake contributions are balanced, depend on no private data beyond earlier releases, so they do not change
   the sensitivity.

Post-processing: f2 is trained only on released aggregates (real side) and on generated images (fake side);
the generator G only on f2 and f1 applied to its own images. Both are functions of earlier releases and of
randomness independent of the data, so their weights, the EMA of G and every sample are post-processing, as
are f1's Adam updates (functions of the noisy gradients). The two Poisson samples are drawn independently for
every release, so the releases compose adaptively: the ledger's composition (PLD, dp-accounting) of
1 Gaussian event + ``cycles * agg_steps`` subsampled Gaussian events (sigma_a, q_a) + ``cycles * f1_steps``
subsampled Gaussian events (sigma_1, q_1) is the run's guarantee. (Sharing one Poisson sample between an
aggregation and an f1 step would *not* be covered by this composition of independently sampled events; the
samplers are separate for that reason.)

The training generator (latents, fake labels, simulated row counts, groups) is seeded apart from the privacy
noise and never consumes a number of draws that depends on private data (groups are drawn for all N images), so
the post-processing cannot depend on an unreleased private quantity such as a Poisson batch size.

Nothing computed from private data except these releases is logged: the logged f2 losses on real data are
f2 applied to released aggregates; private batch sizes and per-example quantities are never logged.

Ablation (``aggregation=false``): no forward-phase aggregation. The whole discriminator
``f2(clip(f1(x), C_f), y)`` (`SplitDiscriminator`) is trained with DP-SGD (``dpaf discriminator dp-sgd``,
rate plain_batch / N, one step per iteration), a plain DP-GAN with the same networks; the class counts are
released as in 1.

Schedule and resume: each cycle is phase A (``agg_steps`` releases, each followed by f2 and G updates) then
phase B (``f1_steps`` f1 DP-SGD steps). A resumed run counts what the ledger already holds of each release
(`steps_spent`) and runs only the rest, so a crash can over-count but never re-spends.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpimages.api import FitContext, register
from dpimages.data import ImageData, to_uint8
from dpimages.errors import InputError
from dpimages.eval.grid import save_grid
from dpimages.methods.common import TrainedSynthesizer, load_frozen
from dpimages.methods.dpaf.config import DPAFConfig, DPAFNoAggConfig
from dpimages.nets.discriminators import BackHead, FrontFeatures, SplitDiscriminator
from dpimages.nets.generators import ConditionalGenerator
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.privacy.mechanisms import class_sums, clip_rows, gaussian_release, noisy_class_counts
from dpimages.privacy.rng import NoiseSource
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed

LABEL_COUNTS = "dpaf class counts"
LABEL_AGG = "dpaf feature aggregation"
LABEL_F1 = "dpaf f1 dp-sgd"
LABEL_D = "dpaf discriminator dp-sgd"
_TRAIN_SEED_OFFSET = 104729  # training randomness (latents, fake counts, groups) is seeded apart from privacy noise


# -- the private schedule and its budget split (public choices only) ---------------------------------
@dataclass(frozen=True)
class Schedule:
    """Sample rates and step counts of every planned release (functions of N and the config only)."""

    n: int
    aggregation: bool
    q_agg: float
    agg_total: int
    q_f1: float
    f1_total: int
    q_plain: float
    plain_total: int
    f1_share: float
    counts_share: float

    @classmethod
    def from_config(cls, cfg: DPAFConfig, n: int) -> Schedule:
        for name in ("agg_batch", "f1_batch") if cfg.aggregation else ("plain_batch",):
            if getattr(cfg, name) > n:
                raise InputError(f"{name} {getattr(cfg, name)} is larger than the data set ({n} images): lower it")
        return cls(n, cfg.aggregation, cfg.agg_batch / n, cfg.cycles * cfg.agg_steps, cfg.f1_batch / n,
                   cfg.cycles * cfg.f1_steps, cfg.plain_batch / n, cfg.cycles * cfg.agg_steps, cfg.f1_share,
                   cfg.counts_share)


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers of the planned releases (agg/f1 for DPAF; d for the ablation; None when unused)."""

    counts: float
    agg: float | None
    f1: float | None
    d: float | None

    def events(self, s: Schedule) -> list[PrivacyEvent]:
        """The whole planned event list: what the ledger reserves and, after an uninterrupted run, holds."""
        out = [PrivacyEvent.gaussian(self.counts, 1, LABEL_COUNTS)]
        if s.aggregation:
            assert self.agg is not None and self.f1 is not None
            out += [PrivacyEvent.subsampled_gaussian(self.agg, s.q_agg, s.agg_total, LABEL_AGG),
                    PrivacyEvent.subsampled_gaussian(self.f1, s.q_f1, s.f1_total, LABEL_F1)]
        else:
            assert self.d is not None
            out.append(PrivacyEvent.subsampled_gaussian(self.d, s.q_plain, s.plain_total, LABEL_D))
        return out


def noise_plan(scale: float, s: Schedule) -> NoisePlan:
    """Noise multipliers for a common scale s, with the budget split applied.

    A subsampled Gaussian release j (rate q_j, T_j steps) gets sigma_j = s * q_j * sqrt(T_j / w_j) and the
    class counts sigma_c = s / sqrt(w_c). For small q (and sigma not too small) the Renyi-DP of T subsampled
    Gaussian steps is about proportional to T q^2 / sigma^2 and that of a Gaussian to 1 / sigma^2, so each
    release's share of the budget is about its weight w_j (f1_share, counts_share, the rest for the
    aggregation or, in the ablation, the discriminator). The split only parametrises the noise; the
    epsilon of the whole list is computed exactly by the PLD accountant, in `calibrate` and in the ledger.
    """
    w_c = s.counts_share
    counts = scale / math.sqrt(w_c)
    if s.aggregation:
        w_1 = s.f1_share
        w_a = 1.0 - w_1 - w_c
        return NoisePlan(counts, scale * s.q_agg * math.sqrt(s.agg_total / w_a),
                         scale * s.q_f1 * math.sqrt(s.f1_total / w_1), None)
    return NoisePlan(counts, None, None, scale * s.q_plain * math.sqrt(s.plain_total / (1.0 - w_c)))


def calibrate_plan(epsilon: float, delta: float, s: Schedule) -> tuple[float, NoisePlan]:
    """The smallest common scale whose planned events meet (epsilon, delta); runs before data is read."""
    scale = calibrate(lambda v: noise_plan(v, s).events(s), epsilon, delta)
    return scale, noise_plan(scale, s)


# -- the aggregation mechanism ----------------------------------------------------------------------
def release_aggregates(
    features: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    label: str = LABEL_AGG,
) -> torch.Tensor:
    """Noisy row sums of clipped feature vectors of one Poisson sample: (num_rows, d).

    `features` (B, d) are the f1 features of the images of one Poisson sample with rate `sample_rate`
    (possibly empty); `rows` (B,) assigns each image to exactly one row (its class, and a group drawn
    independently of the data). Sensitivity: the rows partition the sample, so adding or removing one image
    changes one row sum by at most `clip_norm` (each feature is clipped to that norm by `clip_rows`) and the
    stacked (num_rows, d) matrix by at most `clip_norm` in L2 norm. `gaussian_release` records one
    subsampled Gaussian event (noise multiplier, sample rate) in the ledger, then adds
    N(0, (noise_multiplier * clip_norm)^2) to every entry. The same computation as
    `clipped_gaussian_class_sums`, on a Poisson sample and with the sampling rate recorded.
    """
    if features.ndim != 2 or rows.shape != (features.shape[0],):
        raise InputError(f"features must be (B, d) and rows (B,), got {tuple(features.shape)} and "
                         f"{tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise InputError(f"row indices must be in [0, {num_rows})")
    sums = class_sums(clip_rows(features, clip_norm), rows, num_rows)
    return gaussian_release(sums, sensitivity=clip_norm, noise_multiplier=noise_multiplier, ledger=ledger,
                            noise=noise, label=label, sample_rate=sample_rate)


@dataclass
class _Nets:
    """Everything that trains (and is checkpointed)."""

    f1: FrontFeatures
    f2: BackHead
    gen: ConditionalGenerator
    ema: ConditionalGenerator
    opt_d: torch.optim.Optimizer  # f1 (aggregation) or the whole discriminator (ablation)
    opt_f2: torch.optim.Optimizer | None
    opt_g: torch.optim.Optimizer
    rng: torch.Generator


@register
class DPAF(TrainedSynthesizer):
    """DPAF: conditional GAN with DP feature aggregation in the discriminator's forward pass."""

    name = "dpaf"
    Config = DPAFConfig
    description = "conditional GAN; discriminator front trained with DP-SGD, back on noisy feature aggregates"
    device_modules = ("ema_model",)

    def __init__(self, config: DPAFConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.config: DPAFConfig = config
        self.ema_model: ConditionalGenerator | None = None
        self.counts: torch.Tensor | None = None  # released (noisy) class counts, float64 (K,)
        self.buffer: list[torch.Tensor] = []  # this phase's released real aggregates (divided), (R, d) each
        self.center: torch.Tensor | None = None  # this cycle's per-class feature reference (K, d), from fakes

    # -- building blocks -------------------------------------------------------------------------
    def new_generator(self) -> ConditionalGenerator:
        h, w, c = self.image_shape
        cfg = self.config
        return ConditionalGenerator((c, h, w), self.num_classes, cfg.z_dim, cfg.gen_channels, cfg.generator)

    def new_discriminator(self) -> tuple[FrontFeatures, BackHead]:
        h, w, c = self.image_shape
        cfg = self.config
        f1 = FrontFeatures(c, (h, w), cfg.d_channels, cfg.feature_channels)
        f2 = BackHead(f1.feature_shape, self.num_classes, cfg.f2_channels,  # type: ignore[arg-type]
                      input_scale=math.sqrt(f1.dim) / cfg.feature_clip)
        return f1, f2

    @property
    def num_rows(self) -> int:
        return self.num_classes * self.config.agg_groups

    def _nhat(self) -> torch.Tensor:
        """Per-class sizes from the released counts (floored at 1), float32 (K,): post-processing."""
        assert self.counts is not None
        return self.counts.clamp_min(1.0).float().to(self.device)

    def _proportions(self) -> torch.Tensor:
        nhat = self._nhat()
        return nhat / nhat.sum()

    def _expected_rows(self) -> torch.Tensor:
        """Expected number of sampled images per aggregation row, q_a * N_k / M, (K*M,)."""
        m = self.config.agg_groups
        q = float(self.train_info["sample_rate_agg"])
        return (q * self._nhat() / m).repeat_interleave(m)

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
        n = len(private)
        # 1. schedule, calibration and reservation: public choices only, before any private access
        sched = Schedule.from_config(cfg, n)
        scale, plan = calibrate_plan(ctx.ledger.epsilon_budget, ctx.ledger.delta, sched)
        events = plan.events(sched)
        f1, f2 = self.new_discriminator()
        f1.to(self.device)
        f2.to(self.device)
        noise = ctx.noise
        if cfg.aggregation:
            sampler = PoissonSampler.for_batch_size(n, cfg.f1_batch, noise)
            engine = DPSGD(f1, self._f1_loss, sampler=sampler, noise_multiplier=plan.f1, clip_norm=cfg.grad_clip,
                           ledger=ctx.ledger, noise=noise, label=LABEL_F1, max_physical_batch=cfg.physical_batch)
            ctx.ledger.reserve(events[0], events[1])
            engine.plan(sched.f1_total)
        else:
            disc = SplitDiscriminator(f1, f2, cfg.feature_clip)
            sampler = PoissonSampler.for_batch_size(n, cfg.plain_batch, noise)
            engine = DPSGD(disc, self._d_loss, sampler=sampler, noise_multiplier=plan.d, clip_norm=cfg.grad_clip,
                           ledger=ctx.ledger, noise=noise, label=LABEL_D, max_physical_batch=cfg.physical_batch)
            ctx.ledger.reserve(events[0])
            engine.plan(sched.plain_total)
        self.train_info = {
            "dataset_size": n, "scale": scale, "noise": asdict(plan), "events": [e.to_json() for e in events],
            "sample_rate_agg": sched.q_agg, "sample_rate_f1": sched.q_f1, "sample_rate_plain": sched.q_plain,
            "feature_dim": f1.dim, "params_f1": sum(p.numel() for p in f1.parameters()),
            "params_f2": sum(p.numel() for p in f2.parameters()), "train_s": 0.0,
        }
        gen = self.new_generator().to(self.device)
        self.train_info["params_g"] = sum(p.numel() for p in gen.parameters())
        ema = copy.deepcopy(gen).requires_grad_(False)
        betas = (cfg.beta1, 0.999)
        opt_d = torch.optim.Adam(f1.parameters() if cfg.aggregation else [*f1.parameters(), *f2.parameters()],
                                 lr=cfg.lr_f1, betas=betas)
        opt_f2 = torch.optim.Adam(f2.parameters(), lr=cfg.lr_f2, betas=betas) if cfg.aggregation else None
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=betas)
        rng = torch.Generator(device="cpu").manual_seed(ctx.seed + _TRAIN_SEED_OFFSET)
        nets = _Nets(f1, f2, gen, ema, opt_d, opt_f2, opt_g, rng)
        if "counts" in tensors:
            self._restore(nets, tensors, state, plan)
        self.ema_model = ema
        if state.get("finished"):
            return
        # 2. the class counts: released once (and checkpointed at once)
        y_all = private.label_tensor(self.device)
        counts_event = events[0]
        if self.counts is None:
            if ctx.ledger.steps(like=counts_event) > 0:
                raise InputError(f"{ctx.run.path if ctx.run else 'run'}: the class counts were released but the "
                                 "process stopped before saving them; start a new run (the ledger keeps the spend)")
            self.counts = noisy_class_counts(y_all, self.num_classes, noise_multiplier=plan.counts,
                                             ledger=ctx.ledger, noise=noise, label=LABEL_COUNTS).cpu()
            self.train_info["noisy_counts"] = [round(float(v), 1) for v in self.counts]
            self._checkpoint(ctx, nets, finished=False)
        # 3. training: the aggregation releases, f1's (or D's) DP-SGD steps, post-processing
        x_all = private.to_tensor(self.device)
        if cfg.aggregation:
            self._train_dpaf(ctx, nets, engine, plan, x_all, y_all)
        else:
            self._train_plain(ctx, nets, engine, x_all, y_all)

    def _restore(self, nets: _Nets, tensors: dict[str, torch.Tensor], state: dict[str, Any], plan: NoisePlan) -> None:
        if state.get("noise") != asdict(plan):
            raise InputError("--resume: the calibrated noise multipliers differ from the checkpoint's")
        dev = self.device
        nets.f1.load_state_dict(unprefixed("f1", tensors))
        nets.f2.load_state_dict(unprefixed("f2", tensors))
        nets.gen.load_state_dict(unprefixed("gen", tensors))
        nets.ema.load_state_dict(unprefixed("ema", tensors))
        load_optimizer("opt_d", nets.opt_d, tensors, state["opt_d"], dev)
        load_optimizer("opt_g", nets.opt_g, tensors, state["opt_g"], dev)
        if nets.opt_f2 is not None:
            load_optimizer("opt_f2", nets.opt_f2, tensors, state["opt_f2"], dev)
        set_rng_state(nets.rng, state["train_rng"])
        self.counts = tensors["counts"].double()
        self.buffer = list(tensors["buffer"].to(dev).unbind(0)) if "buffer" in tensors else []
        self.center = tensors["center"].to(dev) if "center" in tensors else None
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

    # -- generated batches (no private data) --------------------------------------------------------
    def _latents(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=rng).to(self.device)

    def _fake_labels(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n labels drawn from the released class proportions."""
        return torch.multinomial(self._proportions().cpu(), n, replacement=True, generator=rng).to(self.device)

    def _features(self, nets: _Nets, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f1 features of images x with labels y, minus this cycle's per-class reference (DPAF mode)."""
        f = nets.f1(x)
        return f - self.center[y] if self.center is not None else f

    @torch.no_grad()
    def _new_center(self, nets: _Nets) -> torch.Tensor:
        """Per-class mean f1 feature of generated images (K, d): public, fixed for one cycle.

        Subtracting it before clipping removes the feature component that all images share, so the clipped
        vectors (and the noisy aggregates) spend their norm C_f on what differs between real and generated
        images. A function of G and f1 only (post-processing of earlier releases).
        """
        if not self.config.center:
            return torch.zeros(self.num_classes, nets.f1.dim, device=self.device)
        p = 4 * self.config.fake_per_class
        y = torch.arange(self.num_classes, device=self.device).repeat_interleave(p)
        f = nets.f1(nets.gen(self._latents(y.numel(), nets.rng), y))
        return class_sums(f, y, self.num_classes) / p

    def _fake_aggregates(self, feats: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Fake aggregates built like the real ones: (K*M, d), from K * fake_per_class fake features in class order.

        Row r = (k, g) is the mean of its clipped fake features times a simulated row count
        c_r ~ Binomial(N_k, q_a / M), over the expected row size, plus N(0, (sigma_a C_f)^2) / expected size:
        the distribution of a real row with the generator's features in place of the data's.
        """
        cfg = self.config
        m, p = cfg.agg_groups, cfg.fake_per_class
        groups = torch.arange(p).remainder(m).repeat(self.num_classes)
        rows = (torch.arange(self.num_classes).repeat_interleave(p) * m + groups).to(self.device)
        r = self.num_rows
        sums = class_sums(clip_rows(feats, cfg.feature_clip), rows, r)
        per_row = torch.bincount(rows, minlength=r).to(feats.dtype)
        expected = self._expected_rows()
        q = float(self.train_info["sample_rate_agg"])
        n_rows = self._nhat().round().repeat_interleave(m).cpu()
        counts = torch.binomial(n_rows, torch.full_like(n_rows, q / m), generator=rng).to(self.device)
        xi = torch.randn(r, feats.shape[1], generator=rng).to(self.device)
        sigma = float(self.train_info["noise"]["agg"])
        return (sums / per_row[:, None] * counts[:, None] + xi * sigma * cfg.feature_clip) / expected[:, None]

    def _row_labels(self) -> torch.Tensor:
        return torch.arange(self.num_rows, device=self.device) // self.config.agg_groups

    def _generator_step(self, nets: _Nets, g_loss: torch.Tensor) -> None:
        """One Adam step of G on `g_loss` (gradients of G's parameters only), then the EMA update (warm-up decay)."""
        grads = torch.autograd.grad(g_loss, list(nets.gen.parameters()))
        for p, gr in zip(nets.gen.parameters(), grads, strict=True):
            p.grad = gr
        nets.opt_g.step()
        nets.opt_g.zero_grad(set_to_none=True)
        step = int(self.train_info.get("g_updates", 0))
        decay = min(self.config.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, pg in zip(nets.ema.parameters(), nets.gen.parameters(), strict=True):
                pe.lerp_(pg, 1.0 - decay)
            for be, bg in zip(nets.ema.buffers(), nets.gen.buffers(), strict=True):
                if be.dtype.is_floating_point:
                    be.lerp_(bg, 1.0 - decay)
                else:
                    be.copy_(bg)
        self.train_info["g_updates"] = step + 1

    # -- DPAF training ----------------------------------------------------------------------------
    def _train_dpaf(self, ctx: FitContext, nets: _Nets, engine: DPSGD, plan: NoisePlan, x_all: torch.Tensor,
                    y_all: torch.Tensor) -> None:
        cfg = self.config
        n = x_all.shape[0]
        agg_sampler = PoissonSampler.for_batch_size(n, cfg.agg_batch, ctx.noise)
        assert plan.agg is not None
        agg_event = PrivacyEvent.subsampled_gaussian(plan.agg, agg_sampler.sample_rate, 1, LABEL_AGG)
        total = cfg.cycles * (cfg.agg_steps + cfg.f1_steps)
        start = time.time()
        t0 = start - float(self.train_info.get("train_s", 0.0))
        done0 = ctx.ledger.steps(like=agg_event) + engine.steps_spent
        bar = tqdm(total=total, initial=done0, disable=not ctx.progress, desc="dpaf private steps")
        cycles_run = 0
        while True:
            a, b = ctx.ledger.steps(like=agg_event), engine.steps_spent
            cycle = b // cfg.f1_steps
            if cycle >= cfg.cycles:
                break
            if self.center is None:  # a new cycle (or a resumed one whose phase A had not ended)
                self.center = self._new_center(nets)
            while a < (cycle + 1) * cfg.agg_steps:  # phase A: aggregation releases, f2 and G updates
                logs = self._aggregation_iteration(ctx, nets, agg_sampler, plan.agg, x_all, y_all)
                a += 1
                bar.update(1)
                if ctx.run is not None and (a % cfg.log_every == 0):
                    ctx.run.log(a + b, phase="A", cycle=cycle, agg_releases=a, **logs)  # no per-step time
                if a == (cycle + 1) * cfg.agg_steps:
                    self._checkpoint(ctx, nets, finished=False, train_s=time.time() - t0)
            while engine.steps_spent < (cycle + 1) * cfg.f1_steps:  # phase B: f1 DP-SGD steps
                logs = self._f1_step(ctx, nets, engine, x_all, y_all)
                bar.update(1)
                if ctx.run is not None:
                    ctx.run.log(a + engine.steps_spent, phase="B", cycle=cycle, f1_steps=engine.steps_spent, **logs)
            self.buffer, self.center = [], None
            cycles_run += 1
            last = cycle + 1 >= cfg.cycles
            self.train_info["train_s"] = time.time() - t0
            if ctx.run is not None and not last:
                self._checkpoint(ctx, nets, finished=False, train_s=time.time() - t0)
                if (cycle + 1) % cfg.grid_every == 0:
                    self._grid(nets.ema, ctx.run.samples_dir / f"grid-cycle{cycle + 1:04d}.png")
                if self._pause(ctx, cycles_run, start, a + engine.steps_spent):
                    bar.close()
                    return
        bar.close()
        self._finish(ctx, nets, t0)

    def _aggregation_iteration(self, ctx: FitContext, nets: _Nets, sampler: PoissonSampler, sigma: float,
                               x_all: torch.Tensor, y_all: torch.Tensor) -> dict[str, float]:
        """One aggregation release (private), then f2 and G updates on it (post-processing)."""
        cfg = self.config
        rng = nets.rng
        idx = sampler.sample().to(self.device)
        chunk = cfg.physical_batch * 4
        with torch.no_grad():
            feats = torch.cat([self._features(nets, x_all[idx[i : i + chunk]], y_all[idx[i : i + chunk]])
                               for i in range(0, idx.numel(), chunk)]) if idx.numel() else \
                torch.zeros(0, nets.f1.dim, device=self.device)
        rows = y_all[idx] * cfg.agg_groups
        if cfg.agg_groups > 1:  # a group for every image (not only the sampled ones): the number of draws, and
            # so the training generator's later state, must not depend on the private batch size
            rows = rows + torch.randint(cfg.agg_groups, (x_all.shape[0],), generator=rng).to(self.device)[idx]
        released = release_aggregates(feats, rows, self.num_rows, clip_norm=cfg.feature_clip,
                                      noise_multiplier=sigma, sample_rate=sampler.sample_rate, ledger=ctx.ledger,
                                      noise=ctx.noise)
        real = released / self._expected_rows()[:, None]  # post-processing from here on
        self.buffer.append(real.detach())
        k_rows = self._row_labels()
        y_fake = torch.arange(self.num_classes, device=self.device).repeat_interleave(cfg.fake_per_class)
        logs: dict[str, float] = {}
        for g_step in range(cfg.g_steps):
            fake_x = nets.gen(self._latents(y_fake.numel(), rng), y_fake)
            fake_f = self._features(nets, fake_x, y_fake)
            if g_step == 0:
                for _ in range(cfg.f2_steps):
                    # this release plus `f2_replay` earlier ones of this phase (same f1: comparable aggregates)
                    pick = torch.randint(len(self.buffer), (cfg.f2_replay,), generator=rng).tolist()
                    reals = torch.cat([real, *(self.buffer[i] for i in pick)])
                    fakes = torch.cat([self._fake_aggregates(fake_f.detach(), rng) for _ in range(1 + len(pick))])
                    rows_k = k_rows.repeat(1 + len(pick))
                    d_real = F.softplus(-nets.f2(reals, rows_k)).mean()
                    d_fake = F.softplus(nets.f2(fakes, rows_k)).mean()
                    assert nets.opt_f2 is not None
                    nets.opt_f2.zero_grad(set_to_none=True)
                    (d_real + d_fake).backward()
                    nets.opt_f2.step()
                logs.update(f2_loss_real=round(d_real.item(), 5), f2_loss_fake=round(d_fake.item(), 5))
            g_loss = F.softplus(-nets.f2(self._fake_aggregates(fake_f, rng), k_rows)).mean()
            self._generator_step(nets, g_loss)
            logs["g_loss"] = round(g_loss.item(), 5)
        return logs

    def _targets(self, nets: _Nets) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class target vectors (K, d) of the f1 step for real and fake examples (post-processing).

        t_k = (N / N_k) * sum over groups of dL_D/dA_(k,g): the gradient of f2's loss with respect to a row
        aggregate, turned into the gradient with respect to one example's feature and reweighted so that the
        engine's average over a Poisson batch estimates the full gradient. Real: averaged over this phase's
        released aggregates; fake: fresh fake aggregates. Both are scaled by one common factor (their RMS
        norm) so that per-example gradient norms do not drift with the loss scale.
        """
        cfg = self.config
        k_rows = self._row_labels()
        m = cfg.agg_groups
        weight = (self.train_info["dataset_size"] / self._nhat())[:, None]
        if self.buffer:
            real = torch.stack(self.buffer).requires_grad_(True)
            s = real.shape[0]
            loss = F.softplus(-nets.f2(real.flatten(0, 1), k_rows.repeat(s))).mean()
            (g_real,) = torch.autograd.grad(loss * s, real)  # per release: d(mean over its rows) / dA
            g_real = g_real.mean(0)
        else:  # a crash lost this phase's aggregates: only the fake side trains f1 in this phase
            g_real = torch.zeros(self.num_rows, nets.f1.dim, device=self.device)
        y_fake = torch.arange(self.num_classes, device=self.device).repeat_interleave(cfg.fake_per_class)
        with torch.no_grad():
            fake_f = self._features(nets, nets.gen(self._latents(y_fake.numel(), nets.rng), y_fake), y_fake)
        fake = self._fake_aggregates(fake_f, nets.rng).requires_grad_(True)
        (g_fake,) = torch.autograd.grad(F.softplus(nets.f2(fake, k_rows)).mean(), fake)
        t_real = g_real.view(self.num_classes, m, -1).sum(1) * weight
        t_fake = g_fake.view(self.num_classes, m, -1).sum(1) * weight
        rms = torch.sqrt((t_real.pow(2).sum() + t_fake.pow(2).sum()) / (2 * self.num_classes)).clamp_min(1e-12)
        return (t_real / rms).detach(), (t_fake / rms).detach()

    def _f1_step(self, ctx: FitContext, nets: _Nets, engine: DPSGD, x_all: torch.Tensor,
                 y_all: torch.Tensor) -> dict[str, float]:
        """One DP-SGD step of f1: real Poisson batch and as many fakes, linearised loss, clipped, noised."""
        cfg = self.config
        t_real, t_fake = self._targets(nets)
        assert self.center is not None
        center = self.center
        idx = engine.sampler.sample().to(self.device)
        for i in range(0, idx.numel(), cfg.physical_batch):
            part = idx[i : i + cfg.physical_batch]
            engine.clip_and_accumulate(x_all[part], t_real[y_all[part]], center[y_all[part]])
        n_fake = round(engine.sampler.expected_batch_size)
        for i in range(0, n_fake, cfg.physical_batch):
            y = self._fake_labels(min(cfg.physical_batch, n_fake - i), nets.rng)
            with torch.no_grad():
                x = nets.gen(self._latents(y.numel(), nets.rng), y)
            engine.clip_and_accumulate(x, t_fake[y], center[y])
        info = engine.add_noise()  # ledger spend, then noise; sets f1's .grad
        nets.opt_d.step()
        nets.opt_d.zero_grad(set_to_none=True)
        return {"f1_noisy_grad_norm": round(info.noisy_grad_norm, 6)}

    # -- ablation: plain DP-SGD discriminator ------------------------------------------------------------
    def _train_plain(self, ctx: FitContext, nets: _Nets, engine: DPSGD, x_all: torch.Tensor,
                     y_all: torch.Tensor) -> None:
        cfg = self.config
        disc = engine.module
        total = cfg.cycles * cfg.agg_steps
        start = time.time()
        t0 = start - float(self.train_info.get("train_s", 0.0))
        bar = tqdm(total=total, initial=engine.steps_spent, disable=not ctx.progress, desc="dpaf (ablation) steps")
        cycles_run = 0
        y_fake = torch.arange(self.num_classes, device=self.device).repeat_interleave(cfg.fake_per_class)
        while engine.steps_remaining > 0:
            idx = engine.sampler.sample().to(self.device)
            for i in range(0, idx.numel(), cfg.physical_batch):
                part = idx[i : i + cfg.physical_batch]
                engine.clip_and_accumulate(x_all[part], y_all[part], torch.zeros(part.numel(), dtype=torch.bool,
                                                                                 device=self.device))
            n_fake = round(engine.sampler.expected_batch_size)
            for i in range(0, n_fake, cfg.physical_batch):
                y = self._fake_labels(min(cfg.physical_batch, n_fake - i), nets.rng)
                with torch.no_grad():
                    x = nets.gen(self._latents(y.numel(), nets.rng), y)
                engine.clip_and_accumulate(x, y, torch.ones(y.numel(), dtype=torch.bool, device=self.device))
            info = engine.add_noise()  # ledger spend, then noise; sets D's .grad
            nets.opt_d.step()
            nets.opt_d.zero_grad(set_to_none=True)
            step = info.step
            for _ in range(cfg.g_steps):
                score = disc(nets.gen(self._latents(y_fake.numel(), nets.rng), y_fake), y_fake)
                g_loss = F.softplus(-score).mean()
                self._generator_step(nets, g_loss)
            bar.update(1)
            if ctx.run is not None and step % cfg.log_every == 0:
                ctx.run.log(step, d_noisy_grad_norm=round(info.noisy_grad_norm, 6), g_loss=round(g_loss.item(), 5))
            if step % cfg.agg_steps == 0 and engine.steps_remaining > 0:
                cycles_run += 1
                self.train_info["train_s"] = time.time() - t0
                if ctx.run is not None:
                    self._checkpoint(ctx, nets, finished=False, train_s=time.time() - t0)
                    if (step // cfg.agg_steps) % cfg.grid_every == 0:
                        self._grid(nets.ema, ctx.run.samples_dir / f"grid-cycle{step // cfg.agg_steps:04d}.png")
                    if self._pause(ctx, cycles_run, start, step):
                        bar.close()
                        return
        bar.close()
        self._finish(ctx, nets, t0)

    # -- run control --------------------------------------------------------------------------------------
    def _pause(self, ctx: FitContext, cycles_run: int, start: float, step: int) -> bool:
        cfg = self.config
        out_of_time = cfg.max_minutes > 0 and time.time() - start > 60.0 * cfg.max_minutes
        out_of_cycles = cfg.cycles_per_run > 0 and cycles_run >= cfg.cycles_per_run
        if not (out_of_time or out_of_cycles):
            return False
        if ctx.run is not None:
            reason = f"max_minutes={cfg.max_minutes:g}" if out_of_time else f"cycles_per_run={cfg.cycles_per_run}"
            ctx.run.log(step, event="paused", reason=reason,  # the run's time so far: never a single step's
                        train_s=round(float(self.train_info.get("train_s", 0.0)), 1))
        return True

    def _finish(self, ctx: FitContext, nets: _Nets, t0: float) -> None:
        self.train_info["train_s"] = time.time() - t0
        self.ema_model = nets.ema
        if ctx.run is not None:
            self._checkpoint(ctx, nets, finished=True, train_s=time.time() - t0)
            self._grid(nets.ema, ctx.run.samples_dir / "grid-final.png")
            ctx.run.log(-1, event="train_done", train_s=round(self.train_info["train_s"], 1))

    def _checkpoint(self, ctx: FitContext, nets: _Nets, *, finished: bool, train_s: float | None = None) -> None:
        if ctx.run is None:
            return
        if train_s is not None:
            self.train_info["train_s"] = float(train_s)
        assert self.counts is not None
        tensors = {**prefixed("f1", nets.f1.state_dict()), **prefixed("f2", nets.f2.state_dict()),
                   **prefixed("gen", nets.gen.state_dict()), **prefixed("ema", nets.ema.state_dict()),
                   "counts": self.counts.clone()}
        if self.buffer:
            tensors["buffer"] = torch.stack(self.buffer).cpu()
        if self.center is not None:
            tensors["center"] = self.center.cpu()
        state: dict[str, Any] = {}
        for name, opt in (("opt_d", nets.opt_d), ("opt_f2", nets.opt_f2), ("opt_g", nets.opt_g)):
            if opt is not None:
                t, groups = optimizer_tensors(name, opt)
                tensors.update(t)
                state[name] = groups
        spent = sum(e.steps for e in ctx.ledger.events)
        self.train_info["train_s"] = round(float(self.train_info.get("train_s", 0.0)), 2)
        state.update({"step": spent, "finished": finished, "train_rng": rng_state(nets.rng),
                      "noise_rng": ctx.noise_state(), "noise": self.train_info["noise"], **self.meta()})
        ctx.run.save_checkpoint(tensors, state)

    def _grid(self, gen: ConditionalGenerator, path: Path, per_class: int = 10) -> None:
        """Per-class sample grid from the EMA generator (post-processing; fixed seed)."""
        y = torch.arange(self.num_classes * per_class) // per_class
        x = self._generate(gen, y, torch.Generator().manual_seed(7))
        save_grid(path, to_uint8(x), y.numpy(), self.num_classes, per_class)

    @torch.no_grad()
    def _generate(self, gen: ConditionalGenerator, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        was = gen.training
        gen.eval()
        z = torch.randn(labels.numel(), self.config.z_dim, generator=g).to(self.device)
        x = gen(z, labels.to(self.device))
        gen.train(was)
        return x

    # -- sampling and state ---------------------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the EMA generator; labels (n,) int64, or None for balanced classes."""
        if self.ema_model is None:
            raise InputError("dpaf: fit or load the synthesizer before sampling")
        if isinstance(n, bool):
            raise InputError(f"n must be a positive integer, got {n}")
        labels = self.checked_labels(n, labels)
        g = torch.Generator().manual_seed(int(seed or 0))
        bs = self.config.sample_batch
        out = [to_uint8(self._generate(self.ema_model, torch.from_numpy(labels[i : i + bs]), g))
               for i in range(0, n, bs)]
        return ImageData(np.concatenate(out), labels, list(self.classes), "dpaf samples")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling (EMA) generator's weights, prefixed ``ema.``."""
        if self.ema_model is None:
            raise InputError("dpaf: nothing to save before fit")
        return prefixed("ema", self.ema_model.state_dict())

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ema_model = load_frozen(self.new_generator, "ema", tensors, "dpaf", self.device)
        if "counts" in tensors:
            self.counts = tensors["counts"].double()

    # -- report ------------------------------------------------------------------------------------------
    def report_section(self) -> str:
        cfg = self.config
        t = self.train_info
        if not t:
            return ""
        noise = t["noise"]
        n = t["dataset_size"]
        lines = [
            f"DPAF (Lin et al., 2023): a label-conditional {cfg.generator} generator ({t.get('params_g', 0):,} "
            f"parameters) against a discriminator split into f1 (conv blocks {list(cfg.d_channels)} with GroupNorm, "
            f"{t['params_f1']:,} parameters, {t['feature_dim']}-dimensional features) and f2 (convs "
            f"{list(cfg.f2_channels)} and a projection head, {t['params_f2']:,} parameters).",
            "",
            f"- Privacy: neighbouring relation {NEIGHBOURING_TEXT} (add/remove); budget split by a common noise "
            f"scale {t['scale']:.5g} (f1 share {cfg.f1_share:g}, counts share {cfg.counts_share:g}), calibrated "
            "for the target epsilon before any private access and reserved in the ledger.",
            f"- Class counts, released once with noise multiplier {noise['counts']:.5g} (sensitivity 1): "
            f"{t.get('noisy_counts')}.",
        ]
        if cfg.aggregation:
            lines += [
                f"- Feature aggregation: {cfg.cycles * cfg.agg_steps} releases of per-class (x{cfg.agg_groups} "
                f"groups) sums of f1 features clipped to C_f = {cfg.feature_clip:g}, each on a Poisson sample "
                f"(rate {t['sample_rate_agg']:.5g}, expected {cfg.agg_batch} of {n} images), noise multiplier "
                f"{noise['agg']:.5g}, sensitivity C_f (classes and groups are disjoint).",
                f"- f1: {cfg.cycles * cfg.f1_steps} DP-SGD steps (rate {t['sample_rate_f1']:.5g}, expected batch "
                f"{cfg.f1_batch}, clip {cfg.grad_clip:g}, noise multiplier {noise['f1']:.5g}) on the linearised "
                "discriminator loss whose targets come from released aggregates only.",
                f"- Asymmetric schedule: {cfg.cycles} cycles of {cfg.agg_steps} aggregation releases (each followed by "
                f"{cfg.f2_steps} f2 and {cfg.g_steps} generator update(s)) and {cfg.f1_steps} f1 steps. f2 and the "
                "generator are trained on released aggregates and generated images only: post-processing.",
            ]
        else:
            lines += [
                f"- Ablation (aggregation=false): the whole discriminator f2(clip(f1(x))) trained with DP-SGD, "
                f"{cfg.cycles * cfg.agg_steps} steps (rate {t['sample_rate_plain']:.5g}, expected batch "
                f"{cfg.plain_batch}, clip {cfg.grad_clip:g}, noise multiplier {noise['d']:.5g}), each followed by "
                f"{cfg.g_steps} generator update(s).",
            ]
        lines += [
            f"- Post-processing: Adam (G {cfg.lr_g:g}, f1/D {cfg.lr_f1:g}, f2 {cfg.lr_f2:g}, beta1 {cfg.beta1:g}); "
            f"samples from an EMA ({cfg.ema:g}) of the generator; training time {t.get('train_s', 0.0):.0f} s.",
            "- Logged during training: f2's losses on released aggregates and on fakes, the generator loss, noisy "
            "gradient norms; times only for a whole run (paused, train_done); never a loss, batch size or step time "
            "computed on private data.",
        ]
        return "\n".join(lines)


@register
class DPAFNoAggregation(DPAF):
    """DPAF's ablation as a method of its own (so a benchmark can run both): ``dpaf`` with ``aggregation=false``."""

    name = "dpaf-noagg"
    Config = DPAFNoAggConfig
    description = "DPAF ablation: the same conditional GAN with a plain DP-SGD discriminator (no aggregation)"
