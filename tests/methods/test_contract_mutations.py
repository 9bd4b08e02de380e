"""The contract can fail: a small sixth method, written from docs/adding-a-method.md, passes `check_method`, and
each deliberately broken variant of it fails the check that should catch it.

`NoisyMeans` releases noisy class counts and the per-class sums of clipped images over one Poisson sample, and
samples class means plus seeded jitter. The broken variants are the review's four that the old contract test let
through (noise without a recorded release, clipped to 10 with noise for 1, no clipping, exact class counts) and
four more (a throw-away ledger, per-example randomness keyed by position with the public seed, an exact
statistic in the metrics, a Poisson rate other than the recorded one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from dpimages.api import FitContext
from dpimages.config import Constraint, MethodConfig, in_range, positive
from dpimages.data import ImageData
from dpimages.methods.base import TrainedSynthesizer
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.dpsgd import PoissonSampler
from dpimages.privacy.mechanisms import clip_rows, clipped_gaussian_class_sums, noisy_class_counts
from dpimages.testing import ContractError, check_method

COUNTS, SUMS = "noisy-means class counts", "noisy-means class sums"


@dataclass
class NoisyMeansConfig(MethodConfig):
    clip_norm: float = 5.0  # below most images' norms (a 28x28 image in [-1, 1] has norm <= 28): clipping acts
    sample_rate: float = 0.5  # Poisson rate of the sums' release
    count_noise_ratio: float = 3.0  # the counts' noise multiplier is this times the sums'
    jitter: float = 0.05  # std of the seeded noise added to a class mean when sampling (post-processing)

    presets: ClassVar[dict[str, dict[str, Any]]] = {"smoke": {}, "cpu": {}, "gpu": {}, "gpu-short": {}}
    constraints: ClassVar[dict[str, Constraint]] = {
        "clip_norm": positive(), "sample_rate": in_range(0.0, 1.0, "right"), "count_noise_ratio": positive(),
        "jitter": in_range(0.0, 1.0, "both")}
    sampling_keys: ClassVar[tuple[str, ...]] = ("jitter",)


class NoisyMeans(TrainedSynthesizer[NoisyMeansConfig]):
    """Class means from two releases: noisy class counts (sensitivity 1) and noisy per-class sums of images
    clipped to C over one Poisson sample (sensitivity C, subsampled). Everything after them is post-processing."""

    name = "noisy-means"
    Config = NoisyMeansConfig
    description = "noisy class means (a contract test method)"

    def __init__(self, config: NoisyMeansConfig) -> None:
        super().__init__(config)
        self.means: torch.Tensor | None = None

    def plan(self, n: int, ctx: FitContext) -> list[PrivacyEvent]:
        """Both releases, calibrated together to the target from public facts only (N = `n`, the config)."""
        cfg = self.config

        def events(s: float) -> list[PrivacyEvent]:
            return [PrivacyEvent.gaussian(cfg.count_noise_ratio * s, 1, COUNTS),
                    PrivacyEvent.subsampled_gaussian(s, cfg.sample_rate, 1, SUMS)]

        return events(calibrate(events, ctx.target_epsilon, ctx.ledger.delta))

    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        tensors, state = self.begin_fit(private, ctx)
        planned = self.plan(ctx.public_size(private), ctx)
        ctx.ledger.reserve(*planned)  # before any private read
        if state.get("finished"):
            self.load_state_dict(tensors)
            return
        counts, sums = self.release(private, ctx, planned)
        self.means = sums / (self.config.sample_rate * counts.clamp(min=1.0))[:, None]  # post-processing
        self.train_info = {"noise": [e.noise_multiplier for e in planned]}
        if ctx.run is not None:
            ctx.run.log(1, event="released", noisy_counts=[round(float(c), 2) for c in counts])
        self.save_checkpoint(ctx, self.state_dict(), step=1, finished=True)

    def release(self, private: ImageData, ctx: FitContext,
                planned: list[PrivacyEvent]) -> tuple[torch.Tensor, torch.Tensor]:
        """The only private reads: (noisy counts (K,), noisy per-class sums of clipped rows (K, D))."""
        x, y = private.to_tensor().reshape(len(private), -1).double(), private.label_tensor()
        counts = noisy_class_counts(y, self.num_classes, noise_multiplier=planned[0].noise_multiplier,
                                    ledger=ctx.ledger, noise=ctx.noise, label=COUNTS)
        sampler = PoissonSampler(len(private), self.config.sample_rate, ctx.noise,
                                 dataset_size=ctx.public_size(private))
        idx = sampler.sample()
        sums = clipped_gaussian_class_sums(x[idx], y[idx], self.num_classes, clip_norm=self.config.clip_norm,
                                           noise_multiplier=planned[1].noise_multiplier, ledger=ctx.ledger,
                                           noise=ctx.noise, label=SUMS, sample_rate=sampler.sample_rate)
        return counts, sums

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        assert self.means is not None
        h, w, c = self.image_shape

        def generate(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            m = self.means[y].reshape(-1, h, w, c).permute(0, 3, 1, 2).float()
            return (m + self.config.jitter * torch.randn(m.shape, generator=g)).clamp(-1, 1)

        return self.sample_in_batches(n, labels, seed, 256, generate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.means is not None
        return {"means": self.means}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.means = tensors["means"].double()

    def report_section(self) -> str:
        return "Noisy class means: class counts and per-class sums of clipped images, released once each."


# -- the broken variants ---------------------------------------------------------------------------------------
class UnrecordedNoise(NoisyMeans):
    """Adds noise it draws itself to the counts, with no ledger event (epsilon under-reported)."""

    def release(self, private, ctx, planned):
        counts, sums = super().release(private, ctx, planned)
        return counts + ctx.noise.standard_normal(tuple(counts.shape)), sums


class ThrowAwayLedger(NoisyMeans):
    """Releases the sums through a ledger of its own: the run's privacy.json never sees them."""

    def release(self, private, ctx, planned):
        counts, _ = super().release(private, ctx, planned)
        x, y = private.to_tensor().reshape(len(private), -1).double(), private.label_tensor()
        sums = clipped_gaussian_class_sums(x, y, self.num_classes, clip_norm=self.config.clip_norm,
                                           noise_multiplier=planned[1].noise_multiplier,
                                           ledger=PrivacyLedger(1e9, 1e-5), noise=ctx.noise, label=SUMS)
        return counts, sums


