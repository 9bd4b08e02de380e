"""DPAF's post-processing: the generated side of the GAN, f2's and the generator's updates, f1's targets.

Nothing here reads private data. Its inputs are the released class counts (`counts`), the released
aggregates of the current phase (`buffer`), the public schedule and noise (`train_info`), the networks
(themselves DP outputs or post-processing of them) and the training generator, seeded apart from the privacy
noise. So everything computed here (per-class references, fake aggregates, f1 targets, f2, G and its EMA) is
post-processing of the releases in `dpimages.methods.dpaf.release`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dpimages.methods.dpaf.config import DPAFConfig
from dpimages.methods.dpaf.nets import Nets
from dpimages.methods.training import ema_update, warmup_decay
from dpimages.privacy.mechanisms import class_sums, clip_rows


class PostProcessing:
    """The post-processing half of `DPAF` (a mixin): generated batches and every update but f1's DP-SGD step."""

    config: DPAFConfig
    num_classes: int
    device: torch.device
    train_info: dict[str, Any]
    counts: torch.Tensor | None  # released (noisy) class counts, float64 (K,)
    buffer: list[torch.Tensor]  # this phase's released real aggregates (divided), (R, d) each
    center: torch.Tensor | None  # this cycle's per-class feature reference (K, d), from fakes

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

    def _row_labels(self) -> torch.Tensor:
        """The class of each aggregation row, (K*M,)."""
        return torch.arange(self.num_rows, device=self.device) // self.config.agg_groups

    # -- generated batches (no private data) --------------------------------------------------------
    def _latents(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=rng).to(self.device)

    def _fake_labels(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n labels drawn from the released class proportions."""
        return torch.multinomial(self._proportions().cpu(), n, replacement=True, generator=rng).to(self.device)

    def _class_batch(self, per_class: int) -> torch.Tensor:
        """Labels 0..K-1, each `per_class` times, in class order."""
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(per_class)

    def _features(self, nets: Nets, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f1 features of images x with labels y, minus this cycle's per-class reference (DPAF mode).

        A fixed function of earlier releases: applied to generated images here, and to private images only as
        the featurizer of `release.aggregation_release`.
        """
        f = nets.f1(x)
        return f - self.center[y] if self.center is not None else f

    @torch.no_grad()
    def _new_center(self, nets: Nets) -> torch.Tensor:
        """Per-class mean f1 feature of generated images (K, d): public, fixed for one cycle.

        Subtracting it before clipping removes the feature component that all images share, so the clipped
        vectors (and the noisy aggregates) spend their norm C_f on what differs between real and generated
        images. A function of G and f1 only (post-processing of earlier releases).
        """
        if not self.config.center:
            return torch.zeros(self.num_classes, nets.f1.dim, device=self.device)
        p = 4 * self.config.fake_per_class
        y = self._class_batch(p)
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

    def _generator_step(self, nets: Nets, g_loss: torch.Tensor) -> None:
        """One Adam step of G on `g_loss` (gradients of G's parameters only), then the EMA update (warm-up decay)."""
        grads = torch.autograd.grad(g_loss, list(nets.gen.parameters()))
        for p, gr in zip(nets.gen.parameters(), grads, strict=True):
            p.grad = gr
        nets.opt_g.step()
        nets.opt_g.zero_grad(set_to_none=True)
        step = int(self.train_info.get("g_updates", 0))
        ema_update(nets.ema, nets.gen, warmup_decay(self.config.ema, step))
        self.train_info["g_updates"] = step + 1

    def _f2_updates(self, nets: Nets, real: torch.Tensor, fake_f: torch.Tensor,
                    k_rows: torch.Tensor) -> dict[str, float]:
        """`f2_steps` updates of f2 on this release plus `f2_replay` earlier ones of this phase (same f1: comparable
        aggregates) against fake aggregates from the features `fake_f` (post-processing)."""
        cfg = self.config
        assert nets.opt_f2 is not None
        for _ in range(cfg.f2_steps):
            pick = torch.randint(len(self.buffer), (cfg.f2_replay,), generator=nets.rng).tolist()
            reals = torch.cat([real, *(self.buffer[i] for i in pick)])
            fakes = torch.cat([self._fake_aggregates(fake_f, nets.rng) for _ in range(1 + len(pick))])
            rows_k = k_rows.repeat(1 + len(pick))
            d_real = F.softplus(-nets.f2(reals, rows_k)).mean()
            d_fake = F.softplus(nets.f2(fakes, rows_k)).mean()
            nets.opt_f2.zero_grad(set_to_none=True)
            (d_real + d_fake).backward()
            nets.opt_f2.step()
        return {"f2_loss_real": round(d_real.item(), 5), "f2_loss_fake": round(d_fake.item(), 5)}

    def _targets(self, nets: Nets) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class target vectors (K, d) of the f1 step for real and fake examples (post-processing).

        t_k = (N / N_k) * sum over groups of dL_D/dA_(k,g): the gradient of f2's loss with respect to a row
        aggregate, turned into the gradient with respect to one example's feature and reweighted so that the
        engine's average over a Poisson batch estimates the full gradient. Real: averaged over this phase's
        released aggregates; fake: fresh fake aggregates. Both are scaled by one common factor (their RMS
        norm) so that per-example gradient norms do not drift with the loss scale.
        """
        k_rows = self._row_labels()
        m = self.config.agg_groups
        weight = (self.train_info["dataset_size"] / self._nhat())[:, None]
        if self.buffer:
            real = torch.stack(self.buffer).requires_grad_(True)
            s = real.shape[0]
            loss = F.softplus(-nets.f2(real.flatten(0, 1), k_rows.repeat(s))).mean()
            (g_real,) = torch.autograd.grad(loss * s, real)  # per release: d(mean over its rows) / dA
            g_real = g_real.mean(0)
        else:  # a crash lost this phase's aggregates: only the fake side trains f1 in this phase
            g_real = torch.zeros(self.num_rows, nets.f1.dim, device=self.device)
        y_fake = self._class_batch(self.config.fake_per_class)
        with torch.no_grad():
            fake_f = self._features(nets, nets.gen(self._latents(y_fake.numel(), nets.rng), y_fake), y_fake)
        fake = self._fake_aggregates(fake_f, nets.rng).requires_grad_(True)
        (g_fake,) = torch.autograd.grad(F.softplus(nets.f2(fake, k_rows)).mean(), fake)
        t_real = g_real.view(self.num_classes, m, -1).sum(1) * weight
        t_fake = g_fake.view(self.num_classes, m, -1).sum(1) * weight
        rms = torch.sqrt((t_real.pow(2).sum() + t_fake.pow(2).sum()) / (2 * self.num_classes)).clamp_min(1e-12)
        return (t_real / rms).detach(), (t_fake / rms).detach()
