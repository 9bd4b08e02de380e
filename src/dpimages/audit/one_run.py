"""One-run privacy audit with canaries, through dpimages' real mechanisms.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(2023): m canaries are each included independently with probability 1/2,
the mechanism runs once on base data plus the included canaries, every
canary gets a score, the auditor guesses "included" for the k highest
scores and "excluded" for the k lowest, and the number of correct guesses
becomes a 95%-confidence lower bound on epsilon (`dpimages.audit.bounds`).

Targets (each runs the library's own code path; the claimed epsilon is the
ledger's PLD epsilon of the events the run recorded, with the noise
multiplier from `dpimages.privacy.calibrate`):

* ``gaussian-sum`` (dp-mepf): `clipped_gaussian_class_sums`; canaries are
  random directions of norm 100 (clipped to C = 1), one class each; score =
  inner product of the released class sum with the canary's direction.
* ``histogram`` (pe): `noisy_histogram`; each canary votes for a dedicated
  bin; score = the noisy count of its bin(s).
* ``dpsgd`` (dpdm, dpaf, dpsgd-classifier): the `DPSGD` engine with Poisson
  sampling on a small linear model; each canary's per-example gradient is a
  "Dirac" gradient of norm 100 on its own coordinate of a canary weight
  (white box); score = the total movement of that coordinate over training.
* ``gaussian-release`` (dpdfd): the teacher ensemble's release (each
  teacher's vector scaled to norm C by `normalise_rows`, summed; then
  `gaussian_release` with declared sensitivity 2C, as dpdfd's release does); each canary owns one
  teacher whose raw vector (norm 100) points along the canary's direction when
  it is included and against it when not.

Deliberately broken variants (``--self-test``) are built here, at the
harness level, never by a switch in the library: ``broken-no-noise`` (a
`NoiseSource` subclass that draws zeros), ``broken-no-clipping`` (the
clipping step patched out, or a canary casting 100 votes),
``broken-sensitivity`` (the release has 10 times the sensitivity the noise
is calibrated for), and ``broken-public-seed`` (the run is the honest one,
with noise from ``NoiseSource.seeded(seed)``, but the attacker knows that
seed: it replays ``NoiseSource.seeded(seed)`` in the run's order of draws
and subtracts the replayed noise from the released values before scoring;
generic over targets, since every score is linear in the released values).
Each must come out as a violation (lower bound above the claim). A pass of
an honest variant is no proof of privacy: the audit only gives a lower
bound.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpimages.audit.bounds import CONFIDENCE, epsilon_lower_bound
from dpimages.errors import InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger, calibrate_dpsgd, calibrate_gaussian
from dpimages.privacy import mechanisms as mech
from dpimages.privacy.dpsgd import DPSGD, PoissonSampler
from dpimages.privacy.ledger import check_positive

CLIP = 1.0  # the declared clipping norm / sensitivity unit C
CANARY_NORM = 100.0  # canaries are far larger than C: clipping must bring them down
SENSITIVITY_FACTOR = 10.0  # broken-sensitivity: the release moves by 10 C, noise is for C
EXTRA_VOTES = 100  # broken-no-clipping for histograms: one canary casts this many votes

TARGETS = {
    "gaussian-sum": "clipped_gaussian_class_sums",
    "histogram": "noisy_histogram",
    "dpsgd": "DPSGD (Poisson sampling, per-example clipping)",
    "gaussian-release": "teacher-ensemble sum of rows scaled to C, gaussian_release (declared sensitivity 2C)",
}
METHOD_TARGETS = {
    "dp-mepf": "gaussian-sum",
    "pe": "histogram",
    "dpdm": "dpsgd",
    "dpaf": "dpsgd",
    "dpsgd-classifier": "dpsgd",
    "dpdfd": "gaussian-release",
}
# New variants go at the end: a variant's index seeds its run, so the others keep their results.
VARIANTS = ("honest", "broken-no-noise", "broken-no-clipping", "broken-sensitivity", "broken-public-seed")


@dataclass(frozen=True)
class AuditSize:
    """Sizes of one audit run (public choices, fixed before the run)."""

    canaries: int
    dim: int  # gaussian targets: dimension of a canary vector
    classes: int  # gaussian-sum: number of classes
    base: int  # non-canary examples (rows, votes, training examples)
    steps: int  # dpsgd: noisy steps
    sample_rate: float  # dpsgd: Poisson rate q

    @property
    def guesses_per_side(self) -> int:
        """k: guesses "included" for the top k and "excluded" for the bottom k scores."""
        return max(1, self.canaries // 10)


SIZES = {
    "smoke": AuditSize(canaries=200, dim=2000, classes=10, base=100, steps=30, sample_rate=0.2),
    "full": AuditSize(canaries=2000, dim=8000, classes=10, base=1000, steps=100, sample_rate=0.1),
}


@dataclass(frozen=True)
class AuditResult:
    """One audited (method, variant): the claim beside the empirical lower bound."""

    method: str
    variant: str
    claimed_epsilon: float
    epsilon_lower_bound: float
    violation: bool
    target: str
    mechanism: str
    delta: float
    canaries: int
    guesses: int
    correct: int
    max_lower_bound: float  # the bound if every guess were right: claims above it cannot be refuted at this size

    def to_json(self) -> dict:
        return asdict(self)


class ZeroNoise(NoiseSource):
    """Broken noise source: every Gaussian draw is zero (sampling stays random)."""

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        self.gaussian_draws += 1
        return torch.zeros(tuple(shape), dtype=torch.float64)


@dataclass(frozen=True)
class _Draw:
    """One call the run made on its noise source: which draw, of what shape (never the values drawn)."""

    kind: str  # "normal" (Gaussian noise, also a bare standard_normal) or "bernoulli" (Poisson sampling)
    shape: tuple[int, ...] = ()  # normal: shape of the noise
    std: float = 1.0  # normal: its standard deviation
    dtype: torch.dtype = torch.float64  # normal: the dtype it was rounded to
    n: int = 0  # bernoulli: number of decisions
    p: float = 0.0  # bernoulli: their probability


class _DrawOrder(NoiseSource):
    """The run's seeded noise source (draws exactly as ``NoiseSource.seeded(seed)``), keeping its order of draws.

    `draws` lists the calls and their shapes, never the values: what broken-public-seed's attacker needs
    beside the seed to replay the noise (`replay_noise`). The shapes follow from the code and public sizes;
    Poisson sampling's number of decisions is the data set size, which the attacker is taken to know.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.draws: list[_Draw] = []
        self._in_normal = False

    def release(self, value: torch.Tensor, *, sensitivity: float, event: PrivacyEvent, ledger: PrivacyLedger,
                draw: bool = True) -> torch.Tensor:
        if draw:
            self.draws.append(_Draw("normal", tuple(value.shape), event.noise_multiplier * sensitivity, value.dtype))
        self._in_normal = True
        try:
            return super().release(value, sensitivity=sensitivity, event=event, ledger=ledger, draw=draw)
        finally:
            self._in_normal = False

    def standard_normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if not self._in_normal:  # a bare draw: the same values as a release's noise of std 1 in float64
            self.draws.append(_Draw("normal", tuple(shape)))
        return super().standard_normal(shape)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        self.draws.append(_Draw("bernoulli", n=int(n), p=float(p)))
        return super().bernoulli(n, p)


