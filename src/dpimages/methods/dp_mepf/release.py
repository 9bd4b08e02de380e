"""DP-MEPF's one-shot release: noisy per-class sums of unit-norm features and noisy class counts.

Privacy contract (neighbouring relation: add or remove one image together
with its label):

* Each private image is embedded by a fixed public (or random) feature
  network into a first-moment vector and, optionally, a second-moment
  vector, each of unit L2 norm (`dpimages.nets.feature_extractors.FeatureExtractor`),
  and clipped to norm 1 again by the mechanism (`clip_rows`).
* Released: (1) the per-class sums of first-moment vectors, a (K, D1)
  matrix; (2) optionally the per-class sums of second-moment vectors,
  (K, D2); (3) the per-class image counts, (K,). Classes are disjoint, so
  adding or removing one image changes each stacked matrix by at most 1 in
  L2 norm and the counts by exactly 1: three Gaussian mechanisms with L2
  sensitivity 1 and noise multipliers ``s / sqrt(w_i)`` (``w_i`` the
  normalised budget weights), one ledger event each, calibrated together
  with `dpimages.privacy.calibrate` for the target (epsilon, delta).
* The per-class means (noisy sum / noisy count, projected onto the set the
  true mean lies in) and everything after them are post-processing.

Optional cells (``cell_bits = b > 0``, an extension of the published
method): each class is split into ``2**b`` cells, and the sums and counts
above are released per (class, cell) instead of per class. The cells come
from a first release: (0a) the per-class sums of first-moment vectors and
(0b) the class counts, whose noisy means are the class centres; an image's
cell is then the sign pattern of the projections of its first-moment vector
minus its class's noisy centre onto ``b`` directions: towards the class's
nearest other noisy centres (``neighbours``) or fixed random ones (a public
seed). Cells are
disjoint and depend on the image and on released values only, so each of
(1)-(3) still has L2 sensitivity 1; (0a) and (0b) are two more Gaussian
mechanisms of sensitivity 1 in the same calibrated plan. A generator
conditioned on (class, cell) then matches several means per class, one per
part of the class, instead of one: a finer statistic of the same budget.

The per-class sums are accumulated in chunks (so that high-dimensional
features of large data sets fit in memory) with the mechanisms' own
`clip_rows` and `class_sums`, and released with `gaussian_release` at
sensitivity 1: the same computation as `clipped_gaussian_class_sums`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dpimages.nets.feature_extractors import FeatureExtractor
from dpimages.privacy import PrivacyEvent, PrivacyLedger, calibrate
from dpimages.privacy.mechanisms import class_sums, clip_rows, gaussian_release, noisy_class_counts
from dpimages.privacy.noise import NoiseSource

LABEL_FIRST = "dp-mepf per-class sums of unit-norm first-moment features"
LABEL_SECOND = "dp-mepf per-class sums of unit-norm second-moment features"
LABEL_COUNTS = "dp-mepf class counts"
LABEL_CENTRES = "dp-mepf per-class sums of unit-norm first-moment features (cell centres)"
LABEL_CENTRE_COUNTS = "dp-mepf class counts (cell centres)"
CLIP_NORM = 1.0  # per-image feature vectors have unit norm; clipping to 1 enforces it


CELL_SUFFIX = " per (class, cell)"


@dataclass(frozen=True)
class ReleasePlan:
    """Noise multipliers of the planned releases (None: not released) and the cells per class."""

    noise_first: float
    noise_second: float | None
    noise_counts: float
    noise_centres: float | None = None
    cells: int = 1

    def events(self) -> list[PrivacyEvent]:
        """The planned events in the order they are spent (cell centres first when there are cells)."""
        out = []
        if self.noise_centres is not None:
            out += [PrivacyEvent.gaussian(self.noise_centres, 1, LABEL_CENTRES),
                    PrivacyEvent.gaussian(self.noise_counts, 1, LABEL_CENTRE_COUNTS)]
        suffix = CELL_SUFFIX if self.cells > 1 else ""
        out.append(PrivacyEvent.gaussian(self.noise_first, 1, LABEL_FIRST + suffix))
        if self.noise_second is not None:
            out.append(PrivacyEvent.gaussian(self.noise_second, 1, LABEL_SECOND + suffix))
        out.append(PrivacyEvent.gaussian(self.noise_counts, 1, LABEL_COUNTS + suffix))
        return out


Weights = tuple[float, float, float, float]


def weights(
    second_moment: bool, w_first: float, w_second: float, w_counts: float, cell_bits: int = 0, w_centres: float = 0.0
) -> Weights:
    """Normalised budget weights (first, second, counts, centres): shares of the total precision 1/s^2.

    Counts are released twice with cells (for the centres and per cell),
    each with weight ``w_counts``; second / centres are 0 when not released.
    """
    cells = cell_bits > 0
    ws = (w_first, w_second if second_moment else 0.0, w_counts, w_centres if cells else 0.0)
    total = ws[0] + ws[1] + ws[2] * (2 if cells else 1) + ws[3]
    return ws[0] / total, ws[1] / total, ws[2] / total, ws[3] / total


def plan_for(scale: float, w: Weights, cells: int = 1) -> ReleasePlan:
    """Noise multiplier s / sqrt(w_i) per release: their composition is one Gaussian with multiplier s."""
    return ReleasePlan(
        scale / math.sqrt(w[0]), None if w[1] == 0 else scale / math.sqrt(w[1]), scale / math.sqrt(w[2]),
        None if w[3] == 0 else scale / math.sqrt(w[3]), cells,
    )


def calibrate_plan(epsilon: float, delta: float, w: Weights, cells: int = 1,
                   before: Sequence[PrivacyEvent] = ()) -> tuple[float, ReleasePlan]:
    """The smallest common scale s whose planned events meet (epsilon, delta); runs before data is read.

    `before`: fixed events of an earlier stage of the same run (a DP labeller), composed with these.
    """
    if (cells > 1) != (w[3] > 0):
        raise ValueError("cells per class > 1 needs a centres weight > 0, and only then")
    fixed = list(before)
    scale = calibrate(lambda s: [*fixed, *plan_for(s, w, cells).events()], epsilon, delta)
    return scale, plan_for(scale, w, cells)


def _project(m: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """Projection onto the set a mean of unit vectors lies in: the unit ball (and the non-negative orthant)."""
    if nonneg:
        m = m.clamp_min(0.0)
    return m / m.norm(dim=1, keepdim=True).clamp_min(1.0)


@dataclass
class Released:
    """The released (noisy) quantities; everything else is derived from them.

    Rows are classes, or (class, cell) pairs in class-major order (row
    ``class * cells + cell``) when ``cells > 1``.
    """

    sum_first: torch.Tensor  # (K * cells, D1) float64
    sum_second: torch.Tensor | None  # (K * cells, D2) float64
    counts: torch.Tensor  # (K * cells,) float64
    cells: int = 1

    def means(self, project: bool, nonneg_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noisy per-row means (post-processing), float32.

        Counts are floored at 1. With `project`, each mean is projected onto
        the convex set the true mean of unit vectors lies in (the unit ball,
        intersected with the non-negative orthant where the features are
        non-negative), which can only bring it closer to the truth.
        """
        n = self.counts.clamp_min(1.0).unsqueeze(1)

        def proj(m: torch.Tensor, nonneg: bool) -> torch.Tensor:
            return _project(m, nonneg) if project else m

        first = proj(self.sum_first / n, nonneg_first).float()
        second = None if self.sum_second is None else proj(self.sum_second / n, True).float()
        return first, second

    def cell_proportions(self) -> torch.Tensor:
        """(K, cells) noisy proportions of each cell within its class (uniform where the counts are all <= 0)."""
        c = self.counts.clamp_min(0.0).view(-1, self.cells)
        total = c.sum(1, keepdim=True)
        return torch.where(total > 0, c / total.clamp_min(1e-12), torch.full_like(c, 1.0 / self.cells))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The released values for a checkpoint: ``release.sum_first``, ``.counts`` and ``.sum_second`` (if any)."""
        out = {"release.sum_first": self.sum_first, "release.counts": self.counts}
        if self.sum_second is not None:
            out["release.sum_second"] = self.sum_second
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_classes: int) -> Released:
        """The released values saved by `tensors` (a resumed run releases nothing again)."""
        second = tensors.get("release.sum_second")
        return cls(tensors["release.sum_first"].double(), None if second is None else second.double(),
                   tensors["release.counts"].double(), tensors["release.counts"].numel() // num_classes)


def auto_cell_bits(noise_first: float, dims_first: int, images_per_class: float, max_noise: float) -> int:
    """The most cell bits (0..6) whose per-cell mean has expected noise norm <= `max_noise`.

    With ``2**b`` cells of ``images_per_class / 2**b`` images each, the noise
    norm of a cell mean is about ``noise_first * sqrt(dims_first) * 2**b /
    images_per_class`` (unit-norm features: sensitivity 1).
    """
    bits = 0
    while bits < 6 and noise_first * math.sqrt(dims_first) * 2 ** (bits + 1) / images_per_class <= max_noise:
        bits += 1
    return bits


def cell_projections(dims: int, cell_bits: int, seed: int) -> torch.Tensor:
    """(dims, cell_bits) fixed Gaussian directions from a public seed (no data)."""
    return torch.randn(dims, cell_bits, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def neighbour_projections(centres: torch.Tensor, cell_bits: int, seed: int) -> torch.Tensor:
    """(K, dims, cell_bits) directions per class: towards its nearest other (noisy) class centres.

    Unit vectors from a class's centre to each of its ``cell_bits`` nearest
    other centres (post-processing of the released centres); random
    directions (`cell_projections`) fill in where there are fewer classes.
    """
    k, dims = centres.shape
    out = cell_projections(dims, cell_bits, seed).unsqueeze(0).repeat(k, 1, 1)
    dist = torch.cdist(centres.double(), centres.double()) + torch.diag(torch.full((k,), float("inf"))).to(centres)
    n = min(cell_bits, k - 1)
    nearest = dist.topk(n, dim=1, largest=False).indices  # (K, n)
    diff = centres.double()[nearest] - centres.double().unsqueeze(1)  # (K, n, dims)
    out[:, :, :n] = (diff / diff.norm(dim=2, keepdim=True).clamp_min(1e-12)).transpose(1, 2)
    return out


def cell_index(first: torch.Tensor, centres: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Cell of each row: the sign pattern of ``(first - centre) @ projection`` read as a binary number.

    `projections`: (dims, bits) shared by all rows, or (rows, dims, bits) per row.
    """
    diff = first.double() - centres.double()
    proj = torch.einsum("nd,ndb->nb", diff, projections) if projections.ndim == 3 else diff @ projections
    bits = proj > 0
    return (bits.long() * (2 ** torch.arange(projections.shape[-1], device=bits.device))).sum(1)


