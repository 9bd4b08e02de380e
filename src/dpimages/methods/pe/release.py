"""PE's release: the private images' votes, their noisy histograms, then threshold and resampling.

`PrivateVotes` is PE's only access to private data: it embeds the private
images once (in memory only) and releases one noisy vote histogram per
iteration.

Privacy contract (neighbouring relation: add or remove one image together
with its label):

* Each private image casts exactly one vote: for the synthetic sample of
  its own class whose embedding (with lookahead, the mean embedding of k
  variations of it) is nearest to the private image's embedding
  (`vote_bins`). The votes of all classes form one histogram over the whole
  population (the per-class histograms concatenated): adding or removing
  one image (with its label) changes one bin by 1, so the histogram has L2
  sensitivity 1 and the classes, being disjoint, need no budget split.
* One iteration's histogram is released once by
  `dpimages.privacy.mechanisms.noisy_histogram` (the ledger records the
  Gaussian event before the noise is drawn): T iterations are T Gaussian
  events with the same noise multiplier, calibrated up front for the target
  (epsilon, delta) by `calibrate_votes` (PLD accountant). The embeddings
  come from a fixed feature network never trained on private data.
* Thresholding at H, resampling proportionally to the noisy counts and
  every statistic logged (`histogram_stats`) are post-processing of the
  noisy histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.mechanisms import noisy_histogram
from dpimages.privacy.noise import NoiseSource

LABEL = "pe vote histogram"


# -- accounting ----------------------------------------------------------------------------
def vote_events(noise_multiplier: float, iterations: int) -> list[PrivacyEvent]:
    """The whole planned schedule: `iterations` Gaussian releases with sensitivity 1."""
    return [PrivacyEvent.gaussian(noise_multiplier, iterations, LABEL)]


def calibrate_votes(epsilon: float, delta: float, iterations: int, before: Sequence[PrivacyEvent] = ()) -> float:
    """Smallest noise multiplier whose T vote releases meet (epsilon, delta); no data involved.

    `before`: fixed events of an earlier stage of the same run (a DP prior), composed with the votes.
    """
    fixed = list(before)
    return calibrate(lambda s: [*fixed, *vote_events(s, iterations)], epsilon, delta)


# -- nearest neighbours --------------------------------------------------------------------
def _nearest_torch(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmin_j ||q_i - k_j||^2 = argmin_j (||k_j||^2 - 2 q_i . k_j), `chunk` queries at a time.

    One GEMM per chunk into a reused buffer (no per-chunk allocation), the
    factor -2 folded into the keys once, then an argmin over the buffer.
    """
    keys_t = (-2.0 * keys).t().contiguous()
    k_sq = (keys * keys).sum(dim=1)
    n = queries.shape[0]
    out = torch.empty(n, dtype=torch.long, device=queries.device)
    buf = torch.empty((min(chunk, n), keys.shape[0]), dtype=keys.dtype, device=keys.device)
    for i in range(0, n, chunk):
        q = queries[i : i + chunk]
        d = buf[: q.shape[0]]
        torch.addmm(k_sq, q, keys_t, out=d)
        torch.argmin(d, dim=1, out=out[i : i + q.shape[0]])
    return out


def _nearest_faiss(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    try:
        import faiss
    except ImportError:
        raise InputError("nn_backend=faiss needs faiss-cpu (pip install 'dpimages[faiss]')") from None
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.detach().float().cpu().contiguous().numpy())
    _, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), 1)
    return torch.from_numpy(idx[:, 0]).long().to(queries.device)


