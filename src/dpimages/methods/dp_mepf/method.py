"""DP-MEPF (Harder et al., TMLR 2023): a generator trained on a once-released noisy feature mean embedding.

Steps of `DPMEPF.fit`:

1. Build the feature network from public information only: seeded random
   conv nets (``features=random``), a conv net trained on ``--public``
   (``features=public``), or weights from ``feature_path`` (``features=path``,
   e.g. a torchvision-style VGG-19 state dict).
2. Calibrate the noise for the target (epsilon, delta) and release, once,
   the per-class sums of unit-norm feature vectors and the class counts
   (`release.release`; privacy contract there). With cells (``cell_bits``;
   -1 picks their number from the planned noise) noisy class centres are
   released first and the sums and counts are released per (class, cell).
   These planned releases are the only access to private data.
3. Post-processing: train a generator conditioned on the class (or the
   (class, cell) pair) so that its mean features match the released means
   (batch ``batch_size``, Adam ``lr``/``beta1``, learning rate decayed
   linearly to ``lr_final``).
   Model selection uses only the released means: every ``eval_every`` steps
   the distance of a fixed-noise sample's class means to the released means
   is measured, and the closest weights are kept.

The parts: `trunks` (feature networks, public information only), `release`
(the privacy contract), `matching` (the generator's objective), `report`
(report.md). The generators are initialised from the run's seed stream
``model`` and trained with the stream ``train``; ``max_minutes`` is a time
budget for the generator training over the whole run (`RunClock`): when it
is spent the training finishes early (post-processing: no privacy effect).

Neighbouring relation: add or remove one image together with its label.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.methods.base import TrainedSynthesizer, load_frozen
from dpimages.methods.dp_mepf import release as rel
from dpimages.methods.dp_mepf.config import DPMEPFConfig
from dpimages.methods.dp_mepf.matching import matching_loss, released_distance
from dpimages.methods.dp_mepf.report import report_text
from dpimages.methods.feature_sources import build_trunks, restore_trunks, trunk_tensors
from dpimages.methods.labeller import LabellerPlan
from dpimages.methods.training import RunClock, TrainLoop, ema_update, write_grid
from dpimages.nets.feature_extractors import FeatureExtractor
from dpimages.nets.generators import ConditionalGenerator
from dpimages.privacy import PrivacyEvent
from dpimages.runs import Run, load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed
from dpimages.synthesizer import FitContext


class DPMEPF(TrainedSynthesizer[DPMEPFConfig]):
    """DP-MEPF: match a label-conditional generator to noisy per-class feature means.

    ``train_info`` (public facts, saved with the checkpoint): ``features`` (the feature networks' source),
    ``release`` (noise multipliers, budget weights, scale, feature dimensions, cells) and the generator
    training's ``steps``, ``best_step``, ``best_distance`` and ``train_s``.
    """

    name = "dp-mepf"
    Config = DPMEPFConfig
    description = "DP mean embeddings of (public or random) perceptual features; generator trained on them"
    device_modules = ("sample_generator",)

    def __init__(self, config: DPMEPFConfig) -> None:
        super().__init__(config)
        self.generator: ConditionalGenerator | None = None
        self.sample_generator: ConditionalGenerator | None = None
        self.extractor: FeatureExtractor | None = None
        self.released: rel.Released | None = None
        self.cell_proportions: list[list[float]] = []
        self.cell_bits = max(config.cell_bits, 0)
        self._sample_prefix = "best"
        self._trunks: tuple[list, dict] | None = None

    @classmethod
    def contract_cases(cls, workdir: Path) -> list[dict[str, Any]]:
        """The DP labeller stage (its DP-SGD steps before the release, then filtering) and scattering features,
        which the smoke preset leaves off."""
        return [{"name": "labeller", "overrides": ["features=random+scatter", "labeller=filter"]}]

    # -- building blocks -----------------------------------------------------------------
    def _new_generator(self) -> ConditionalGenerator:
        h, w, c = self.image_shape
        cfg = self.config
        return ConditionalGenerator((c, h, w), self.num_classes * self.cells, cfg.z_dim, cfg.gen_channels,
                                    cfg.generator)

    @property
    def cells(self) -> int:
        """Cells per class (1 without cells): the generator is conditioned on (class, cell) rows."""
        return 2**self.cell_bits

    def _resolve_cell_bits(self, n_images: int, dims_first: int, epsilon: float, delta: float) -> int:
        """``cell_bits``, or with -1 the most cells whose per-cell means keep the expected noise norm small.

        Uses only the planned noise, the feature dimension and the data set
        size N (treated as public throughout dpimages, as in the DP-SGD
        sampling rate), never the class counts.
        """
        cfg = self.config
        if cfg.cell_bits >= 0:
            return cfg.cell_bits
        w = rel.weights(cfg.second_moment, cfg.weight_first, cfg.weight_second, cfg.weight_counts, 1,
                        cfg.weight_centres)
        labeller = self.labeller_plan(n_images, epsilon, delta)
        _, plan = rel.calibrate_plan(epsilon, delta, w, 2, [] if labeller is None else labeller.events())
        return rel.auto_cell_bits(plan.noise_first, dims_first, n_images / self.num_classes, cfg.cell_noise)

    def _rows(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Generator rows for class labels: a cell per image drawn from its class's noisy cell proportions."""
        if self.cells == 1:
            return labels
        p = torch.tensor(self.cell_proportions, dtype=torch.float32)[labels.cpu()]
        return labels * self.cells + torch.multinomial(p, 1, generator=g).squeeze(1).to(labels.device)

    def _nonneg_first(self) -> bool:
        cfg = self.config
        return cfg.feature_tap == "post" and cfg.feature_act == "relu" and cfg.features != "path"

    def _set_released(self, released: rel.Released) -> None:
        """Adopt the released values and what is derived from them (post-processing)."""
        self.released = released
        self.cell_bits = released.cells.bit_length() - 1
        self.cell_proportions = released.cell_proportions().tolist()

    # -- the release plan (public facts only) ------------------------------------------
    def _build_trunks(self, channels: int, public: ImageData | None, run: Run | None) -> tuple[list, dict]:
        """The feature trunks (random, or trained on PUBLIC data), built once per synthesizer and then reused."""
        if self._trunks is None:
            log = None if run is None else partial(run.log, 0, event="public_feature_training")
            self._trunks = build_trunks(self.config, channels, public, log, self.image_shape[:2])
        return self._trunks

    def _plan(self, n: int, dims: tuple[int, ...], epsilon: float, delta: float) -> tuple[
            rel.Weights, float, rel.ReleasePlan, LabellerPlan | None]:
        """Budget weights, common scale and release plan for N = `n` images at (epsilon, delta), and the DP
        labeller's stage (calibrated to its share first; the release over both); sets the cells."""
        cfg = self.config
        if self.released is None:
            self.cell_bits = self._resolve_cell_bits(n, dims[0], epsilon, delta)
        w = rel.weights(cfg.second_moment, cfg.weight_first, cfg.weight_second, cfg.weight_counts, self.cell_bits,
                        cfg.weight_centres)
        labeller = self.labeller_plan(n, epsilon, delta)
        before = [] if labeller is None else labeller.events()
        scale, plan = rel.calibrate_plan(epsilon, delta, w, self.cells, before)
        return w, scale, plan, labeller

    def planned_events(self, private: ImageData, public: ImageData | None, epsilon: float,
                       delta: float, *, dataset_size: int) -> list[PrivacyEvent]:
        """The events a fit at (epsilon, delta) will spend, from public facts only (N, shape, classes, config).

        Reads no pixel or label of `private`: N = `dataset_size`, its image shape and class list are public facts.
        """
        self.num_classes, self.image_shape = private.num_classes, private.image_shape
        channels = self.image_shape[2]
        trunks, _ = self._build_trunks(channels, public, None)
        cfg = self.config
        dims = FeatureExtractor(trunks, cfg.feature_layers, cfg.feature_pool, cfg.second_moment,
                                cfg.feature_balance).dims((channels, *self.image_shape[:2]))
        _, _, plan, labeller = self._plan(dataset_size, dims, epsilon, delta)
        return [*([] if labeller is None else labeller.events()), *plan.events()]

    # -- fit ----------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Release the noisy statistics once, then train the generator on them (see the module docstring)."""
        cfg = self.config
        tensors, state = self.begin_fit(private, ctx)
        if private.labels is None:
            raise InputError(f"{private.name}: dp-mepf needs labelled private data")
        if min(self.image_shape[:2]) < 8:
            raise InputError(f"dp-mepf needs images of at least 8x8 pixels, got {self.image_shape}")
        run, channels = ctx.run, self.image_shape[2]
        if "release.sum_first" in tensors:  # resumed: the release is in the checkpoint, never made again
            self.train_info = dict(state.get("train_info", {}))
            self._set_released(rel.Released.from_tensors(tensors, self.num_classes))
            trunks = restore_trunks(cfg, channels, tensors, int(state.get("feature_trunks", 0)),
                                    self.train_info.get("features", {}))
        else:
            trunks, features = self._build_trunks(channels, public, run)
            self.train_info = {"features": features}
        extractor = FeatureExtractor(trunks, cfg.feature_layers, cfg.feature_pool, cfg.second_moment,
                                     cfg.feature_balance).to(self.device)
        self.extractor = extractor
        dims = extractor.dims((channels, *self.image_shape[:2]))
        w, scale, plan, labeller = self._plan(ctx.public_size(private), dims, ctx.target_epsilon, ctx.ledger.delta)
        self.train_info["release"] = {"scale": scale, "weights": list(w), "dims": list(dims), **asdict(plan)}
        if labeller is not None:
            ctx.ledger.reserve(*labeller.events(), *plan.events())  # the joint plan, before any private read
            self.fit_labeller(labeller, private, ctx, tensors)
        if self.released is None:
            self._set_released(rel.release(
                extractor, private.to_tensor(self.device), private.label_tensor(self.device), self.num_classes, plan,
                ledger=ctx.ledger, noise=ctx.noise, chunk=cfg.embed_chunk, cell_seed=cfg.feature_seed,
                nonneg_first=self._nonneg_first(), cell_directions=cfg.cell_directions,
            ))
            if run is not None:
                assert self.released is not None
                run.log(0, event="release", cells=self.cells, dims_first=dims[0],  # no time: whole-run times only
                        dims_second=dims[1], noise_scale=scale, noise_first=plan.noise_first,
                        noise_second=plan.noise_second, noise_counts=plan.noise_counts,
                        noisy_counts=[round(float(v), 1) for v in self.released.counts])
        self._train(ctx, tensors, state)

    def _train(self, ctx: FitContext, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Post-processing: fit the generator to the released means, keep the weights closest to them."""
        cfg, run, extractor = self.config, ctx.run, self.extractor
        assert self.released is not None and extractor is not None
        m1, m2 = self.released.means(cfg.project_means, self._nonneg_first())
        m1, m2 = m1.to(self.device), (None if m2 is None else m2.to(self.device))
        with ctx.seeded_init("model"):
            gen = self._new_generator().to(self.device)
            ema = self._new_generator().to(self.device) if cfg.ema > 0 else None
            best = self._new_generator().to(self.device)
        nets = {"gen": gen, "best": best, **({} if ema is None else {"ema": ema})}
        opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        rng = ctx.generator("train")
        info = self.train_info
        resumed = "gen.fc.weight" in tensors
        if resumed:
            for prefix, net in nets.items():
                net.load_state_dict(unprefixed(prefix, tensors))
            load_optimizer("opt", opt, tensors, state["optimizer"])
            set_rng_state(rng, state["train_rng"])
        else:
            for net in (best, ema):
                if net is not None:
                    net.load_state_dict(gen.state_dict())
        done = int(info.get("steps", 0)) if resumed else 0
        best_d, best_step = float(info.get("best_distance", float("inf"))), int(info.get("best_step", -1))
        clock = RunClock(cfg.max_minutes, unit_name="steps",  # the budget covers the whole run
                         elapsed_before=float(info.get("train_s", 0.0)) if resumed else 0.0)
        self.generator = gen
        self.sample_generator = best if cfg.select_best else (gen if ema is None else ema)

        def save(step: int, finished: bool) -> None:
            info.update(steps=step, best_step=best_step, best_distance=best_d, train_s=round(clock.elapsed(), 2))
            if run is not None:
                self._checkpoint(ctx, nets, opt, rng, step, finished)

        if state.get("finished"):
            self._finish(ctx)
            return
        if done == 0:  # the release is safe on disk before any training
            save(0, False)
        budget_s = 60.0 * cfg.max_minutes if cfg.max_minutes > 0 else float("inf")

        def step(t: int) -> dict[str, Any]:
            nonlocal best_d, best_step, done
            done = t
            # the learning rate decays with the fraction of steps or of the time budget, whichever is further
            frac = min(1.0, max((t - 1) / max(cfg.steps - 1, 1), clock.elapsed() / budget_s))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (1.0 - (1.0 - cfg.lr_final) * frac)
            y = torch.randint(m1.shape[0], (cfg.batch_size,), generator=rng).to(self.device)
            z = torch.randn(cfg.batch_size, cfg.z_dim, generator=rng).to(self.device)
            loss = matching_loss(extractor, gen(z, y), y, m1, m2, cfg.unbiased)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, gen, cfg.ema)
                ema_update(ema, gen, cfg.ema)
            values: dict[str, Any] = {"loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"]}
            if t % cfg.eval_every == 0 or t == cfg.steps or clock.out_of_time():
                d = released_distance(candidate(), extractor, m1, m2, cfg.z_dim, cfg.eval_per_class * self.num_classes,
                                      self.device)
                values["released_distance"] = d
                if d < best_d:
                    best_d, best_step = d, t
                    best.load_state_dict(candidate().state_dict())
            return values  # no time per step

        def candidate() -> ConditionalGenerator:
            return gen if ema is None else ema

        loop = TrainLoop(
            run, cfg.steps, step, checkpoint=save, clock=clock, on_time="finish",
            grid=lambda path: self._grid(candidate(), path), final_grid=lambda path: self._grid(
                self.sample_generator, path), log_every=cfg.log_every, grid_every=cfg.grid_every,
            checkpoint_every=cfg.checkpoint_every, progress=ctx.progress,
            desc="dp-mepf generator steps (post-processing)", log_when=lambda v: "released_distance" in v,
            done_values=lambda: {"best_step": best_step, "best_released_distance": best_d})
        loop(done)
        info.update(steps=done, best_step=best_step, best_distance=best_d, train_s=round(clock.elapsed(), 2))

    def _grid(self, gen: ConditionalGenerator, path: Path, per_class: int = 10) -> None:
        """Each class's cells in turn, from the fixed grid seed."""
        was = gen.training
        gen.eval()

        def generate(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            rows = y * self.cells + torch.arange(len(y)) % self.cells
            return gen(torch.randn(len(y), self.config.z_dim, generator=g).to(self.device), rows.to(self.device))

        write_grid(path, generate, self.num_classes, per_class)
        gen.train(was)

    def _checkpoint(self, ctx: FitContext, nets: dict[str, ConditionalGenerator], opt: torch.optim.Optimizer,
                    rng: torch.Generator, step: int, finished: bool) -> None:
        assert ctx.run is not None and self.released is not None and self.extractor is not None
        tensors = {k: v for prefix, net in nets.items() for k, v in prefixed(prefix, net.state_dict()).items()}
        opt_tensors, opt_groups = optimizer_tensors("opt", opt)
        feature_tensors, n_trunks = trunk_tensors(self.config, self.extractor.trunks)
        tensors.update({**opt_tensors, **self.released.tensors(), **feature_tensors,
                        **self.labeller_tensors()})
        cfg = self.config
        self.save_checkpoint(ctx, tensors, step=step, finished=finished, optimizer=opt_groups,
                             train_rng=rng_state(rng), feature_trunks=n_trunks,
                             sample_weights="best" if cfg.select_best else ("ema" if "ema" in nets else "gen"))

    def _finish(self, ctx: FitContext) -> None:
        """A run that had finished: its final grid again (the generator to sample is restored)."""
        if ctx.run is not None:
            assert self.sample_generator is not None
            self._grid(self.sample_generator, ctx.run.grid_path("grid-final.png"))

    def report_section(self) -> str:
        """The method's part of report.md: released quantities, neighbouring relation, features, training."""
        return report_text(self.config, self.num_classes, self.cell_bits, self.train_info) if self.train_info else ""

    # -- sampling and state -------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the selected generator (balanced classes if `labels` is None; cells drawn from each
        class's noisy cell proportions)."""
        if self.sample_generator is None:
            raise InputError("dp-mepf: fit or load the synthesizer before sampling")
        gen = self.sample_generator
        gen.eval()

        @torch.no_grad()
        def generate(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            rows = self._rows(y, g).to(self.device)
            return gen(torch.randn(len(rows), self.config.z_dim, generator=g).to(self.device), rows)

        return self.sample_in_batches(n, labels, seed, 1000, generate)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "cell_bits": self.cell_bits,
                "cell_proportions": [list(p) for p in self.cell_proportions]}

    def restore_meta(self, state: dict[str, Any]) -> None:
        super().restore_meta(state)  # `dpimages report` rebuilds the report section from train_info
        self.cell_proportions = [[float(v) for v in p] for p in state.get("cell_proportions", [])]
        self.cell_bits = int(state.get("cell_bits", 0))
        self._sample_prefix = state.get("sample_weights", "best")

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.sample_generator is None:
            raise InputError("dp-mepf: nothing to save before fit")
        return {**prefixed("best", self.sample_generator.state_dict()), **self.labeller_tensors()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sample_generator = load_frozen(self._new_generator, self._sample_prefix, tensors, self.name, self.device)
        self.load_labeller(tensors)