RowIndex = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunked_sums(
    extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor, rows: int, chunk: int,
    row_index: RowIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-row sums of clipped unit-norm features and each image's row (no noise: internal, released right after).

    The row of an image is its label, or ``row_index(first_moment, label)``.
    """
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    index = []
    with torch.no_grad():
        for i in range(0, images.shape[0], chunk):
            f, g = extractor(images[i : i + chunk])
            f = clip_rows(f.double(), CLIP_NORM)
            y = labels[i : i + chunk]
            r = y if row_index is None else row_index(f, y)
            index.append(r)
            part1 = class_sums(f, r, rows)
            s1 = part1 if s1 is None else s1 + part1
            if g is not None:
                part2 = class_sums(clip_rows(g.double(), CLIP_NORM), r, rows)
                s2 = part2 if s2 is None else s2 + part2
    assert s1 is not None
    return s1, s2, torch.cat(index)


def _chunked_class_sums(
    extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-class sums of clipped unit-norm features (no noise: internal, released right after)."""
    s1, s2, _ = _chunked_sums(extractor, images, labels, num_classes, chunk)
    return s1, s2


def release(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    plan: ReleasePlan,
    *,
    ledger: PrivacyLedger,
    noise: NoiseSource,
    chunk: int = 500,
    cell_seed: int = 0,
    nonneg_first: bool = True,
    cell_directions: str = "neighbours",
) -> Released:
    """The one and only access to private data: returns the noisy sums and counts.

    `ledger.reserve` checks the whole plan before anything is computed; each
    mechanism then records its event before its noise is drawn. With cells,
    the class centres are released first and define each image's cell.
    """
    events = plan.events()
    ledger.reserve(*events)
    labels_by_event = iter(e.label for e in events)
    row_index: RowIndex | None = None
    if plan.cells > 1:
        assert plan.noise_centres is not None
        c1, _ = _chunked_class_sums(extractor, images, labels, num_classes, chunk)
        noisy_c = gaussian_release(c1, sensitivity=CLIP_NORM, noise_multiplier=plan.noise_centres, ledger=ledger,
                                   noise=noise, label=next(labels_by_event))
        noisy_n = noisy_class_counts(labels, num_classes, noise_multiplier=plan.noise_counts, ledger=ledger,
                                     noise=noise, label=next(labels_by_event))
        centres = _project(noisy_c / noisy_n.clamp_min(1.0).unsqueeze(1), nonneg_first)
        bits = plan.cells.bit_length() - 1
        if cell_directions == "neighbours":
            per_class = neighbour_projections(centres, bits, cell_seed).to(images.device)
        else:
            shared = cell_projections(c1.shape[1], bits, cell_seed).to(images.device)
        cells = plan.cells

        def row_index(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            proj = per_class[y] if cell_directions == "neighbours" else shared
            return y * cells + cell_index(f, centres[y], proj)

    rows = num_classes * plan.cells
    s1, s2, index = _chunked_sums(extractor, images, labels, rows, chunk, row_index)
    if (s2 is None) != (plan.noise_second is None):
        raise RuntimeError("feature extractor and release plan disagree about the second moment")
    noisy1 = gaussian_release(s1, sensitivity=CLIP_NORM, noise_multiplier=plan.noise_first, ledger=ledger,
                              noise=noise, label=next(labels_by_event))
    noisy2 = None
    if s2 is not None and plan.noise_second is not None:
        noisy2 = gaussian_release(s2, sensitivity=CLIP_NORM, noise_multiplier=plan.noise_second, ledger=ledger,
                                  noise=noise, label=next(labels_by_event))
    counts = noisy_class_counts(index, rows, noise_multiplier=plan.noise_counts, ledger=ledger, noise=noise,
                                label=next(labels_by_event))
    return Released(noisy1, noisy2, counts, plan.cells)
