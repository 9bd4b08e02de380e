"""Reliability: SIGKILL mid-fit then --resume, reproducibility, and what secure noise changes.

Tests that need bit-identical runs use ``--insecure-seeded-noise``; default runs draw their noise from the OS
CSPRNG, so two of them with the same ``--seed`` release different noise.

Every run directory made here is also checked by the independent script benchmarks/recompute_epsilon.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpimages.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"


def recompute_ok(*run_dirs: Path) -> None:
    """The independent checker (dp-accounting only) agrees with each run's privacy.json (seeded ones allowed)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recompute_epsilon.py"), "--allow-seeded",
                          *map(str, run_dirs)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" OK") == len(run_dirs), res.stdout


def events(run: Path) -> list[dict]:
    return json.loads((run / "privacy.json").read_text())["events"]


def ledger_steps(run: Path) -> int | None:
    """Steps recorded in privacy.json now (None before it exists)."""
    try:
        return sum(e["steps"] for e in json.loads((run / "privacy.json").read_text())["events"])
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def checkpoint_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "state.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def released_steps(run: Path) -> int:
    """The largest step the run shows anywhere else: its checkpoint and its metrics."""
    best = 0
    try:
        best = int(json.loads((run / "checkpoints" / "state.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except json.JSONDecodeError:  # a line being written
                pass
    except FileNotFoundError:
        pass
    return best


# -- reproducibility (in-process, dp-mepf smoke) ------------------------------------------------------------
def fit_and_sample(capsys, run: Path, *extra: str) -> tuple[np.ndarray, dict]:
    torch.set_num_threads(1)
    code = main(["fit", "dp-mepf", "--data", f"npz:{CORPUS}/small-valid.npz", "--epsilon", "2", "--preset", "smoke",
                 "--run-dir", str(run), "--json", "steps=6", "checkpoint_every=3", "eval_every=3", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    code = main(["sample", str(run), "--n", "8", "--out", str(run.parent / f"{run.name}.npz"), "--seed", "0"])
    assert code == 0, capsys.readouterr().err
    s = np.load(run.parent / f"{run.name}.npz")
    assert s["images"].shape == (8, 28, 28, 1) and s["images"].dtype == np.uint8
    return s["images"], json.loads((run / "privacy.json").read_text())


def noisy_counts(run: Path) -> list[float]:
    """dp-mepf's released noisy (class, cell) counts, as logged in metrics.jsonl."""
    return next(m["noisy_counts"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if m.get("event") == "release")


def test_default_runs_with_the_same_seed_release_different_noise(tmp_path, capsys):
    """Secure by default: the same --seed, other noise (so nothing can be subtracted), the same accounting."""
    s1, ps1 = fit_and_sample(capsys, tmp_path / "s1", "--seed", "3")
    s2, ps2 = fit_and_sample(capsys, tmp_path / "s2", "--seed", "3")
    assert noisy_counts(tmp_path / "s1") != noisy_counts(tmp_path / "s2")  # the released values differ
    assert not np.array_equal(s1, s2)
    assert ps1["events"] == ps2["events"] and ps1["noise_source"] == ps2["noise_source"] == "os-csprng"
    assert "noise_source: os-csprng" in (tmp_path / "s1" / "config.yaml").read_text()
    assert not (tmp_path / "s1" / "report.md").read_text().startswith("> **NOT PRIVATE")
    recompute_ok(tmp_path / "s1", tmp_path / "s2")


def test_insecure_seeded_noise_is_bit_identical_and_marked_not_private(tmp_path, capsys):
    seeded = ("--insecure-seeded-noise",)
    a, pa = fit_and_sample(capsys, tmp_path / "a", "--seed", "3", *seeded)
    b, pb = fit_and_sample(capsys, tmp_path / "b", "--seed", "3", *seeded)
    c, pc = fit_and_sample(capsys, tmp_path / "c", "--seed", "4", *seeded)

    assert np.array_equal(a, b)  # samples, bit for bit
    assert pa == pb and noisy_counts(tmp_path / "a") == noisy_counts(tmp_path / "b")  # the whole ledger, the noise
    ca, cb = (json.loads((tmp_path / r / "checkpoints" / "state.json").read_text()) for r in "ab")
    assert (tmp_path / "a" / "checkpoints" / ca["tensors"]).read_bytes() == \
        (tmp_path / "b" / "checkpoints" / cb["tensors"]).read_bytes()  # the weights too

    assert not np.array_equal(a, c)  # another seed: other noise, other samples
    assert pc["events"] == pa["events"] and pc["epsilon"] == pa["epsilon"]  # same release schedule

    assert pa["noise_source"] == "seeded-insecure" and pa["private"] is False
    assert "noise_source: seeded-insecure" in (tmp_path / "a" / "config.yaml").read_text()
    report = (tmp_path / "a" / "report.md").read_text()
    assert report.startswith("> **NOT PRIVATE") and "knows the seed" in report.splitlines()[0]
    # the independent checker refuses a seeded ledger, and says why
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recompute_epsilon.py"), str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "seeded-insecure" in res.stdout + res.stderr
    # and export refuses it
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "out")]) == 2
    assert "not private" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- SIGKILL mid-run, resume: dp-mepf (one release, then post-processing; fast) --------------------------------
def mepf_args(run: Path) -> list[str]:
    return ["fit", "dp-mepf", "--data", f"npz:{CORPUS}/small-valid.npz", "--epsilon", "2", "--preset", "smoke",
            "--run-dir", str(run), "--json", "steps=30", "checkpoint_every=5", "eval_every=10", "grid_every=1000",
            "--insecure-seeded-noise"]  # bit-identical to the uninterrupted run


def test_sigkill_dp_mepf_then_resume_equals_uninterrupted(tmp_path, capsys):
    torch.set_num_threads(1)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dpimages", *mepf_args(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    codes: list[int] = []
    uninterrupted = threading.Thread(target=lambda: codes.append(main(mepf_args(ref))))
    uninterrupted.start()  # the uninterrupted run, meanwhile
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if checkpoint_step(killed) >= 5:  # the first training checkpoint (the release itself is at step 0)
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the fit ended before it could be killed: make the schedule longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        uninterrupted.join(timeout=300)
    assert codes == [0], capsys.readouterr().err
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((killed / "checkpoints" / "state.json").read_text())
    assert 5 <= state["step"] < 30 and state["finished"] is False
    before = events(killed)
    assert before == events(ref)  # the whole release is on disk before training starts
    recompute_ok(killed)

    capsys.readouterr()
    assert main([*mepf_args(killed), "--resume"]) == 0, capsys.readouterr().err
    assert events(killed) == before == events(ref)  # no second release, none lost
    pk, pr = (json.loads((r / "privacy.json").read_text()) for r in (killed, ref))
    assert pk["epsilon"] == pr["epsilon"] and pk["epsilon_exact"] and pr["epsilon_exact"]
    assert json.loads((killed / "checkpoints" / "state.json").read_text())["step"] == 30
    for r in (killed, ref):
        assert main(["sample", str(r), "--n", "8", "--out", str(tmp_path / f"{r.name}.npz")]) == 0
    # resuming is exact: the same generator as the uninterrupted run, so the same samples
    assert np.array_equal(np.load(tmp_path / "killed.npz")["images"], np.load(tmp_path / "ref.npz")["images"])
    recompute_ok(killed, ref)


# -- SIGKILL mid-run, resume (dpdm smoke in subprocesses) ---------------------------------------------------
def dpdm_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dpimages", "fit", "dpdm", "--data", f"npz:{data}", "--epsilon", "10", "--preset",
            "smoke", "--run-dir", str(run), "--json", "epochs=1.5", "checkpoint_every=2", "grid_every=100",
            "--insecure-seeded-noise", *extra]  # bit-identical twins


@pytest.mark.slow
def test_sigkill_then_resume_keeps_every_release_and_matches_an_uninterrupted_run(tiny_npz, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, twin, killed = tmp_path / "ref", tmp_path / "twin", tmp_path / "killed"
    # the uninterrupted run and a same-seed twin (reproducibility of dpdm) run beside the killed one
    others = [subprocess.Popen(dpdm_cmd(tiny_npz, r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               text=True) for r in (ref, twin)]
    proc = subprocess.Popen(dpdm_cmd(tiny_npz, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    seen: list[int] = []  # privacy.json step counts, in the order observed
    deadline = time.time() + 500
    try:
        while time.time() < deadline and proc.poll() is None:
            shown = released_steps(killed)  # read before the ledger: the ledger may only have grown since
            steps = ledger_steps(killed)
            if steps is not None:
                seen.append(steps)
                assert steps >= shown  # a release shows up in the ledger before anywhere else
                if steps >= 3 and (killed / "checkpoints" / "state.json").exists():
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the fit ended before it could be killed: make the schedule longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = ledger_steps(killed)
    assert at_kill is not None and at_kill >= released_steps(killed) >= 2
    state = json.loads((killed / "checkpoints" / "state.json").read_text())
    assert state["finished"] is False
    recompute_ok(killed)  # an interrupted ledger still reports an upper bound on what it spent

    for _ in range(3):  # resume until finished
        res = subprocess.run(dpdm_cmd(tiny_npz, killed, "--resume"), capture_output=True, text=True, timeout=500,
                             env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        if json.loads((killed / "checkpoints" / "state.json").read_text())["finished"]:
            break
    for p in others:
        out, err = p.communicate(timeout=500)
        assert p.returncode == 0, err[-2000:]
    ref_out = json.loads(out)

    final = ledger_steps(killed)
    assert seen == sorted(seen) and final >= at_kill >= max(seen)  # the ledger never went back: no release lost
    assert events(killed) == events(ref) and len(events(ref)) == 1
    assert final == events(ref)[0]["steps"] == round(1.5 * 200 / 32)
    assert json.loads(res.stdout)["epsilon"] == pytest.approx(ref_out["epsilon"], rel=0, abs=1e-12)
    assert json.loads((killed / "privacy.json").read_text())["epsilon"] == \
        json.loads((ref / "privacy.json").read_text())["epsilon"]

    # dpdm is reproducible too: the same seed gives bit-identical samples
    for r in (ref, twin):
        code = subprocess.run([sys.executable, "-m", "dpimages", "sample", str(r), "--n", "10", "--out",
                               str(tmp_path / f"{r.name}.npz")], capture_output=True, text=True, env=env, timeout=300)
        assert code.returncode == 0, code.stderr
    assert np.array_equal(np.load(tmp_path / "ref.npz")["images"], np.load(tmp_path / "twin.npz")["images"])
    assert events(ref) == events(twin)
    recompute_ok(ref, twin, killed)
