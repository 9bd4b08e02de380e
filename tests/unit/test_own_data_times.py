"""The own-data timing benchmark's reading of progress bars (its estimates rest on it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("own_data_times", ROOT / "benchmarks" / "own_data_times.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bars_keep_each_stage_last_state_and_estimate_from_its_rate():
    script = load_script()
    log = ("dpdfd teachers:  50%|#####     | 200/400 [00:03<00:03, 66.6it/s]\r"
           "dpdfd teachers: 100%|##########| 400/400 [00:06<00:00, 66.6it/s]\n"
           "dpdfd student steps:  10%|#         | 100/1000 [01:05<09:45,  1.5it/s]\r"
           "dpdfd student steps:  26%|##6       | 259/1000 [1:02:46<3:00:00,  1.5it/s]\r"
           "WARNING: not a bar | 3/4 [00:01<00:01]\n")
    bars = script.bars(log)
    assert bars == {"dpdfd teachers": {"n": 400, "total": 400, "elapsed_s": 6.0},
                    "dpdfd student steps": {"n": 259, "total": 1000, "elapsed_s": 3766.0}}
    assert script.stage_estimate(bars["dpdfd teachers"]) == 6.0  # a finished stage: its measured time
    assert script.stage_estimate(bars["dpdfd student steps"]) == pytest.approx(3766.0 * 1000 / 259)
    assert script.stage_estimate({"n": 0, "total": 5, "elapsed_s": 9.0}) == float("inf")