def replay_noise(seed: int, draws: list[_Draw]) -> list[torch.Tensor]:
    """The Gaussian noise of a run, recomputed from its seed: ``NoiseSource.seeded(seed)`` drawn in the run's order.

    Bernoulli draws (Poisson sampling) are replayed too, to stay in step with the generator, but not returned.
    """
    replay = NoiseSource.seeded(seed)
    out = []
    for d in draws:
        if d.kind == "bernoulli":
            replay.bernoulli(d.n, d.p)
        else:
            out.append((replay.standard_normal(d.shape) * d.std).to(d.dtype))
    return out


def resolve_target(method: str) -> str:
    """The audit target (mechanism) that `method` releases through; InputError if unknown."""
    if method in TARGETS:
        return method
    if method in METHOD_TARGETS:
        return METHOD_TARGETS[method]
    known = ", ".join([*METHOD_TARGETS, *TARGETS, "all"])
    raise InputError(f"unknown method {method!r} for audit; choose one of {known}")


# -- guessing and scoring ---------------------------------------------------------------
def count_correct(scores: np.ndarray, included: np.ndarray, k: int, rng: np.random.Generator) -> tuple[int, int]:
    """(guesses, correct): "included" for the k top scores, "excluded" for the k bottom ones (ties at random)."""
    m = len(scores)
    if 2 * k > m:
        raise InputError(f"2k = {2 * k} guesses need at least as many canaries, got {m}")
    perm = rng.permutation(m)
    order = perm[np.argsort(scores[perm], kind="stable")]
    correct = int(included[order[-k:]].sum()) + int((~included[order[:k]]).sum())
    return 2 * k, correct


