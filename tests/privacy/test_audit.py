"""One-run audit: the epsilon lower bound, honest mechanisms pass, broken variants are flagged, CLI contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpimages.audit import METHOD_TARGETS, TARGETS, VARIANTS, audit_once, epsilon_lower_bound, p_value, run_audit
from dpimages.audit.one_run import _DrawOrder, count_correct, replay_noise, resolve_target
from dpimages.cli import main
from dpimages.errors import InputError
from dpimages.privacy import NoiseSource, PrivacyLedger, mechanisms


# -- the bound --------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [10, 40, 100, 400])
def test_all_correct_delta0_matches_closed_form(r: int) -> None:
    # delta = 0, v = r: P[Bin(r, q) >= r] = q^r = 0.05  =>  eps = log(q / (1 - q)), q = 0.05^(1/r)
    q = 0.05 ** (1.0 / r)
    assert epsilon_lower_bound(r, r, r) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)


def test_bound_grows_with_guesses_and_vanishes_at_chance() -> None:
    bounds = [epsilon_lower_bound(10 * k, 2 * k, 2 * k, 1e-5) for k in (5, 20, 100, 500)]
    assert bounds == sorted(bounds) and bounds[0] > 0.5 and bounds[-1] > 5.0
    for k in (10, 100, 1000):
        assert epsilon_lower_bound(2 * k, k, k // 2, 1e-5) == 0.0
    assert epsilon_lower_bound(200, 40, 30) < epsilon_lower_bound(200, 40, 36) < epsilon_lower_bound(200, 40, 40)


def test_p_value_monotone_and_delta_costs() -> None:
    ps = [p_value(200, 40, 34, e) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert ps == sorted(ps) and 0 < ps[0] < 1e-4
    assert p_value(200, 40, 34, 1.0, 1e-3) > p_value(200, 40, 34, 1.0, 0.0)
    assert epsilon_lower_bound(2000, 400, 400, 1e-4) < epsilon_lower_bound(2000, 400, 400, 0.0)
    with pytest.raises(InputError):
        p_value(10, 20, 5, 1.0)


def test_count_correct_top_and_bottom() -> None:
    included = np.array([True] * 5 + [False] * 5)
    scores = np.arange(10, 0, -1, dtype=float)  # included canaries score highest
    assert count_correct(scores, included, 3, np.random.default_rng(0)) == (6, 6)
    assert count_correct(-scores, included, 3, np.random.default_rng(0)) == (6, 0)


def test_method_to_mechanism_mapping() -> None:
    assert resolve_target("dp-mepf") == "gaussian-sum"
    assert resolve_target("pe") == "histogram"
    assert {resolve_target(m) for m in ("dpdm", "dpaf", "dpsgd-classifier")} == {"dpsgd"}
    assert resolve_target("dpdfd") == "gaussian-release"
    assert set(METHOD_TARGETS.values()) == set(TARGETS)
    with pytest.raises(InputError):
        resolve_target("no-such-method")


# -- honest vs broken ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
def test_honest_passes_and_every_broken_variant_is_flagged(target: str) -> None:
    results = run_audit([target], self_test=True, epsilon=1.0, delta=1e-5, size="smoke", seed=0)
    assert [r.variant for r in results] == list(VARIANTS)
    for r in results:
        assert r.claimed_epsilon == pytest.approx(1.0, abs=0.01)  # the ledger's PLD epsilon of the calibrated run
        assert r.violation == r.variant.startswith("broken-"), r
        assert r.violation == (r.epsilon_lower_bound > r.claimed_epsilon)
    from dpimages import clipping

    assert mechanisms.clip_rows is clipping.clip_rows  # the patch is gone


def test_public_seed_replay_recomputes_the_noise() -> None:
    # The run's source draws as NoiseSource.seeded; replaying the seed in the recorded order gives its exact noise.
    run, plain = _DrawOrder.seeded(11), NoiseSource.seeded(11)
    value = torch.arange(6, dtype=torch.float64)
    ledger = PrivacyLedger(10.0, 1e-5)
    released = []
    for source in (run, plain):
        source.bernoulli(50, 0.3)  # a Poisson sampling decision between releases
        source.standard_normal((2,))  # a bare draw
        released.append(mechanisms.gaussian_release(value, sensitivity=1.0, noise_multiplier=1.0, ledger=ledger,
                                                     noise=source, label="t"))
    assert torch.equal(released[0], released[1])
    assert [d.kind for d in run.draws] == ["bernoulli", "normal", "normal"] and run.gaussian_draws == 2
    bare, noise = replay_noise(11, run.draws)
    assert bare.shape == (2,) and torch.allclose(released[0] - noise, value, atol=1e-12)
    assert not torch.allclose(released[0] - replay_noise(12, run.draws)[1], value, atol=0.1)  # needs the seed


@pytest.mark.parametrize("method", [*METHOD_TARGETS, *TARGETS])
def test_public_seed_is_flagged_and_honest_is_not(method: str) -> None:
    # Same mechanisms, same seeded noise: knowing the seed alone turns an honest run into a violation.
    honest, public = (audit_once(method, var, epsilon=1.0, seed=1) for var in ("honest", "broken-public-seed"))
    assert honest.target == public.target == resolve_target(method)
    assert not honest.violation and honest.epsilon_lower_bound < 1.0
    assert public.violation and public.epsilon_lower_bound > public.claimed_epsilon
    assert public.claimed_epsilon == pytest.approx(honest.claimed_epsilon)  # the ledger sees the same run


def test_public_seed_needs_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Control: an attacker replaying a wrong seed is back to chance (the violation comes from the seed alone).
    monkeypatch.setattr("dpimages.audit.one_run.replay_noise", lambda seed, draws: replay_noise(seed + 1, draws))
    for target in TARGETS:
        assert not audit_once(target, "broken-public-seed", seed=1).violation


def test_honest_gaussian_sum_other_seed_not_flagged() -> None:
    r = audit_once("dp-mepf", epsilon=0.5, seed=7)
    assert r.target == "gaussian-sum" and not r.violation and r.guesses == 40


# -- command line -------------------------------------------------------------------------------
def test_cli_json_self_test(capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--method", "histogram", "--self-test", "--json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for r in rows:
        assert {"method", "variant", "claimed_epsilon", "epsilon_lower_bound", "violation"} <= set(r)
        assert r["method"] == "histogram" and r["violation"] == r["variant"].startswith("broken-")


def test_cli_text_names_the_mechanism(capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--method", "gaussian-release", "--canaries", "100"]) == 0
    out = capsys.readouterr().out
    assert "gaussian_release" in out and "100 canaries" in out and "lower bound" in out


@pytest.mark.parametrize("args", [
    ["--epsilon", "0"], ["--epsilon", "-1"], ["--epsilon", "nan"], ["--method", "no-such-method"],
    ["--delta", "1.5"], ["--delta", "0"], ["--canaries", "5"], ["--size", "huge"],
    ["--method", "dpdm", "--self-test"], ["--method", "dpdfd", "--epsilon", "0"],
])
def test_cli_bad_input_exit_2_one_line(args: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
