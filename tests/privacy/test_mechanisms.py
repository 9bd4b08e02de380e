"""Mechanisms: sensitivity on neighbouring data sets, noise statistics, ledger-before-noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from dpimages.errors import InputError
from dpimages.privacy import NoiseSource, PrivacyLedger
from dpimages.privacy.mechanisms import (
    clipped_gaussian_class_sums,
    clipped_gaussian_sum,
    gaussian_release,
    noisy_class_counts,
    noisy_histogram,
)


class ZeroNoise(NoiseSource):
    """Noise source that adds nothing: exposes a mechanism's noiseless output."""

    def standard_normal(self, shape):
        self.gaussian_draws += 1
        return torch.zeros(tuple(shape), dtype=torch.float64)


def ledger() -> PrivacyLedger:
    return PrivacyLedger(1e6, 1e-6)


def neighbours(n: int = 50, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10  # norms far above and below C
    labels = torch.randint(0, 4, (n,), generator=g)
    return rows, labels


@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0])
def test_clipped_sum_sensitivity_on_neighbouring_sets(clip):
    rows, _ = neighbours()
    full = clipped_gaussian_sum(
        rows, clip_norm=clip, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="s"
    )
    worst = 0.0
    for i in range(rows.shape[0]):
        without = torch.cat([rows[:i], rows[i + 1 :]])
        out = clipped_gaussian_sum(
            without, clip_norm=clip, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="s"
        )
        worst = max(worst, float((full - out).norm()))
    assert worst <= clip * (1 + 1e-5)
    assert worst > 0.9 * clip  # large rows really reach the bound: the test can see a missing clip


def test_a_non_finite_row_adds_zero_instead_of_making_the_sum_nan():
    rows, _ = neighbours(n=6, d=4)
    bad = rows.clone()
    bad[2, 1] = float("inf")
    bad[4, 0] = float("nan")
    out = clipped_gaussian_sum(bad, clip_norm=1.0, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="s")
    ref = clipped_gaussian_sum(rows[[0, 1, 3, 5]], clip_norm=1.0, noise_multiplier=1.0, ledger=ledger(),
                               noise=ZeroNoise(), label="s")
    torch.testing.assert_close(out, ref)


def test_class_sums_sensitivity_is_clip_norm_in_total():
    rows, labels = neighbours(d=5)
    kw = dict(clip_norm=1.0, noise_multiplier=1.0, noise=ZeroNoise(), label="m")
    full = clipped_gaussian_class_sums(rows, labels, 4, ledger=ledger(), **kw)
    assert full.shape == (4, 5)
    for i in range(rows.shape[0]):
        keep = torch.arange(rows.shape[0]) != i
        out = clipped_gaussian_class_sums(rows[keep], labels[keep], 4, ledger=ledger(), **kw)
        assert float((full - out).norm()) <= 1.0 + 1e-5


def test_histogram_sensitivity_one():
    bins = torch.tensor([0, 1, 1, 3, 3, 3])
    full = noisy_histogram(bins, 5, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="h")
    assert full.tolist() == [1, 2, 0, 3, 0]
    for i in range(len(bins)):
        keep = torch.arange(len(bins)) != i
        out = noisy_histogram(bins[keep], 5, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="h")
        assert float((full - out).norm()) == pytest.approx(1.0)
    with pytest.raises(InputError):
        noisy_histogram(torch.tensor([5]), 5, noise_multiplier=1.0, ledger=ledger(), noise=ZeroNoise(), label="h")


@pytest.mark.parametrize("secure", [False, True])
def test_noise_passes_ks_test(secure):
    sigma, clip = 1.7, 0.6
    noise = NoiseSource() if secure else NoiseSource.seeded(3)
    rows = torch.zeros(4, 20000)
    out = clipped_gaussian_sum(rows, clip_norm=clip, noise_multiplier=sigma, ledger=ledger(), noise=noise, label="k")
    # secure draws differ every run: p > 1e-6 fails a correct source once in a million runs
    assert stats.kstest(out.double().numpy(), "norm", args=(0, sigma * clip)).pvalue > 1e-6
    assert stats.kstest(out.double().numpy(), "norm", args=(0, 1.2 * sigma * clip)).pvalue < 1e-6  # it can fail


