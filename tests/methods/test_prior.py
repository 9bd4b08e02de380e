"""A DP prior as the first stage of PE (`api=dp-prior`): joint plan, spent once, resumed without it, refusals."""

from __future__ import annotations

import json

import pytest
from tests.methods.test_dpdm import dpimages
from tests.methods.test_dpdm_warm import assert_lost_stage_is_refused, pld

from dpimages.privacy import PrivacyLedger
from dpimages.privacy.ledger import merge_events

VOTES = "pe vote histogram"


def test_pe_over_a_dp_prior_spends_the_prior_once_then_the_votes_and_resumes_without_it(tiny_npz, tmp_path):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    common = ["fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "5", "--preset", "smoke", "--run-dir",
              str(run), "--insecure-seeded-noise", "--json", "api=dp-prior", "features=random", "iterations=3"]
    res = dpimages(*common, env_cache=cache)
    assert res.returncode == 0, res.stderr
    events = merge_events(PrivacyLedger.load(run / "privacy.json").events)
    prior = [e for e in events if e.label.startswith("dp-mepf")]
    votes = [e for e in events if e.label == VOTES]
    assert prior and len(votes) == 1 and votes[0].steps == 3 and events[-1].label == VOTES  # prior first
    assert 0.3 * 5 * 0.98 <= pld(prior, 1e-5) <= 0.3 * 5 * 1.001  # the prior alone: its share
    assert 5 * 0.98 <= pld(events, 1e-5) <= 5 * 1.001  # jointly: the budget
    api = run / "checkpoints" / "prior-api"
    assert (api / "model.safetensors").exists() and "DP prior" in json.loads((api / "model.json").read_text())[
        "trained_on"]
    report = (run / "report.md").read_text()
    assert "DP prior (`api=dp-prior`)" in report and "share 0.3" in report
    assert "(post-processing: no further privacy cost)" in report and "(None)" not in report

    # the same run resumed from its finished checkpoint spends nothing more and keeps its API
    before = (run / "privacy.json").read_text()
    res = dpimages(*common, "--resume", env_cache=cache)
    assert res.returncode == 0, res.stderr
    assert merge_events(PrivacyLedger.load(run / "privacy.json").events) == events
    assert json.loads((run / "privacy.json").read_text())["events"] == json.loads(before)["events"]


def test_pe_prior_stage_lost_in_a_crash_is_refused_and_bad_shares_exit_2(tiny_npz, tmp_path):
    cache = str(tmp_path / "cache")
    run = tmp_path / "run"
    common = ["fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "5", "--preset", "smoke", "--run-dir",
              str(run), "--insecure-seeded-noise", "api=dp-prior", "features=random"]
    assert dpimages(*common, env_cache=cache).returncode == 0
    assert_lost_stage_is_refused(common, run, cache, "dp-prior stage")  # as if it died after the prior
    for bad in ("prior_share=0", "prior_share=1.5", "prior_preset=huge"):
        res = dpimages("fit", "pe", "--data", f"npz:{tiny_npz}", "--epsilon", "5", "--preset", "smoke",
                       "--run-dir", str(tmp_path / bad), "api=dp-prior", "features=random", bad, env_cache=cache)
        assert res.returncode == 2 and bad.split("=")[0] in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("method", ["dpaf", "dpdfd", "pe", "dpdm"])
def test_only_methods_with_a_plan_can_be_a_prior(method):
    from tests.methods.test_dpdm_warm import toy

    from dpimages.api import create
    from dpimages.errors import InputError

    with pytest.raises(InputError, match="cannot be a stage"):
        create(method, "smoke").planned_events(toy(), None, 1.0, 1e-5, dataset_size=len(toy()))