def _claim(ledger: PrivacyLedger) -> float:
    return ledger.epsilon()


@dataclass(frozen=True)
class _Run:
    """What one target's run gives the auditor."""

    scores: np.ndarray  # one score per canary, computed from the released values
    claimed_epsilon: float  # the ledger's PLD epsilon of the events the run recorded
    # The part of `scores` due to the given Gaussian draws (in the run's order): scores are linear in the released
    # values, so scores - noise_part(replayed noise) is the score of the released values minus that noise.
    noise_part: Callable[[list[torch.Tensor]], np.ndarray]


def _single(draws: list[torch.Tensor]) -> torch.Tensor:
    """The noise of a one-release run (RuntimeError, a harness bug, if the run drew other than once)."""
    if len(draws) != 1:
        raise RuntimeError(f"expected one Gaussian draw for a single release, got {len(draws)}")
    return draws[0]


# -- targets --------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched_clip(variant: str) -> Iterator[None]:
    """Within the block, the mechanisms' row clipping is broken as the variant says."""
    real = mech.clip_rows
    if variant == "broken-no-clipping":
        with mock.patch.object(mech, "clip_rows", lambda x, clip_norm: x):
            yield
    elif variant == "broken-sensitivity":
        with mock.patch.object(mech, "clip_rows", lambda x, clip_norm: real(x, SENSITIVITY_FACTOR * clip_norm)):
            yield
    else:
        yield


def _unit_rows(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def _run_gaussian_sum(size: AuditSize, included: np.ndarray, variant: str, noise: NoiseSource, epsilon: float,
                      delta: float, gen: torch.Generator) -> _Run:
    m = size.canaries
    directions = _unit_rows(m, size.dim, gen)
    canary_labels = torch.randint(size.classes, (m,), generator=gen)
    base = 5.0 * _unit_rows(size.base, size.dim, gen)
    base_labels = torch.randint(size.classes, (size.base,), generator=gen)
    inc = torch.from_numpy(included)
    rows = torch.cat([base, CANARY_NORM * directions[inc]])
    labels = torch.cat([base_labels, canary_labels[inc]])
    sigma = calibrate_gaussian(epsilon, delta)
    ledger = PrivacyLedger(epsilon, delta)
    with _patched_clip(variant):
        release = mech.clipped_gaussian_class_sums(rows, labels, size.classes, clip_norm=CLIP, noise_multiplier=sigma,
                                                   ledger=ledger, noise=noise, label="audit class sums")

    def score(released: torch.Tensor) -> np.ndarray:
        return (released[canary_labels] * directions).sum(dim=1).numpy()

    return _Run(score(release), _claim(ledger), lambda draws: score(_single(draws)))


def _run_gaussian_release(size: AuditSize, included: np.ndarray, variant: str, noise: NoiseSource, epsilon: float,
                          delta: float, gen: torch.Generator) -> _Run:
    """DPDFD's ensemble release: teacher vectors scaled to norm C (`normalise_rows`), summed, then
    `gaussian_release` with declared sensitivity 2C (what dpdfd's release makes).

    Every canary owns one teacher (its shard): the teacher's raw vector is
    ``+CANARY_NORM d_i`` when the canary is included and ``-CANARY_NORM d_i``
    when not (the worst case: scaled to C, the term moves by exactly 2C);
    ``size.base`` further teachers hold random vectors. Score = d_i . release.
    """
    m = size.canaries
    directions = _unit_rows(m, size.dim, gen)
    sign = torch.from_numpy(np.where(included, 1.0, -1.0))
    rows = CANARY_NORM * torch.cat([_unit_rows(size.base, size.dim, gen), sign[:, None] * directions])
    patch = (mock.patch.object(mech, "normalise_rows", lambda x, clip_norm: x) if variant == "broken-no-clipping"
             else contextlib.nullcontext())
    with patch:
        value = mech.normalise_rows(rows, CLIP).sum(0)
    if variant == "broken-sensitivity":  # canary teachers count 10 times in the sum
        value = value + (SENSITIVITY_FACTOR - 1) * CLIP * (sign[:, None] * directions).sum(0)
    ledger = PrivacyLedger(epsilon, delta)
    release = mech.gaussian_release(value, sensitivity=2.0 * CLIP, noise_multiplier=calibrate_gaussian(epsilon, delta),
                                    ledger=ledger, noise=noise, label="audit ensemble sum")

    def score(released: torch.Tensor) -> np.ndarray:
        return (directions @ released).numpy()

    return _Run(score(release), _claim(ledger), lambda draws: score(_single(draws)))


def _run_histogram(size: AuditSize, included: np.ndarray, variant: str, noise: NoiseSource, epsilon: float,
                   delta: float, gen: torch.Generator) -> _Run:
    m, base_bins = size.canaries, 50
    per_canary = EXTRA_VOTES if variant == "broken-sensitivity" else 1  # dedicated bins per canary
    votes_per_bin = EXTRA_VOTES if variant == "broken-no-clipping" else 1
    base_votes = torch.randint(base_bins, (size.base,), generator=gen)
    idx = torch.nonzero(torch.from_numpy(included)).flatten()
    canary_bins = base_bins + (idx[:, None] * per_canary + torch.arange(per_canary)).flatten()
    bins = torch.cat([base_votes, canary_bins.repeat_interleave(votes_per_bin)])
    num_bins = base_bins + m * per_canary
    sigma = calibrate_gaussian(epsilon, delta)
    ledger = PrivacyLedger(epsilon, delta)
    counts = mech.noisy_histogram(bins, num_bins, noise_multiplier=sigma, ledger=ledger, noise=noise,
                                  label="audit votes")

    def score(released: torch.Tensor) -> np.ndarray:
        return released[base_bins:].reshape(m, per_canary).sum(dim=1).numpy()

    return _Run(score(counts), _claim(ledger), lambda draws: score(_single(draws)))


class _CanaryNet(nn.Module):
    """A linear classifier plus one weight per canary (the white-box gradient canaries).

    Both parts are Linear layers, so the engine's default per-example path (book-keeping on a CPU) is the one
    audited.
    """

    def __init__(self, dim: int, classes: int, canaries: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes)
        self.canary = nn.Linear(canaries, 1, bias=False)  # canary i's coordinate: canary.weight[0, i]
        nn.init.zeros_(self.canary.weight)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.linear(x), self.canary(onehot)], dim=-1)