class ClipTen(NoisyMeans):
    """Clips rows to 10 C and declares sensitivity C."""

    def release(self, private, ctx, planned):
        with pytest.MonkeyPatch.context() as mp:
            from dpimages.privacy import mechanisms

            mp.setattr(mechanisms, "clip_rows", lambda x, c: clip_rows(x, 10 * c))
            return super().release(private, ctx, planned)


class NoClipping(NoisyMeans):
    """Sums the rows as they are."""

    def release(self, private, ctx, planned):
        with pytest.MonkeyPatch.context() as mp:
            from dpimages.privacy import mechanisms

            mp.setattr(mechanisms, "clip_rows", lambda x, c: x)
            return super().release(private, ctx, planned)


class ExactCounts(NoisyMeans):
    """Divides by the exact class counts (an unreleased statistic reaches the model)."""

    def fit(self, private, public, ctx):
        super().fit(private, public, ctx)
        exact = torch.bincount(private.label_tensor(), minlength=self.num_classes).double()
        self.means = self.means * exact[:, None] / exact.mean()


class PositionKeyed(NoisyMeans):
    """Drops every image whose dataset index the public seed stream marks (per-example randomness by position)."""

    def release(self, private, ctx, planned):
        keep = torch.rand(len(private), generator=ctx.generator("drop")) < 0.8
        kept = ImageData(private.images[keep.numpy()], private.labels[keep.numpy()], private.classes, private.name)
        return super().release(kept, ctx, planned)


class LogsExactMean(NoisyMeans):
    """Logs the private images' exact mean pixel value in metrics.jsonl."""

    def fit(self, private, public, ctx):
        super().fit(private, public, ctx)
        if ctx.run is not None:
            ctx.run.log(2, mean_pixel=float(private.images.mean()))


class OtherRate(NoisyMeans):
    """Samples at twice the rate the sums' event records."""

    def release(self, private, ctx, planned):
        x, y = private.to_tensor().reshape(len(private), -1).double(), private.label_tensor()
        counts = noisy_class_counts(y, self.num_classes, noise_multiplier=planned[0].noise_multiplier,
                                    ledger=ctx.ledger, noise=ctx.noise, label=COUNTS)
        idx = torch.nonzero(ctx.noise.bernoulli(len(private), min(1.0, 2 * self.config.sample_rate))).flatten()
        sums = clipped_gaussian_class_sums(x[idx], y[idx], self.num_classes, clip_norm=self.config.clip_norm,
                                           noise_multiplier=planned[1].noise_multiplier, ledger=ctx.ledger,
                                           noise=ctx.noise, label=SUMS, sample_rate=self.config.sample_rate)
        return counts, sums


