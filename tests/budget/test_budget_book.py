"""The budget book: composition across runs, reservation before reading, races, SIGKILL, resume, bad input.

Each test names the safeguard it guards; where a mutation can be run cheaply, the test runs it and shows
that the check fails without the safeguard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant

from dpimages.api import fit_run
from dpimages.budget.book import BudgetBook, larger_of
from dpimages.cli import main
from dpimages.data.toy import toy_bars
from dpimages.errors import BudgetExceeded, InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, calibrate_gaussian

HERE = Path(__file__).resolve().parent
SMOKE = ["--preset", "smoke", "steps=4", "eval_every=2", "checkpoint_every=2", "grid_every=1000"]


def dp_accounting_epsilon(events: list[dict], delta: float) -> float:
    """Independent recomputation: dp-accounting's PLD accountant on the JSON events, nothing from dpimages."""
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    for e in events:
        m: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(float(e["noise_multiplier"]))
        if e["kind"] == "subsampled_gaussian":
            m = dp_accounting.PoissonSampledDpEvent(float(e["sample_rate"]), m)
        acc.compose(m, int(e["steps"]))
    return float(acc.get_epsilon(delta))


def fit_args(data: Path, run: Path, epsilon: float, *extra: str) -> list[str]:
    return ["fit", "dp-mepf", "--data", f"npz:{data}", "--epsilon", str(epsilon), "--run-dir", str(run), "--json",
            *SMOKE, *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- composition ---------------------------------------------------------------------------------------------
def test_three_fits_under_one_name_compose_as_dp_accounting_gives(book_path, toy_npz, tmp_path, capsys):
    """Guards the total: `epsilon_pld` over the concatenated events of every run (book.reserve / summary).

    Recomputed here with dp-accounting directly on the three runs' privacy.json events. A book that added the
    runs' epsilons (the naive sum, shown beside it) would be 3.5 here, not the composed ~2.4.
    """
    torch.set_num_threads(1)
    assert main(["budget", "set", "toy", "--epsilon", "20", "--delta", "1e-5"]) == 0
    runs = [tmp_path / f"r{i}" for i in range(3)]
    for run, eps in zip(runs, (0.5, 1.0, 2.0), strict=True):
        assert main(fit_args(toy_npz, run, eps, "--budget", "toy")) == 0, capsys.readouterr().err
    capsys.readouterr()
    privacy = [json.loads((r / "privacy.json").read_text()) for r in runs]
    joint = [e for p in privacy for e in p["events"]]
    expected = dp_accounting_epsilon(joint, 1e-5)
    assert main(["budget", "show", "toy", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["runs"] == 3
    assert shown["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    assert shown["epsilon_sum"] == pytest.approx(sum(p["epsilon"] for p in privacy), rel=1e-6)
    assert shown["epsilon_total"] < shown["epsilon_sum"] - 0.5  # composition, not a sum
    # every run's privacy.json and report state the book's total after it; the last one the whole total
    assert privacy[2]["budget_book"]["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    assert privacy[0]["budget_book"]["epsilon_total"] == pytest.approx(dp_accounting_epsilon(privacy[0]["events"],
                                                                                             1e-5), rel=1e-6)
    assert privacy[2]["budget_book"]["runs"] == 3 and privacy[2]["budget_book"]["budget"] == "toy"
    assert "## Budget book" in (runs[2] / "report.md").read_text()
    # the independent checker still agrees with each run's own ledger
    res = subprocess.run([sys.executable, str(HERE.parents[1] / "benchmarks" / "recompute_epsilon.py"),
                          *map(str, runs)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_book_composes_subsampled_and_gaussian_events_of_several_runs(tmp_path):
    """The same at the API, with DP-SGD-like events (subsampled Gaussians) and a repeated release."""
    book = BudgetBook(tmp_path / "b.sqlite", create=True)
    book.set_budget("d", 50.0, 1e-6)
    plans = [[PrivacyEvent.subsampled_gaussian(1.1, 0.01, 500, "dp-sgd")],
             [PrivacyEvent.gaussian(3.0, 2, "counts"), PrivacyEvent.subsampled_gaussian(0.9, 0.02, 200, "dp-sgd")],
             [PrivacyEvent.subsampled_gaussian(1.1, 0.01, 500, "dp-sgd")]]  # the same release as run 0: composed
    for i, plan in enumerate(plans):
        book.reserve("d", f"run{i}", plan)
        book.record("d", f"run{i}", plan)
    expected = dp_accounting_epsilon([e.to_json() for p in plans for e in p], 1e-6)
    assert book.summary("d")["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    hist = book.history("d")
    assert [r["index"] for r in hist] == [1, 2, 3] and hist[-1]["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    assert hist[0]["epsilon_total"] == pytest.approx(dp_accounting_epsilon([e.to_json() for e in plans[0]], 1e-6),
                                                     rel=1e-6)


def test_a_run_counts_the_larger_of_reserved_and_spent_never_less(tmp_path):
    """Guards `larger_of` in reserve/record: a run that spent less than it reserved stays counted at its
    reservation, one that spent more at its spend; recording again never lowers it."""
    book = BudgetBook(tmp_path / "b.sqlite", create=True)
    book.set_budget("d", 10.0, 1e-5)
    plan = [PrivacyEvent.gaussian(2.0, 3, "a")]
    book.reserve("d", "r", plan)
    book.record("d", "r", [PrivacyEvent.gaussian(2.0, 1, "a")])
    assert book.runs("d")[0].counted == tuple(plan)
    book.record("d", "r", [PrivacyEvent.gaussian(2.0, 5, "a")])
    assert book.runs("d")[0].counted == (PrivacyEvent.gaussian(2.0, 5, "a"),)
    book.record("d", "r", [])
    assert book.runs("d")[0].counted == (PrivacyEvent.gaussian(2.0, 5, "a"),)
    assert larger_of([PrivacyEvent.gaussian(2.0, 1, "a")] * 3, [PrivacyEvent.gaussian(2.0, 2, "a")]) == \
        [PrivacyEvent.gaussian(2.0, 3, "a")]  # within one plan a release's steps add up


# -- refusal before anything is read or written -----------------------------------------------------------
def test_a_fit_past_the_total_exits_3_before_anything_is_read_or_written(book_path, toy_npz, tmp_path, capsys):
    """Guards the refusal in `BudgetBook.reserve` and the ledger's `on_reserve` hook (called inside
    `PrivacyLedger.reserve`, before the method's first release). Without either, the second fit would pass:
    shown by the mutation at the end (the same fit without the hook's refusal releases and spends)."""
    torch.set_num_threads(1)
    assert main(["budget", "set", "toy", "--epsilon", "1.2", "--delta", "1e-5"]) == 0
    assert main(fit_args(toy_npz, tmp_path / "first", 1.0, "--budget", "toy")) == 0
    capsys.readouterr()
    before = BudgetBook(book_path).history("toy")
    # alone it fits its own budget (1.0), but composed with the first run it passes the book's 1.2
    assert main(fit_args(toy_npz, tmp_path / "second", 1.0, "--budget", "toy")) == 3
    line = one_error_line(capsys)
    assert "budget book" in line and "'toy'" in line and "nothing was reserved" in line
    assert not (tmp_path / "second").exists()
    after = BudgetBook(book_path).history("toy")
    assert after == before  # nothing written in the book

    # in process: not one noise draw, nothing in the run directory
    noise = NoiseSource()
    with pytest.raises(BudgetExceeded):
        fit_run("dp-mepf", f"npz:{toy_npz}", epsilon=1.0, run_dir=tmp_path / "third", preset="smoke",
                overrides=SMOKE[2:], budget="toy", noise_source=noise, progress=False)
    assert noise.gaussian_draws == 0 and not (tmp_path / "third").exists()
    assert BudgetBook(book_path).history("toy") == before

    # the mutation: without the ledger hook (BookBudget.attach_ledger wires it) the same fit releases its noise
    # and the book ends past its total
    from dpimages.budget.runner import BookBudget

    real = BookBudget.attach_ledger
    BookBudget.attach_ledger = lambda self, ledger, run_id, private, info: setattr(self, "run_id", run_id)
    try:
        noise = NoiseSource()
        fit_run("dp-mepf", f"npz:{toy_npz}", epsilon=1.0, run_dir=tmp_path / "mutant", preset="smoke",
                overrides=SMOKE[2:], budget="toy", noise_source=noise, progress=False)
    finally:
        BookBudget.attach_ledger = real
    assert noise.gaussian_draws > 0 and BudgetBook(book_path).summary("toy")["epsilon_total"] > 1.2


# -- race -----------------------------------------------------------------------------------------------------
def _race(book: Path, name: str, nm: float, tmp_path: Path, unsafe: bool) -> list[str]:
    go = tmp_path / f"go-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "book_child.py"), "race", str(book), name, f"run{i}",
                               repr(nm), str(go), *(["unsafe"] if unsafe else [])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read()  # type: ignore
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    return sorted(o[0].strip() for o in outs)


def test_two_processes_racing_for_the_last_budget_exactly_one_passes(tmp_path):
    """Guards `BEGIN IMMEDIATE` around the check and the write in `reserve` (`BudgetBook._write`).

    Each reservation alone fits (0.8 of 1.0), both do not (PLD ~1.13). Both processes are inside `reserve`
    at the same time (each composition is slowed by one second). With the transaction exactly one passes;
    the mutation (`reserve` without its transaction, in the child) lets both pass.
    """
    nm = calibrate_gaussian(0.8, 1e-5)
    path = tmp_path / "b.sqlite"
    book = BudgetBook(path, create=True)
    book.set_budget("d", 1.0, 1e-5)
    assert _race(path, "d", nm, tmp_path, unsafe=False) == ["ok", "refused"]
    assert len(book.runs("d")) == 1 and book.summary("d")["epsilon_total"] <= 1.0

    book.set_budget("d2", 1.0, 1e-5)  # a fresh name for the mutation
    assert _race(path, "d2", nm, tmp_path, unsafe=True) == ["ok", "ok"]  # without the safeguard: both pass
    assert book.summary("d2")["epsilon_total"] > 1.0


# -- SIGKILL during writes --------------------------------------------------------------------------------------
def test_sigkill_during_writes_loses_no_committed_reservation(tmp_path):
    """Guards the WAL journal and `reserve`'s COMMIT before it returns: a writer reserving in a loop is
    SIGKILLed mid-loop; the book opens, passes SQLite's integrity check, and holds every reservation the
    writer saw committed (it prints an id only after `reserve` returned). A `reserve` that returned before
    committing (or a book that kept reservations in memory) would lose the printed ones."""
    path = tmp_path / "b.sqlite"
    book = BudgetBook(path, create=True)
    book.set_budget("d", 1e6, 1e-5)
    book.close()
    proc = subprocess.Popen([sys.executable, str(HERE / "book_child.py"), "writer", str(path), "d"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen: list[str] = []
    try:
        deadline = time.time() + 120
        assert proc.stdout is not None
        while len(seen) < 40 and time.time() < deadline:
            line = proc.stdout.readline().strip()
            if not line:
                break
            seen.append(line)
        assert len(seen) == 40, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    book = BudgetBook(path)
    assert book.integrity_check() == "ok"
    assert book._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    stored = [r.run_id for r in book.runs("d")]
    assert set(seen) <= set(stored)
    assert stored == [f"w{i}" for i in range(len(stored))]  # no gap, nothing half-written
    assert len(stored) - len(seen) <= 1  # at most the one reservation committed but not yet printed
    assert book.runs("d")[-1].counted == (PrivacyEvent.gaussian(50.0, 1, "loop"),)


# -- crash and resume -------------------------------------------------------------------------------------------
def test_crashed_run_stays_counted_and_resume_reuses_its_reservation(book_path, toy_npz, tmp_path, capsys,
                                                                     monkeypatch):
    """Guards the run id kept in checkpoints/budget-book.json (`BookBudget.attach`): a crashed run's
    reservation stays counted, and --resume reserves under the same id, so the total does not move.
    A fresh id on resume would count the run twice (two rows, a larger total)."""
    torch.set_num_threads(1)
    from dpimages.methods.dp_mepf.method import DPMEPF

    assert main(["budget", "set", "toy", "--epsilon", "5", "--delta", "1e-5"]) == 0
    run = tmp_path / "run"

    save = DPMEPF._checkpoint

    def crash(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        save(self, *args, **kwargs)  # the release is in the first checkpoint, then the process dies
        raise RuntimeError("simulated crash after the release")

    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        m.setattr(DPMEPF, "_checkpoint", crash)
        main(fit_args(toy_npz, run, 2.0, "--budget", "toy"))
    book = BudgetBook(book_path)
    [crashed] = book.runs("toy")
    spent = json.loads((run / "privacy.json").read_text())["events"]
    assert crashed.status == "reserved" and [e.to_json() for e in crashed.counted] == spent
    total = book.summary("toy")["epsilon_total"]
    assert total == pytest.approx(dp_accounting_epsilon(spent, 1e-5), rel=1e-6)

    capsys.readouterr()
    assert main([*fit_args(toy_npz, run, 2.0, "--budget", "other"), "--resume"]) == 2  # not its budget
    assert "unknown budget" in one_error_line(capsys)
    assert main(["budget", "set", "other", "--epsilon", "5", "--delta", "1e-5"]) == 0
    assert main([*fit_args(toy_npz, run, 2.0, "--budget", "other"), "--resume"]) == 2
    assert "started under budget 'toy'" in one_error_line(capsys)

    assert main([*fit_args(toy_npz, run, 2.0, "--budget", "toy"), "--resume"]) == 0, capsys.readouterr().err
    [resumed] = book.runs("toy")
    assert resumed.run_id == crashed.run_id and resumed.status == "finished"
    assert book.summary("toy")["epsilon_total"] == pytest.approx(total, rel=1e-12)
    assert json.loads((run / "privacy.json").read_text())["budget_book"]["runs"] == 1


def test_a_run_started_without_the_book_and_resumed_with_it_is_counted_in_full(book_path, toy_npz, tmp_path,
                                                                               capsys, monkeypatch):
    """Guards the eager reservation of a resumed ledger's events (`BookBudget.attach_ledger`): dp-mepf makes
    no new reservation when it resumes after its release, so without it the book would count nothing until
    the end, and would never have refused the resumed run."""
    torch.set_num_threads(1)
    from dpimages.methods.dp_mepf.method import DPMEPF

    assert main(["budget", "set", "toy", "--epsilon", "1.5", "--delta", "1e-5"]) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        save = DPMEPF._checkpoint
        m.setattr(DPMEPF, "_checkpoint", lambda *a: (save(*a), (_ for _ in ()).throw(RuntimeError("crash"))))
        main(fit_args(toy_npz, run, 2.0))  # no book: spends epsilon 2
    capsys.readouterr()
    assert main([*fit_args(toy_npz, run, 2.0, "--budget", "toy"), "--resume"]) == 3  # 2 > 1.5: refused
    assert "budget book" in one_error_line(capsys)
    assert BudgetBook(book_path).runs("toy") == []
    assert main(["budget", "set", "toy", "--epsilon", "3", "--delta", "1e-5"]) == 0
    assert main([*fit_args(toy_npz, run, 2.0, "--budget", "toy"), "--resume"]) == 0
    spent = json.loads((run / "privacy.json").read_text())["events"]
    assert BudgetBook(book_path).summary("toy")["epsilon_total"] == pytest.approx(
        dp_accounting_epsilon(spent, 1e-5), rel=1e-6)


# -- the data check ----------------------------------------------------------------------------------------------
def test_changed_data_under_a_name_warns_once_and_the_digest_is_keyed(tmp_path, capsys):
    """Guards the keyed digest (an HMAC under the book's own key, never the unkeyed fingerprint) and the
    one-line warning when the data under a name changes; the name still carries the budget."""
    book = BudgetBook(tmp_path / "b.sqlite", create=True)
    book.set_budget("d", 10.0, 1e-5)
    a, b = toy_bars(), toy_bars(seed=1)
    da = book.data_digest(a.keyed_digest)
    assert da == a.keyed_digest(book._key) and da not in a.fingerprint and da != book.data_digest(b.keyed_digest)
    ev = [PrivacyEvent.gaussian(5.0, 1, "x")]
    book.reserve("d", "r1", ev, data_digest=da)
    book.reserve("d", "r2", ev, data_digest=da)
    assert capsys.readouterr().err == ""
    book.reserve("d", "r3", ev, data_digest=book.data_digest(b.keyed_digest))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from its previous run's" in err[0]
    assert len(book.runs("d")) == 3  # counted all the same
    stored = [r[0] for r in book._conn.execute("SELECT data_digest FROM runs")]
    assert a.fingerprint.split(":")[1] not in stored and da in stored


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["budget", "set", "d", "--epsilon", "0", "--delta", "1e-5"], "epsilon must be"),
    (["budget", "set", "d", "--epsilon", "-1", "--delta", "1e-5"], "epsilon must be"),
    (["budget", "set", "d", "--epsilon", "nan", "--delta", "1e-5"], "epsilon must be"),
    (["budget", "set", "d", "--epsilon", "1", "--delta", "1.5"], "delta must be"),
    (["budget", "set", "bad name", "--epsilon", "1", "--delta", "1e-5"], "budget name"),
    (["budget", "show", "d"], "no budget book"),
    (["budget", "history", "d"], "no budget book"),
])
def test_bad_input_without_a_book_exits_2_and_creates_nothing(book_path, args, needle, capsys):
    assert main(args) == 2
    assert needle in one_error_line(capsys)
    assert not book_path.exists() and not book_path.parent.exists()


def test_bad_input_with_a_book_exits_2_and_writes_nothing(book_path, toy_npz, tmp_path, capsys):
    assert main(["budget", "set", "d", "--epsilon", "3", "--delta", "1e-5"]) == 0
    book = BudgetBook(book_path)
    before = (book.summary("d"), book.history("d"), book.budget("d"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "privacy.json").write_text("{}")
    cases = [
        (["budget", "show", "nope"], "unknown budget 'nope'"),
        (["budget", "history", "nope"], "unknown budget 'nope'"),
        (["budget", "history", "d", "--plot", str(tmp_path / "x.jpg")], "--plot must end in .png"),
        (["budget", "set", "d", "--epsilon", "-2", "--delta", "1e-5"], "epsilon must be"),
        (["budget", "set", "d", "--epsilon", "2", "--delta", "1e-5", "--budget-book", str(run_dir / "b.sqlite")],
         "inside the run directory"),
        (["budget", "show", "--budget-book", str(run_dir / "sub" / "b.sqlite")], "inside the run directory"),
        (fit_args(toy_npz, tmp_path / "f1", 1.0, "--budget", "nope"), "unknown budget 'nope'"),
        (fit_args(toy_npz, tmp_path / "f2", 1.0, "--budget-book", str(book_path)), "needs --budget NAME"),
        (fit_args(toy_npz, tmp_path / "f3", 1.0, "--budget", "d", "--budget-book", str(tmp_path / "f3" / "b.db")),
         "no budget book"),
        (fit_args(toy_npz, tmp_path / "f4", 0.0, "--budget", "d"), "epsilon must be"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        assert needle in one_error_line(capsys), args
    assert not (run_dir / "b.sqlite").exists() and not (run_dir / "sub").exists()
    assert not any((tmp_path / f).exists() for f in ("f1", "f2", "f3", "f4", "x.jpg"))
    assert (book.summary("d"), book.history("d"), book.budget("d")) == before


def test_book_inside_the_new_run_directory_and_a_delta_too_large_for_the_data_are_refused(book_path, toy_npz,
                                                                                        tmp_path, capsys):
    """A book that would live in the run directory being created, and a name whose delta is not < 1/N."""
    inside = tmp_path / "run" / "book.sqlite"
    assert main(["budget", "set", "d", "--epsilon", "3", "--delta", "1e-5", "--budget-book", str(inside)]) == 0
    capsys.readouterr()
    with pytest.raises(InputError, match="inside the run directory"):
        fit_run("dp-mepf", f"npz:{toy_npz}", epsilon=1.0, run_dir=tmp_path / "run", preset="smoke",
                overrides=SMOKE[2:], budget="d", budget_book=inside, progress=False)
    assert main(["budget", "set", "big", "--epsilon", "3", "--delta", "0.01"]) == 0  # 0.01 >= 1/200
    capsys.readouterr()
    assert main(fit_args(toy_npz, tmp_path / "r2", 1.0, "--budget", "big")) == 2
    assert "budget 'big'" in one_error_line(capsys) and not (tmp_path / "r2").exists()
    assert BudgetBook(book_path).runs("big") == []


def test_history_table_and_plot(book_path, tmp_path, capsys):
    assert main(["budget", "set", "d", "--epsilon", "30", "--delta", "1e-5"]) == 0
    book = BudgetBook(book_path)
    for i in range(3):
        book.reserve("d", f"r{i}", [PrivacyEvent.gaussian(1.0 + i, 1, "x")], info={"method": "dp-mepf"})
    capsys.readouterr()
    assert main(["budget", "history", "d", "--plot", str(tmp_path / "spend.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("dp-mepf") == 3 and "x x1 (nm 3)" in out
    from PIL import Image

    assert Image.open(tmp_path / "spend.png").size[0] > 300
    assert main(["budget", "history", "d", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    totals = [r["epsilon_total"] for r in rows]
    assert totals == sorted(totals) and rows[-1]["epsilon_sum"] > totals[-1]