def test_seeded_noise_reproducible_and_secure_not():
    a = NoiseSource.seeded(7).standard_normal((100,))
    b = NoiseSource.seeded(7).standard_normal((100,))
    assert torch.equal(a, b)
    s1, s2 = NoiseSource().standard_normal((100,)), NoiseSource().standard_normal((100,))
    assert not torch.equal(s1, s2)
    assert NoiseSource().kind == "os-csprng" and NoiseSource.seeded(7).kind == "seeded-insecure"


def test_default_noise_source_is_secure_and_ignores_the_torch_seed():
    """The default draws from os.urandom: seeding torch (what --seed does) cannot reproduce it."""
    assert NoiseSource().secure and NoiseSource().state() == {"secure": True, "gaussian_draws": 0}
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        src = NoiseSource()
        draws.append((src.standard_normal((50,)), src.bernoulli(1000, 0.5)))
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])


def test_noise_state_roundtrip():
    src = NoiseSource(11)
    src.standard_normal((10,))
    state = json.loads(json.dumps(src.state()))
    expected = src.standard_normal((10,))
    other = NoiseSource(0)
    other.load_state(state)
    assert torch.equal(other.standard_normal((10,)), expected)


def test_event_recorded_before_noise_is_drawn(tmp_path):
    path = tmp_path / "privacy.json"
    seen = {}

    class Spy(NoiseSource):
        def standard_normal(self, shape):
            seen["events"] = json.loads(path.read_text())["events"]
            return super().standard_normal(shape)

    led = PrivacyLedger(10.0, 1e-5, path=path)
    noisy_class_counts(torch.tensor([0, 1, 2]), 3, noise_multiplier=5.0, ledger=led, noise=Spy(0))
    assert seen["events"] == [{"kind": "gaussian", "noise_multiplier": 5.0, "steps": 1, "label": "class counts"}]


def test_draws_equal_ledger_steps():
    led, noise = ledger(), NoiseSource(0)
    for _ in range(7):
        gaussian_release(torch.zeros(3), sensitivity=2.0, noise_multiplier=3.0, ledger=led, noise=noise, label="g")
    assert noise.gaussian_draws == sum(e.steps for e in led.events) == 7


def test_refused_release_draws_no_noise():
    led, noise = PrivacyLedger(0.5, 1e-5), NoiseSource(0)
    from dpimages.errors import BudgetExceeded

    with pytest.raises(BudgetExceeded):
        gaussian_release(torch.zeros(3), sensitivity=1.0, noise_multiplier=0.1, ledger=led, noise=noise, label="g")
    assert noise.gaussian_draws == 0 and led.events == []


def test_bernoulli_inclusion_frequency_within_binomial_interval():
    q, n = 0.03, 200_000
    hits = int(NoiseSource(5).bernoulli(n, q).sum())
    lo, hi = stats.binom.ppf([5e-8, 1 - 5e-8], n, q)  # a correct secure source fails once in 10 million runs
    assert lo <= hits <= hi
    secure_hits = int(NoiseSource().bernoulli(n, q).sum())
    assert lo <= secure_hits <= hi
    assert np.abs(hits / n - 0.05) > 0.01  # a wrong rate would be caught