def nearest(queries: torch.Tensor, keys: torch.Tensor, *, backend: str = "torch", chunk: int = 2048) -> torch.Tensor:
    """Index of the nearest key (squared L2) for each query: (N, D) x (M, D) -> (N,) int64."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1] or keys.shape[0] == 0:
        raise InputError(f"nearest: need (N, D) queries and (M >= 1, D) keys, got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if backend == "faiss":
        return _nearest_faiss(queries, keys)
    if backend != "torch":
        raise InputError(f"nn_backend must be torch or faiss, got {backend!r}")
    return _nearest_torch(queries.float(), keys.float(), int(chunk))


def vote_bins(
    private_emb: torch.Tensor,
    private_labels: torch.Tensor,
    synthetic_emb: torch.Tensor,
    synthetic_labels: torch.Tensor,
    num_classes: int,
    *,
    backend: str = "torch",
    chunk: int = 2048,
) -> torch.Tensor:
    """One bin per private image: the population index of its nearest synthetic sample of the same class.

    Internal (not a release): the result goes straight into `release_votes`.
    """
    n = private_emb.shape[0]
    if private_labels.shape != (n,) or synthetic_labels.shape != (synthetic_emb.shape[0],):
        raise InputError(f"vote_bins: embeddings {tuple(private_emb.shape)}, {tuple(synthetic_emb.shape)} need "
                         f"labels of matching length, got {tuple(private_labels.shape)}, "
                         f"{tuple(synthetic_labels.shape)}")
    bins = torch.full((n,), -1, dtype=torch.long)
    for c in range(num_classes):
        q = torch.nonzero(private_labels.cpu() == c).flatten()
        if q.numel() == 0:
            continue
        k = torch.nonzero(synthetic_labels.cpu() == c).flatten()
        if k.numel() == 0:
            raise InputError(f"vote_bins: the synthetic population has no sample of class {c}")
        nn = nearest(private_emb[q.to(private_emb.device)], synthetic_emb[k.to(synthetic_emb.device)],
                     backend=backend, chunk=chunk)
        bins[q] = k[nn.cpu()]
    if n and int(bins.min()) < 0:
        raise InputError(f"vote_bins: private labels must be in [0, {num_classes})")
    return bins


def release_votes(
    bins: torch.Tensor, num_bins: int, *, noise_multiplier: float, ledger: PrivacyLedger, noise: NoiseSource
) -> torch.Tensor:
    """The noisy vote histogram (float64, (num_bins,)): one Gaussian event, sensitivity 1, in the ledger first."""
    return noisy_histogram(bins, num_bins, noise_multiplier=noise_multiplier, ledger=ledger, noise=noise, label=LABEL)


class PrivateVotes:
    """The private images' vote embeddings (the only read of private pixels) and the releases made from them.

    `embed` maps (N, C, H, W) images in [-1, 1] to unit-norm embeddings with a network never trained on
    private data. Nothing derived from the private data leaves this object except the noisy histograms.
    """

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], private: ImageData, num_classes: int, *,
                 backend: str = "torch", chunk: int = 2048) -> None:
        self._embeddings = embed(private.to_tensor())
        self._labels = private.label_tensor()
        self.num_classes, self.backend, self.chunk = num_classes, backend, chunk

    def release(self, synthetic_emb: torch.Tensor, synthetic_labels: torch.Tensor, *, noise_multiplier: float,
                ledger: PrivacyLedger, noise: NoiseSource) -> torch.Tensor:
        """One noisy vote histogram over the population (`release_votes`: one ledger event, then the noise)."""
        bins = vote_bins(self._embeddings, self._labels, synthetic_emb, synthetic_labels.to(synthetic_emb.device),
                         self.num_classes, backend=self.backend, chunk=self.chunk)
        return release_votes(bins, synthetic_emb.shape[0], noise_multiplier=noise_multiplier, ledger=ledger,
                             noise=noise)


# -- post-processing of the noisy histogram --------------------------------------------------
def threshold(noisy: torch.Tensor, h: float) -> torch.Tensor:
    """Bins with a noisy count below H (and all negative ones) set to 0."""
    return torch.where(noisy >= max(h, 0.0), noisy, torch.zeros_like(noisy)).clamp_min(0.0)


def resample(
    weights: torch.Tensor,
    synthetic_labels: torch.Tensor,
    num_classes: int,
    per_class: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """Draw `per_class` population indices per class, with replacement, in proportion to `weights`.

    A class whose thresholded weights are all zero keeps a uniform draw over
    its current samples (no information about it survived the noise).
    Returns the indices (grouped by class, class 0 first) and the number of
    such classes.
    """
    out, empty = [], 0
    w_all = weights.double().cpu()
    for c in range(num_classes):
        idx = torch.nonzero(synthetic_labels.cpu() == c).flatten()
        w = w_all[idx]
        if not float(w.sum()) > 0:
            w, empty = torch.ones_like(w), empty + 1
        draw = torch.multinomial(w, per_class, replacement=True, generator=generator)
        out.append(idx[draw])
    return torch.cat(out), empty


def histogram_stats(
    noisy: torch.Tensor, kept: torch.Tensor, synthetic_labels: torch.Tensor, num_classes: int, h: float,
    selected: torch.Tensor,
) -> dict[str, Any]:
    """Statistics of the noisy histogram (post-processing only, fit for metrics.jsonl)."""
    per_class_total = [round(float(noisy[synthetic_labels == c].sum()), 2) for c in range(num_classes)]
    per_class_kept = [int((kept[synthetic_labels == c] > 0).sum()) for c in range(num_classes)]
    return {
        "threshold": round(float(h), 4),
        "noisy_total": round(float(noisy.sum()), 2),
        "noisy_max": round(float(noisy.max()), 3),
        "noisy_min": round(float(noisy.min()), 3),
        "noisy_mean": round(float(noisy.mean()), 4),
        "bins": int(noisy.numel()),
        "bins_above_threshold": int((kept > 0).sum()),
        "per_class_noisy_total": per_class_total,
        "per_class_bins_above_threshold": per_class_kept,
        "distinct_selected": int(torch.unique(selected).numel()),
    }
