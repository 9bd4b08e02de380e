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

Neighbouring relation: add or remove one image together with its label.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpimages.api import FitContext, register
from dpimages.data import ImageData, to_uint8
from dpimages.errors import InputError
from dpimages.eval.grid import save_grid
from dpimages.filehash import file_sha256
from dpimages.methods.common import MethodSynthesizer
from dpimages.methods.dp_mepf import release as rel
from dpimages.methods.dp_mepf.config import DPMEPFConfig
from dpimages.nets.features import (
    ConvTrunk,
    FeatureExtractor,
    Trunk,
    load_trunk,
    random_conv_trunk,
    train_conv_trunk,
)
from dpimages.nets.generators import ConditionalGenerator
from dpimages.privacy.ledger import NEIGHBOURING_TEXT
from dpimages.runs import load_optimizer, optimizer_tensors, prefixed, rng_state, set_rng_state, unprefixed


def _file_sha256(path: Path) -> str:
    """Provenance of a feature net loaded by path: ``sha256:`` over its weights and features.json (or the file)."""
    files = [path / "weights.safetensors", path / "features.json"] if path.is_dir() else [path]
    return "sha256:" + file_sha256(*files)


@register
class DPMEPF(MethodSynthesizer):
    """DP-MEPF: match a label-conditional generator to noisy per-class feature means."""

    name = "dp-mepf"
    Config = DPMEPFConfig
    description = "DP mean embeddings of (public or random) perceptual features; generator trained on them"
    device_modules = ("sample_generator",)

    def __init__(self, config: DPMEPFConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.config: DPMEPFConfig = config
        self.generator: ConditionalGenerator | None = None
        self.sample_generator: ConditionalGenerator | None = None
        self.extractor: FeatureExtractor | None = None
        self.released: rel.Released | None = None
        self.class_proportions: list[float] = []
        self.cell_proportions: list[list[float]] = []
        self.cell_bits = max(config.cell_bits, 0)
        self.feature_info: dict[str, Any] = {}

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
        _, plan = rel.calibrate_plan(epsilon, delta, w, 2)
        return rel.auto_cell_bits(plan.noise_first, dims_first, n_images / self.num_classes, cfg.cell_noise)

    def _rows(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Generator rows for class labels: a cell per image drawn from its class's noisy cell proportions."""
        if self.cells == 1:
            return labels
        p = torch.tensor(self.cell_proportions, dtype=torch.float32)[labels.cpu()]
        return labels * self.cells + torch.multinomial(p, 1, generator=g).squeeze(1).to(labels.device)

    def _trunks(self, public: ImageData | None, seed: int, ctx: FitContext | None) -> list[Trunk]:
        """Feature trunks from public information only (random seeds, public data, a weights file)."""
        cfg = self.config
        c = self.image_shape[2]
        if cfg.features == "random":
            self.feature_info = {"source": "random", "seeds": [cfg.feature_seed + i for i in range(cfg.feature_nets)]}
            return [random_conv_trunk(cfg.feature_seed + i, c, cfg.feature_channels, cfg.feature_kernel,
                                      cfg.feature_act, cfg.feature_tap) for i in range(cfg.feature_nets)]
        if cfg.features == "public":
            if public is None:
                raise InputError("features=public needs public data: pass --public SPEC (e.g. mnist-5k)")
            if public.labels is None:
                raise InputError(f"{public.name}: features=public needs a labelled public set")
            if public.image_shape[2] != c:
                raise InputError(f"public images have {public.image_shape[2]} channels, private images {c}")

            def log(**kv: Any) -> None:
                if ctx is not None and ctx.run is not None:
                    ctx.run.log(0, event="public_feature_training", **kv)

            trunk, facts = train_conv_trunk(
                public.to_tensor(), public.label_tensor(), public.num_classes, channels=cfg.feature_channels,
                kernel=cfg.feature_kernel, act=cfg.feature_act, epochs=cfg.public_epochs, seed=cfg.feature_seed,
                log=log,
            )
            trunk.tap = cfg.feature_tap
            self.feature_info = {"source": "public", "public": public.name, "public_fingerprint": public.public_id,
                                 **facts}
            return [trunk]
        path = Path(cfg.feature_path)
        trunk, meta = load_trunk(path, tap=cfg.feature_tap, resize=cfg.vgg_resize)
        in_ch = trunk.in_channels
        if in_ch != c and not (c == 1 and in_ch == 3 and trunk.arch == "vgg"):
            raise InputError(f"feature network {path} takes {in_ch}-channel images, the data has {c} channels")
        self.feature_info = {"source": "path", "path": str(path), "sha256": _file_sha256(path),
                             **{k: v for k, v in meta.items() if k not in ("layout",)}}
        return [trunk]

    def _extractor(self, trunks: list[Trunk]) -> FeatureExtractor:
        cfg = self.config
        return FeatureExtractor(trunks, cfg.feature_layers, cfg.feature_pool, cfg.second_moment, cfg.feature_balance)

    def _nonneg_first(self) -> bool:
        cfg = self.config
        return cfg.feature_tap == "post" and cfg.feature_act == "relu" and cfg.features != "path"

    # -- fit ----------------------------------------------------------------------------
    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        """Release the noisy statistics once, then train the generator on them (see the module docstring)."""
        cfg = self.config
        tensors, state = self.begin_fit(private, ctx)
        if private.labels is None:
            raise InputError(f"{private.name}: dp-mepf needs labelled private data")
        if min(self.image_shape[:2]) < 8:
            raise InputError(f"dp-mepf needs images of at least 8x8 pixels, got {self.image_shape}")
        run = ctx.run
        if "release.sum_first" in tensors:
            self._restore_release(tensors, state)
            trunks = self._restore_trunks(tensors, state)
        else:
            trunks = self._trunks(public, ctx.seed, ctx)
        extractor = self._extractor(trunks).to(self.device)
        self.extractor = extractor
        dims = extractor.dims((self.image_shape[2], *self.image_shape[:2]))
        if self.released is None:
            self.cell_bits = self._resolve_cell_bits(private.images.shape[0], dims[0], ctx.ledger.epsilon_budget,
                                                     ctx.ledger.delta)
        w = rel.weights(cfg.second_moment, cfg.weight_first, cfg.weight_second, cfg.weight_counts, self.cell_bits,
                        cfg.weight_centres)
        scale, plan = rel.calibrate_plan(ctx.ledger.epsilon_budget, ctx.ledger.delta, w, self.cells)
        if self.released is None:
            self.released = rel.release(
                extractor, private.to_tensor(self.device), private.label_tensor(self.device), self.num_classes, plan,
                ledger=ctx.ledger, noise=ctx.noise, chunk=cfg.embed_chunk, cell_seed=cfg.feature_seed,
                nonneg_first=self._nonneg_first(), cell_directions=cfg.cell_directions,
            )
            self.class_proportions = self.released.proportions()
            self.cell_proportions = self.released.cell_proportions().tolist()
            if run is not None:
                run.log(0, event="release", cells=self.cells, dims_first=dims[0],  # no time: whole-run times only
                        dims_second=dims[1], noise_scale=scale, noise_first=plan.noise_first,
                        noise_second=plan.noise_second, noise_counts=plan.noise_counts,
                        noisy_counts=[round(float(v), 1) for v in self.released.counts])
        self.release_info = {"scale": scale, "plan": plan, "weights": w, "dims": dims}
        self._train(ctx, tensors, state)

    def _restore_release(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.cell_bits = (tensors["release.counts"].numel() // self.num_classes).bit_length() - 1
        self.released = rel.Released(
            tensors["release.sum_first"].double(),
            tensors["release.sum_second"].double() if "release.sum_second" in tensors else None,
            tensors["release.counts"].double(),
            self.cells,
        )
        self.class_proportions = self.released.proportions()
        self.cell_proportions = self.released.cell_proportions().tolist()
        self.feature_info = dict(state.get("feature_info", {}))

    def _restore_trunks(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> list[Trunk]:
        """The feature trunks of a checkpoint (weights saved there, or the same file by path and hash)."""
        cfg = self.config
        if cfg.features == "path":
            path = Path(cfg.feature_path)
            if _file_sha256(path) != self.feature_info.get("sha256"):
                raise InputError(f"--resume: feature weights {path} changed since the run started")
            trunk, _ = load_trunk(path, tap=cfg.feature_tap, resize=cfg.vgg_resize)
            return [trunk]
        trunks: list[Trunk] = []
        for i in range(int(state.get("feature_trunks", 0))):
            t = ConvTrunk(self.image_shape[2], cfg.feature_channels, cfg.feature_kernel, cfg.feature_act,
                          cfg.feature_tap)
            t.load_state_dict(unprefixed(f"feat{i}", tensors))
            trunks.append(t)
        return trunks

    def _batch_loss(
        self, gen: ConditionalGenerator, z: torch.Tensor, y: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor | None,
        unbiased: bool,
    ) -> torch.Tensor:
        """Sum over the classes in the batch of ||mean features - released mean||^2 (both moments).

        With `unbiased`, the squared norm of each class's batch mean is
        estimated without its diagonal terms (features have unit norm, so
        those are the constant 1/n): the MMD-style estimate that does not
        reward identical samples.
        """
        assert self.extractor is not None
        f1, f2 = self.extractor(gen(z, y))
        total = torch.zeros((), device=z.device)
        for f, m in ((f1, m1), (f2, m2)):
            if f is None or m is None:
                continue
            k = m.shape[0]
            sums = torch.zeros(k, f.shape[1], device=f.device, dtype=f.dtype).index_add(0, y, f)
            n = torch.bincount(y, minlength=k).to(f.dtype)
            present = n > 0
            sums, n, mt = sums[present], n[present], m[present]
            sq = (sums * sums).sum(1)
            if unbiased:
                sq_mean = torch.where(n > 1, (sq - n) / (n * (n - 1)).clamp_min(1.0), sq / n**2)
            else:
                sq_mean = sq / n**2
            cross = (sums * mt).sum(1) / n
            total = total + (sq_mean - 2 * cross + (mt * mt).sum(1)).sum()
        return total

    @torch.no_grad()
    def _released_distance(self, gen: ConditionalGenerator, m1: torch.Tensor, m2: torch.Tensor | None) -> float:
        """Distance of a fixed-noise sample's class means to the released means (selection criterion).

        Unbiased in the generator's own term (no diagonal), so that a
        less diverse sample is not preferred for its smaller batch variance.
        """
        g = torch.Generator().manual_seed(12345)
        rows = m1.shape[0]
        n = self.config.eval_per_class * self.num_classes
        y = torch.arange(n) % rows
        z = torch.randn(n, self.config.z_dim, generator=g)
        was = gen.training
        gen.eval()
        d = float(self._batch_loss(gen, z.to(self.device), y.to(self.device), m1, m2, unbiased=True))
        gen.train(was)
        return d

    def _train(self, ctx: FitContext, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        cfg = self.config
        run = ctx.run
        assert self.released is not None
        m1, m2 = self.released.means(cfg.project_means, self._nonneg_first())
        m1, m2 = m1.to(self.device), (None if m2 is None else m2.to(self.device))
        gen = self._new_generator().to(self.device)
        opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        ema = self._new_generator().to(self.device) if cfg.ema > 0 else None
        best = self._new_generator().to(self.device)
        rng = torch.Generator().manual_seed(ctx.seed + 1)
        step, best_d, best_step, elapsed = 0, float("inf"), -1, 0.0
        if "gen.fc.weight" in tensors:
            gen.load_state_dict(unprefixed("gen", tensors))
            best.load_state_dict(unprefixed("best", tensors))
            if ema is not None:
                ema.load_state_dict(unprefixed("ema", tensors))
            load_optimizer("opt", opt, tensors, state["optimizer"])
            set_rng_state(rng, state["train_rng"])
            step, best_d, best_step = int(state["step"]), float(state["best_distance"]), int(state["best_step"])
            elapsed = float(state.get("train_s", 0.0))
        else:
            if ema is not None:
                ema.load_state_dict(gen.state_dict())
            best.load_state_dict(gen.state_dict())
        if state.get("finished"):
            self.generator, self.sample_generator = gen, best if cfg.select_best else (ema or gen)
            self._finish(ctx, step, best_step, best_d, elapsed, write=False)
            return
        if step == 0 and run is not None:  # the release is safe on disk before any training
            self._checkpoint(ctx, gen, ema, best, opt, rng, step, best_d, best_step, elapsed, finished=False)
        self.generator = gen
        t0 = time.time() - elapsed
        budget_s = 60.0 * cfg.max_minutes if cfg.max_minutes > 0 else float("inf")
        out_of_time = False
        bar = tqdm(total=cfg.steps, initial=step, disable=not ctx.progress, desc="dp-mepf generator steps "
                   "(post-processing)")
        while step < cfg.steps and not out_of_time:
            # the learning rate decays with the fraction of steps or of the time budget, whichever is further
            frac = min(1.0, max(step / max(cfg.steps - 1, 1), (time.time() - t0) / budget_s))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (1.0 - (1.0 - cfg.lr_final) * frac)
            y = torch.randint(m1.shape[0], (cfg.batch_size,), generator=rng).to(self.device)
            z = torch.randn(cfg.batch_size, cfg.z_dim, generator=rng).to(self.device)
            loss = self._batch_loss(gen, z, y, m1, m2, cfg.unbiased)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            out_of_time = time.time() - t0 >= budget_s
            last = step == cfg.steps or out_of_time
            if ema is not None:
                with torch.no_grad():
                    for pe, pg in zip(ema.parameters(), gen.parameters(), strict=True):
                        pe.lerp_(pg, 1.0 - cfg.ema)
                    for be, bg in zip(ema.buffers(), gen.buffers(), strict=True):
                        be.copy_(bg)
            candidate = ema if ema is not None else gen
            metrics: dict[str, Any] = {}
            if step % cfg.eval_every == 0 or last:
                d = self._released_distance(candidate, m1, m2)
                metrics["released_distance"] = d
                if d < best_d:
                    best_d, best_step = d, step
                    best.load_state_dict(candidate.state_dict())
            if run is not None and (step % cfg.log_every == 0 or metrics):
                run.log(step, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"],
                        train_s=round(time.time() - t0, 1), **metrics)
            if run is not None and step % cfg.grid_every == 0:
                self._grid(candidate, run.samples_dir / f"grid-{step:06d}.png")
            if run is not None and step % cfg.checkpoint_every == 0 and not last:
                self._checkpoint(ctx, gen, ema, best, opt, rng, step, best_d, best_step, time.time() - t0,
                                 finished=False)
        bar.close()
        elapsed = time.time() - t0
        if out_of_time and run is not None:
            run.log(step, event="time_budget_reached", max_minutes=cfg.max_minutes, planned_steps=cfg.steps)
        self.sample_generator = best if cfg.select_best else (ema or gen)
        self._report = self._report_text(ctx, step, best_step, best_d, elapsed)  # saved with the checkpoint
        if run is not None:
            self._checkpoint(ctx, gen, ema, best, opt, rng, step, best_d, best_step, elapsed, finished=True)
        self._finish(ctx, step, best_step, best_d, elapsed, write=True)

    def _grid(self, gen: ConditionalGenerator, path: Path, per_class: int = 10) -> None:
        was = gen.training
        gen.eval()
        g = torch.Generator().manual_seed(7)
        y = torch.arange(self.num_classes * per_class) // per_class
        rows = y * self.cells + torch.arange(len(y)) % self.cells  # each class's cells in turn
        with torch.no_grad():
            x = gen(torch.randn(len(y), self.config.z_dim, generator=g).to(self.device), rows.to(self.device))
        gen.train(was)
        save_grid(path, to_uint8(x), y.numpy(), self.num_classes, per_class)

    def _checkpoint(
        self, ctx: FitContext, gen: ConditionalGenerator, ema: ConditionalGenerator | None, best: ConditionalGenerator,
        opt: torch.optim.Optimizer, rng: torch.Generator, step: int, best_d: float, best_step: int, elapsed: float,
        *, finished: bool,
    ) -> None:
        assert ctx.run is not None and self.released is not None and self.extractor is not None
        tensors = {**prefixed("gen", gen.state_dict()), **prefixed("best", best.state_dict())}
        if ema is not None:
            tensors.update(prefixed("ema", ema.state_dict()))
        opt_tensors, opt_groups = optimizer_tensors("opt", opt)
        tensors.update(opt_tensors)
        tensors["release.sum_first"] = self.released.sum_first
        tensors["release.counts"] = self.released.counts
        if self.released.sum_second is not None:
            tensors["release.sum_second"] = self.released.sum_second
        n_trunks = 0
        if self.config.features != "path":
            for i, t in enumerate(self.extractor.trunks):
                tensors.update(prefixed(f"feat{i}", t.state_dict()))
            n_trunks = len(self.extractor.trunks)
        sample_prefix = "best" if self.config.select_best else ("ema" if ema is not None else "gen")
        state = {
            "step": step, "finished": finished, "best_distance": best_d, "best_step": best_step,
            "train_s": round(elapsed, 2), "sample_weights": sample_prefix, "optimizer": opt_groups,
            "train_rng": rng_state(rng),
            "noise_rng": ctx.noise_state(), "feature_info": self.feature_info, "feature_trunks": n_trunks,
            **self.meta(),
        }
        ctx.run.save_checkpoint(tensors, state)

    # -- report -------------------------------------------------------------------------
    def _finish(
        self, ctx: FitContext, step: int, best_step: int, best_d: float, elapsed: float, *, write: bool
    ) -> None:
        """Final grid, the train_done metric and the text of the report section."""
        cfg = self.config
        self._report = self._report_text(ctx, step, best_step, best_d, elapsed)
        run = ctx.run
        if run is None:
            return
        assert self.sample_generator is not None
        self._grid(self.sample_generator, run.samples_dir / "grid-final.png")
        if write:
            run.log(step, event="train_done", best_step=best_step, best_released_distance=best_d,
                    train_s=round(elapsed, 1), batch_size=cfg.batch_size)

    def report_section(self) -> str:
        """The method's part of report.md: released quantities, neighbouring relation, features, training."""
        return getattr(self, "_report", "")

    def _report_text(self, ctx: FitContext, step: int, best_step: int, best_d: float, elapsed: float) -> str:
        info = getattr(self, "release_info", None)
        cfg = self.config
        k = self.num_classes
        lines = [
            f"DP-MEPF: a label-conditional {cfg.generator} generator trained to match noisy per-class means of "
            "unit-norm features.", "",
            "### What was released",
            "",
            f"Neighbouring relation: {NEIGHBOURING_TEXT} (add/remove). Released once each, by Gaussian "
            "mechanisms with L2 sensitivity 1 calibrated together (these releases are the only access to private "
            "data):",
        ]
        if info is not None:
            d1, d2 = info["dims"]
            plan = info["plan"]
            c = self.cells
            per, rows = ("per-class", f"{k}") if c == 1 else ("per-(class, cell)", f"{k * c} ({k} classes x {c} cells)")
            if plan.noise_centres is not None:
                lines += [
                    f"- cell centres: per-class sums of unit-norm first-moment feature vectors, a {k} x {d1} matrix, "
                    f"noise multiplier {plan.noise_centres:.5g}, and per-class image counts, noise multiplier "
                    f"{plan.noise_counts:.5g}; an image's cell is the sign pattern of the projections of its feature "
                    f"vector minus its class's noisy centre onto {self.cell_bits} direction"
                    f"{'s' if self.cell_bits > 1 else ''} ("
                    + ("towards the class's nearest other noisy centres" if cfg.cell_directions == "neighbours"
                       else f"random, public seed {cfg.feature_seed}")
                    + "), a function of the image and of released values only"
                    + ("; the number of cells was chosen from the planned noise, the feature dimension and the "
                       "data set size N (treated as public)" if cfg.cell_bits < 0 else "")
                    + ";",
                ]
            lines.append(f"- {per} sums of unit-norm first-moment feature vectors: a {rows} x {d1} matrix, noise "
                         f"multiplier {plan.noise_first:.5g};")
            if plan.noise_second is not None:
                lines.append(f"- {per} sums of unit-norm second-moment feature vectors: a {rows} x {d2} matrix, "
                             f"noise multiplier {plan.noise_second:.5g};")
            lines += [
                f"- {per} image counts ({rows} numbers), noise multiplier {plan.noise_counts:.5g}.",
                "",
                "Budget weights (share of 1/sigma^2) first/second/counts/centres: "
                + "/".join(f"{v:.3f}" for v in info["weights"])
                + (" (the counts twice)" if plan.noise_centres is not None else "")
                + f"; common scale {info['scale']:.5g} (calibrated with dp-accounting PLD for the target epsilon).",
            ]
        lines += [
            "",
            "Sensitivity: each image's feature vector has norm 1 (clipped to 1); classes (and cells) are "
            "disjoint, so adding or removing one image moves each stacked sum by at most 1 and the counts by 1. "
            "Everything after the release (means = noisy sums / noisy counts, projection onto the set of possible "
            "means, generator training, model selection on the released means only) is post-processing.",
            "", "### Features", "",
            f"- source: {self.feature_info.get('source')}"
            + (f" ({self.feature_info.get('public')}, public validation accuracy "
               f"{self.feature_info.get('public_val_accuracy', float('nan')):.3f})"
               if self.feature_info.get("source") == "public" else "")
            + (f" ({self.feature_info.get('path')})" if self.feature_info.get("source") == "path" else "")
            + (f" (seeds {self.feature_info.get('seeds')})" if self.feature_info.get("source") == "random" else ""),
            f"- layers {list(cfg.feature_layers) or 'all'}, pooling {list(cfg.feature_pool)}, tap {cfg.feature_tap}, "
            f"second moment {cfg.second_moment}, channels {list(cfg.feature_channels)}, networks {cfg.feature_nets}",
            "", "### Generator training (post-processing)", "",
            f"- {step} steps, batch {cfg.batch_size}, Adam lr {cfg.lr:g} (decayed to x{cfg.lr_final:g}), beta1 "
            f"{cfg.beta1:g}; {elapsed:.0f} s",
            f"- sampling weights: {'closest to the released means' if cfg.select_best else 'last'} (step "
            f"{best_step}, distance to the released means {best_d:.5f})",
        ]
        return "\n".join(lines)

    # -- sampling and state -------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        """n images from the selected generator (labels drawn from the noisy class proportions if None)."""
        if self.sample_generator is None:
            raise InputError("dp-mepf: fit or load the synthesizer before sampling")
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        g = torch.Generator().manual_seed(int(seed or 0))
        if labels is None:
            p = torch.tensor(self.class_proportions or [1.0 / self.num_classes] * self.num_classes)
            labels = torch.multinomial(p, n, replacement=True, generator=g).numpy().astype(np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,) or (labels.size and (labels.min() < 0 or labels.max() >= self.num_classes)):
            raise InputError(f"labels must have shape ({n},) with values in [0, {self.num_classes})")
        gen = self.sample_generator
        gen.eval()
        out = []
        with torch.no_grad():
            for i in range(0, n, 1000):
                y = self._rows(torch.from_numpy(labels[i : i + 1000]), g).to(self.device)
                z = torch.randn(len(y), self.config.z_dim, generator=g).to(self.device)
                out.append(to_uint8(gen(z, y)))
        return ImageData(np.concatenate(out), labels, list(self.classes), "dp-mepf samples")

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "class_proportions": list(self.class_proportions),
                "cell_bits": self.cell_bits, "cell_proportions": [list(p) for p in self.cell_proportions],
                "report_section": getattr(self, "_report", "")}

    def restore_meta(self, state: dict[str, Any]) -> None:
        super().restore_meta(state)
        self.class_proportions = [float(v) for v in state.get("class_proportions", [])]
        self.cell_proportions = [[float(v) for v in p] for p in state.get("cell_proportions", [])]
        self.cell_bits = int(state.get("cell_bits", 0))
        self._report = str(state.get("report_section", ""))  # `dpimages report` rebuilds report.md from it
        self._sample_prefix = state.get("sample_weights", "best")

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.sample_generator is None:
            raise InputError("dp-mepf: nothing to save before fit")
        return prefixed("best", self.sample_generator.state_dict())

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = getattr(self, "_sample_prefix", "best")
        gen = self._new_generator()
        weights = unprefixed(prefix, tensors)
        if not weights:
            raise InputError(f"dp-mepf checkpoint has no '{prefix}.*' generator weights")
        gen.load_state_dict(weights)
        self.sample_generator = gen.to(self.device)