def test_resume_never_replays_noise_when_the_ledger_is_ahead_of_the_checkpoint() -> None:
    from dpimages.api import FitContext, resume_noise
    from dpimages.privacy import PrivacyEvent

    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.spend(PrivacyEvent.gaussian(5.0, 3, "test"))
    src = NoiseSource(4)
    saved = FitContext(ledger, src).noise_state()  # the checkpoint: 3 steps spent
    assert saved["ledger_steps"] == 3
    after_save = src.standard_normal((8,))  # what the crashed process drew after its save

    clean = NoiseSource(4)
    assert resume_noise(clean, saved, ledger, seed=4) is False  # ledger == checkpoint: an exact continuation
    assert torch.equal(clean.standard_normal((8,)), after_save)

    ledger.spend(PrivacyEvent.gaussian(5.0, 1, "test"))  # released after the save, then the process died
    ahead, twin = NoiseSource(4), NoiseSource(4)
    assert resume_noise(ahead, saved, ledger, seed=4) is True and resume_noise(twin, saved, ledger, seed=4)
    fresh = ahead.standard_normal((8,))
    assert not torch.equal(fresh, after_save)  # no reuse of the released noise
    assert torch.equal(fresh, twin.standard_normal((8,)))  # but reproducible from (seed, ledger steps)

    secure = NoiseSource()
    assert resume_noise(secure, saved, ledger, seed=4) is False and secure.secure


def test_secure_gaussian_reaches_far_past_the_53_bit_box_muller_cutoff(monkeypatch):
    """Finding 4 of issue 34: Box-Muller over 53-bit uniforms stops at |z| = 8.65; ours reaches 37.6.

    With the OS generator's bits all zero (the rarest, smallest uniforms), the old sampler gave its largest
    radius, 8.65; the full-exponent uniform goes down to 2^-1022.
    """
    from dpimages.privacy import noise

    monkeypatch.setattr(noise.os, "urandom", lambda n: bytes(n))
    z = NoiseSource().standard_normal((4,))
    assert float(z.abs().max()) > 30.0
    assert float(z.abs().max()) <= noise.SUPPORT_SIGMAS


def test_secure_uniform_binades_have_their_probabilities():
    """P(u < 2^-k) = 2^-k for the full-exponent uniform (within 5.3 binomial sd: one failure in 10 million)."""
    from dpimages.privacy.noise import secure_uniform

    u = secure_uniform(1_000_000)
    assert ((u > 0) & (u < 1)).all()
    for k in (1, 3, 10):
        n, p = u.size, 2.0**-k
        assert abs(int((u < p).sum()) - n * p) <= 5.3 * np.sqrt(n * p * (1 - p))


def test_noise_multipliers_below_the_samplers_support_are_refused():
    """A noise multiplier under 1 / (37.6 - 12) would leave an unaccounted tail: events and calibration refuse."""
    from dpimages.privacy import PrivacyEvent, calibrate_gaussian
    from dpimages.privacy.ledger import MIN_NOISE_MULTIPLIER

    with pytest.raises(InputError, match="secure Gaussian"):
        PrivacyEvent.gaussian(0.5 * MIN_NOISE_MULTIPLIER)
    PrivacyEvent.gaussian(MIN_NOISE_MULTIPLIER)
    with pytest.raises(InputError, match="secure Gaussian sampler"):
        calibrate_gaussian(5000.0, 1e-5)  # one release at epsilon 5000 would need far less noise
    assert calibrate_gaussian(10.0, 1e-5) > MIN_NOISE_MULTIPLIER


def test_a_release_s_noise_std_is_its_event_s_multiplier_times_the_declared_sensitivity():
    """The one release call computes the std itself: a seeded twin's draw times nm x sensitivity."""
    from dpimages.privacy import PrivacyEvent

    led, noise = ledger(), NoiseSource(3)
    out = noise.release(torch.zeros(5, dtype=torch.float64), sensitivity=2.5, event=PrivacyEvent.gaussian(1.5, 1, "r"),
                        ledger=led)
    torch.testing.assert_close(out, NoiseSource(3).standard_normal((5,)) * 3.75)
    assert led.events == [PrivacyEvent.gaussian(1.5, 1, "r")] and noise.gaussian_draws == 1
    with pytest.raises(InputError, match="one step"):
        noise.release(torch.zeros(2), sensitivity=1.0, event=PrivacyEvent.gaussian(1.5, 2, "r"), ledger=led)