def _canary_loss(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 onehot: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for base examples; for canary i, -CANARY_NORM * bias_i (gradient: a Dirac of norm 100)."""
    out = model(x, onehot)
    is_canary = onehot.sum(dim=-1)
    ce = F.cross_entropy(out[:, :-1], y, reduction="none")
    return ce * (1.0 - is_canary) - CANARY_NORM * out[:, -1]


class _MisclippedDPSGD(DPSGD):
    """Broken engine: clips per-example gradients at `factor` times the norm its noise is calibrated for."""

    factor = 1.0

    def clip_and_accumulate(self, *batch: torch.Tensor) -> None:
        declared = self.clip_norm
        self.clip_norm = declared * self.factor
        try:
            super().clip_and_accumulate(*batch)
        finally:
            self.clip_norm = declared


def _run_dpsgd(size: AuditSize, included: np.ndarray, variant: str, noise: NoiseSource, epsilon: float,
               delta: float, gen: torch.Generator) -> _Run:
    m, dim, classes = size.canaries, 8, 4
    x_base = torch.randn(size.base, dim, generator=gen)
    y_base = torch.randint(classes, (size.base,), generator=gen)
    idx = torch.nonzero(torch.from_numpy(included)).flatten()
    x = torch.cat([x_base, torch.zeros(len(idx), dim)])
    y = torch.cat([y_base, torch.zeros(len(idx), dtype=torch.long)])
    onehot = torch.cat([torch.zeros(size.base, m), F.one_hot(idx, m).float()])
    model = _CanaryNet(dim, classes, m)
    with torch.no_grad():
        for p in model.linear.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    sigma = calibrate_dpsgd(epsilon, delta, size.sample_rate, size.steps)
    ledger = PrivacyLedger(epsilon, delta)
    sampler = PoissonSampler(len(x), size.sample_rate, noise)
    engine_cls: type[DPSGD] = DPSGD
    if variant in ("broken-no-clipping", "broken-sensitivity"):
        engine_cls = type("_Broken", (_MisclippedDPSGD,),
                          {"factor": math.inf if variant == "broken-no-clipping" else SENSITIVITY_FACTOR})
    engine = engine_cls(model, _canary_loss, sampler=sampler, noise_multiplier=sigma, clip_norm=CLIP, ledger=ledger,
                        noise=noise, label="audit dp-sgd")
    engine.plan(size.steps)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(engine.steps_remaining):
        batch = sampler.sample()
        engine.step(x[batch], y[batch], onehot[batch])
        opt.step()
    # Each step's noise is one flat vector over the trainable parameters in named_parameters order (the engine's
    # layout); plain SGD moves the canary weights, which starts at 0, by -lr / (q N) times its slice of it.
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    start = sum(numel for _, numel in trainable[:[name for name, _ in trainable].index("canary.weight")])
    scale = -lr / sampler.expected_batch_size

    def noise_part(draws: list[torch.Tensor]) -> np.ndarray:
        moved = torch.zeros(m, dtype=torch.float64)
        for z in draws:
            moved += z[start:start + m].double()
        return (scale * moved).numpy()

    return _Run(model.canary.weight[0].detach().double().numpy(), _claim(ledger), noise_part)


_RUNNERS = {
    "gaussian-sum": _run_gaussian_sum,
    "histogram": _run_histogram,
    "dpsgd": _run_dpsgd,
    "gaussian-release": _run_gaussian_release,
}


# -- the audit --------------------------------------------------------------------------------
def audit_once(method: str, variant: str = "honest", *, epsilon: float = 1.0, delta: float = 1e-5,
               size: str | AuditSize = "smoke", canaries: int | None = None, seed: int = 0) -> AuditResult:
    """Run one one-run audit of `method` (a method name or target) in `variant`; see the module docstring."""
    target = resolve_target(method)
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    check_positive("epsilon", epsilon)
    check_positive("delta", delta)
    if delta >= 1:
        raise InputError(f"delta must be < 1, got {delta}")
    spec = _size(size, canaries)
    rng = np.random.default_rng([seed, VARIANTS.index(variant), list(TARGETS).index(target)])
    included = rng.random(spec.canaries) < 0.5
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise_seed = int(rng.integers(2**62))
    if variant == "broken-no-noise":
        noise: NoiseSource = ZeroNoise(noise_seed)
    elif variant == "broken-public-seed":
        noise = _DrawOrder.seeded(noise_seed)  # draws as NoiseSource.seeded(noise_seed); keeps the order of draws
    else:
        noise = NoiseSource.seeded(noise_seed)
    run = _RUNNERS[target](spec, included, variant, noise, epsilon, delta, gen)
    scores, claimed = np.asarray(run.scores, dtype=np.float64), run.claimed_epsilon
    if isinstance(noise, _DrawOrder):  # the attacker knows noise_seed: subtract the replayed noise, then score
        scores = scores - np.asarray(run.noise_part(replay_noise(noise_seed, noise.draws)), dtype=np.float64)
    r, v = count_correct(scores, included, spec.guesses_per_side, rng)
    lower = epsilon_lower_bound(spec.canaries, r, v, delta, CONFIDENCE)
    return AuditResult(method=method, variant=variant, claimed_epsilon=claimed, epsilon_lower_bound=lower,
                       violation=lower > claimed, target=target, mechanism=TARGETS[target], delta=delta,
                       canaries=spec.canaries, guesses=r, correct=v,
                       max_lower_bound=epsilon_lower_bound(spec.canaries, r, r, delta, CONFIDENCE))


def _size(size: str | AuditSize, canaries: int | None) -> AuditSize:
    if isinstance(size, AuditSize):
        spec = size
    elif size in SIZES:
        spec = SIZES[size]
    else:
        raise InputError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if canaries is not None:
        if int(canaries) != canaries or canaries < 20:
            raise InputError(f"canaries must be an integer >= 20, got {canaries}")
        spec = AuditSize(**{**asdict(spec), "canaries": int(canaries)})
    return spec


def run_audit(methods: list[str], *, self_test: bool = False, epsilon: float = 1.0, delta: float = 1e-5,
              size: str = "smoke", canaries: int | None = None, seed: int = 0,
              progress: Callable[[AuditResult], None] | None = None) -> list[AuditResult]:
    """Audit each method (honest; with ``self_test`` also the broken variants); inputs are checked first."""
    check_positive("epsilon", epsilon)
    check_positive("delta", delta)
    if delta >= 1:
        raise InputError(f"delta must be < 1, got {delta}")
    for m in methods:
        resolve_target(m)
    _size(size, canaries)
    variants = VARIANTS if self_test else ("honest",)
    out = []
    for m in methods:
        for var in variants:
            res = audit_once(m, var, epsilon=epsilon, delta=delta, size=size, canaries=canaries, seed=seed)
            out.append(res)
            if progress is not None:
                progress(res)
    return out


def audit_passed(results: list[AuditResult]) -> bool:
    """True when no honest variant is flagged and every broken variant is."""
    return all(r.violation == r.variant.startswith("broken-") for r in results)