def test_the_small_method_keeps_the_contract(tmp_path):
    check_method(NoisyMeans, workdir=tmp_path)


@pytest.mark.parametrize(("broken", "caught_by"), [
    (UnrecordedNoise, "accounting"),  # issue 34: noise without a recorded release
    (ThrowAwayLedger, "accounting"),
    (ClipTen, "neighbours"),  # issue 34: clipped to 10, noise for 1
    (NoClipping, "neighbours"),  # issue 34: no clipping
    (ExactCounts, "other data"),  # issue 34: exact class counts (the other set now differs in labels and counts)
    (PositionKeyed, "neighbours"),
    (LogsExactMean, "other data"),
    (OtherRate, "accounting"),
])
def test_each_broken_variant_fails_its_check(broken, caught_by, tmp_path):
    broken.name = f"noisy-means-{broken.__name__.lower()}"
    with pytest.raises(ContractError, match=f"{caught_by}"):
        check_method(broken, workdir=tmp_path)



# -- the review's critical finding, as a mutation of today's methods ------------------------------------------
def test_the_contract_catches_dpdm_draws_keyed_by_position(monkeypatch, tmp_path):
    """dpdm's training draws keyed by (a public key, the dataset index), as before issue 34: caught by the
    neighbour at position 0, whose insertion gives every other image another index and other draws."""
    from dpimages.methods.dpdm.method import DPDM

    def by_position(self, idx, digests, key, model):
        for start in range(0, idx.numel(), self.config.physical_batch):
            part = idx[start : start + self.config.physical_batch]
            yield (part, *self._draws(part.cpu().numpy().astype(np.uint64), 12345, model))

    monkeypatch.setattr(DPDM, "_shard", by_position)
    with pytest.raises(ContractError, match="neighbours .*added at 0.*moved by"):
        check_method("dpdm", checks=("neighbours",), workdir=tmp_path)


def test_the_contract_catches_dpaf_groups_keyed_by_position(monkeypatch, tmp_path):
    """dpaf's aggregation groups drawn by dataset index from a public stream, as before issue 34."""
    from dpimages.methods.dpaf import release

    def by_index(digests, key, buckets):  # the group of the image at each sampled index, public key
        return torch.randint(buckets, (4096,), generator=torch.Generator().manual_seed(3)).numpy()[by_index.idx]

    real = release.aggregation_release

    def aggregation_release(x_all, y_all, sampler, *args, **kw):
        sample = sampler.sample
        sampler.sample = lambda: setattr(by_index, "idx", (idx := sample()).numpy()) or idx
        try:
            return real(x_all, y_all, sampler, *args, **kw)
        finally:
            del sampler.sample

    monkeypatch.setattr(release, "keyed_buckets", by_index)
    monkeypatch.setattr(release, "aggregation_release", aggregation_release)
    from dpimages.methods.dpaf import method

    monkeypatch.setattr(method, "aggregation_release", aggregation_release)
    with pytest.raises(ContractError, match="neighbours \\(groups, one image added at 0\\).*moved by"):
        check_method("dpaf", checks=("neighbours",), workdir=tmp_path)


def test_the_method_audit_measures_each_method_s_own_releases(tmp_path, capsys):
    """`dpimages audit` takes any method: the honest small method's worst move is its sensitivity, the unclipped
    one moves further and its implied epsilon exceeds the claim; a registered method through the command line."""
    from dpimages.audit.method_audit import audit_method
    from dpimages.cli import main

    honest = audit_method(NoisyMeans, epsilon=1.0, workdir=tmp_path / "honest")
    assert not honest.violation and honest.implied_epsilon == pytest.approx(honest.claimed_epsilon)
    assert 0.99 < honest.worst_ratio <= 1 + 1e-4  # the worst-case image reaches the clip: the audit can see it
    NoClipping.name = "noisy-means-noclipping"
    broken = audit_method(NoClipping, epsilon=1.0, workdir=tmp_path / "broken")
    assert broken.violation and broken.worst_ratio > 2 and broken.implied_epsilon > broken.claimed_epsilon
    assert main(["audit", "--method", "dpdfd", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["method"] == "dpdfd" and not result["violation"] and result["positions"] == [0, 100, 200]
