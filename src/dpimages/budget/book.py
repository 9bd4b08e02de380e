"""The budget book: one privacy budget per named data set, across runs.

An embedded SQLite database (stdlib `sqlite3`, WAL journal) kept by the data
owner, outside every run directory. The owner names a data set and gives it
a budget (epsilon, delta); every run on it reserves its planned releases in
the book before it reads anything private, and the book refuses
(`BudgetExceeded`, exit 3) a run whose events would take the name past its
budget.

Privacy contract
----------------
* **Composition, never a sum.** A name's total is the PLD epsilon (dp-accounting,
  add/remove relation, `PLD_INTERVAL`) of the concatenated events of every run
  counted under it, at the name's delta (`dpimages.privacy.ledger.epsilon_pld`);
  the RDP epsilon is the cross-check. The naive sum of the runs' own epsilons
  is shown beside it, for comparison only.
* **One delta per name.** Every run on a name is accounted at the name's
  delta, whatever delta the run itself was given (its own privacy.json keeps
  its own (epsilon, delta)); a name's delta must be < 1/N for each run's N.
* **Reserve before reading.** `reserve` checks and writes a run's whole plan in
  one ``BEGIN IMMEDIATE`` transaction: two processes reserving on one name are
  serialised, so two runs that each fit but together do not can never both
  pass. On refusal nothing is written.
* **Never less than reserved.** A run counts, per release (kind, noise, rate,
  label), the larger of what it reserved and what it spent. A crashed run's
  reservation stays counted; a resumed run (same ``run_id``) reserves again
  without counting twice; `record` after the run never lowers its count.
* **Crash safety.** WAL journal with ``synchronous=FULL``: a committed
  reservation survives a SIGKILL of the writer (and a power loss); an
  interrupted transaction leaves no trace.
* **The data check.** Each run's data is stored as an HMAC-SHA256
  (`ImageData.keyed_digest`) under a random key kept in the book itself,
  never as an unkeyed hash. When the data under a name changes, the book warns
  (one line on stderr); the name, not the data, carries the budget.

The file holds that key and the owner's history: it is created owner-only
(mode 0600) and must not be shared. It may not lie inside a run directory
(a folder holding ``privacy.json``), whose files are shared.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dpimages.errors import BudgetExceeded, DPImagesError, InputError
from dpimages.privacy.ledger import PrivacyEvent, epsilon_pld, epsilon_rdp, validate_budget

ENV_VAR = "DPIMAGES_BUDGET_BOOK"
SCHEMA_VERSION = "1"
LOCK_TIMEOUT_S = 120.0  # how long a writer waits for another process's transaction
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}")
RUN_DIR_MARKER = "privacy.json"  # a folder holding one is a run directory (shared): the book never lives there

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    name TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, data_digest TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    budget TEXT NOT NULL REFERENCES budgets(name),
    run_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reserved TEXT NOT NULL,
    spent TEXT NOT NULL,
    counted TEXT NOT NULL,
    data_digest TEXT,
    info TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (budget, run_id));
"""


# -- paths -----------------------------------------------------------------------------------------
def default_book_path() -> Path:
    """``$DPIMAGES_BUDGET_BOOK``, else ``$XDG_DATA_HOME/dpimages/budget.sqlite`` (``~/.local/share`` by default)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".local" / "share") / "dpimages" / "budget.sqlite"


def resolve_book_path(path: str | os.PathLike | None = None) -> Path:
    """The book's absolute path (`path`, else `default_book_path`); InputError inside a run directory."""
    p = Path(path).expanduser() if path else default_book_path()
    p = Path(os.path.abspath(p))
    if p.is_dir():
        raise InputError(f"budget book {p} is a directory: give a file path (e.g. {p / 'budget.sqlite'})")
    for parent in p.parents:
        if (parent / RUN_DIR_MARKER).exists():
            raise InputError(f"budget book {p} lies inside the run directory {parent}: run directories are shared, "
                             "the book is owner only; keep it outside (--budget-book PATH or $" + ENV_VAR + ")")
    return p


def check_name(name: str) -> str:
    """`name` if it is a valid budget name (letters, digits, . _ : + -; at most 100 characters); else InputError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(f"budget name must be 1-100 letters, digits or . _ : + - (starting with a letter or digit), "
                         f"got {name!r}")
    return name


# -- events as the book stores them -----------------------------------------------------------------
def _totals(events: Iterable[PrivacyEvent]) -> dict[tuple, PrivacyEvent]:
    """Steps summed per release (kind, noise multiplier, rate, label), in order of first appearance."""
    out: dict[tuple, PrivacyEvent] = {}
    for e in events:
        k = e.release_key()
        out[k] = replace(out[k], steps=out[k].steps + e.steps) if k in out else e
    return out


def larger_of(a: Iterable[PrivacyEvent], b: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Per release, the larger step count of `a` and `b` (a run's count: never less than reserved or spent)."""
    out = _totals(a)
    for k, e in _totals(b).items():
        if k not in out or e.steps > out[k].steps:
            out[k] = e
    return list(out.values())


def _dump(events: Sequence[PrivacyEvent]) -> str:
    return json.dumps([e.to_json() for e in events])


def _load(text: str) -> list[PrivacyEvent]:
    return [PrivacyEvent.from_json(d) for d in json.loads(text)]


# -- records -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """A named data set's budget: every run on it is composed at this delta and must stay within epsilon."""

    name: str
    epsilon: float
    delta: float
    created: float
    updated: float


@dataclass(frozen=True)
class BookRun:
    """One run as the book counts it (`counted`: per release, the larger of `reserved` and `spent`)."""

    budget: str
    run_id: str
    status: str  # "reserved" (running, or crashed: still counted) or "finished"
    reserved: tuple[PrivacyEvent, ...]
    spent: tuple[PrivacyEvent, ...]
    counted: tuple[PrivacyEvent, ...]
    info: dict[str, Any]
    created: float
    updated: float


@dataclass(frozen=True)
class Reservation:
    """The outcome of `BudgetBook.reserve`: the run's counted events and the name's composed total with them."""

    budget: str
    run_id: str
    events: tuple[PrivacyEvent, ...]
    epsilon_total: float
    epsilon_budget: float
    delta: float


class BudgetBook:
    """The owner's budget book (see the module docstring for the privacy contract).

    ``BudgetBook(path)`` opens an existing book (InputError, exit 2, if there is none: nothing is created);
    ``BudgetBook(path, create=True)`` creates it (owner-only file) when missing. `path` defaults to
    `default_book_path`.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = False) -> None:
        self.path = resolve_book_path(path)
        if not self.path.exists():
            if not create:
                raise InputError(f"no budget book at {self.path}: create a budget first with `dpimages budget set "
                                 f"NAME --epsilon E --delta D` (or point --budget-book / ${ENV_VAR} at yours)")
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=LOCK_TIMEOUT_S, isolation_level=None)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if create:
                with self._write():
                    for statement in _SCHEMA.split(";"):  # not executescript: it would commit first
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                    self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('hmac_key', ?)", (os.urandom(32).hex(),))
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'hmac_key'").fetchone()
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path} is not a dpimages budget book ({e})") from None
        if str(mode).lower() != "wal" or row is None:
            raise InputError(f"{self.path} is not a dpimages budget book (no WAL journal or no key)")
        self._key = bytes.fromhex(row[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BudgetBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): readers go on, other writers wait for it."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise DPImagesError(f"budget book {self.path}: {e} (another process held it for over "
                                f"{LOCK_TIMEOUT_S:g} s)") from None
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot of the book."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    # -- budgets ---------------------------------------------------------------------------------
    def set_budget(self, name: str, epsilon: float, delta: float) -> Budget:
        """Create the budget `name`, or change its epsilon and delta (every run is then composed at the new delta)."""
        check_name(name)
        validate_budget(epsilon, delta)
        now = time.time()
        with self._write() as c:
            c.execute("INSERT INTO budgets (name, epsilon, delta, created, updated) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT(name) DO UPDATE SET epsilon = excluded.epsilon, delta = excluded.delta, "
                      "updated = excluded.updated", (name, float(epsilon), float(delta), now, now))
        return self.budget(name)

    def names(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM budgets ORDER BY name")]

    def budget(self, name: str) -> Budget:
        """The budget `name`; InputError (exit 2) for an unknown name."""
        row = self._conn.execute("SELECT name, epsilon, delta, created, updated FROM budgets WHERE name = ?",
                                 (name,)).fetchone()
        if row is None:
            known = ", ".join(self.names()) or "none yet"
            raise InputError(f"unknown budget {name!r} in {self.path} (budgets: {known}); create it with "
                             f"`dpimages budget set {name} --epsilon E --delta D`")
        return Budget(row[0], float(row[1]), float(row[2]), float(row[3]), float(row[4]))

    def runs(self, name: str) -> list[BookRun]:
        """The runs counted under `name`, in the order they first reserved."""
        self.budget(name)
        rows = self._conn.execute("SELECT budget, run_id, status, reserved, spent, counted, info, created, updated "
                                  "FROM runs WHERE budget = ? ORDER BY id", (name,)).fetchall()
        return [BookRun(r[0], r[1], r[2], tuple(_load(r[3])), tuple(_load(r[4])), tuple(_load(r[5])),
                        json.loads(r[6]), float(r[7]), float(r[8])) for r in rows]

    # -- the data check --------------------------------------------------------------------------
    def data_digest(self, digest: Callable[[bytes], str]) -> str:
        """``digest(key)`` under the book's own key (an HMAC of the data; `ImageData.keyed_digest`)."""
        return digest(self._key)

    # -- reserving and recording -------------------------------------------------------------------
    def reserve(self, name: str, run_id: str, events: Sequence[PrivacyEvent], *, data_digest: str | None = None,
                info: dict[str, Any] | None = None) -> Reservation:
        """Reserve `events` (the run's whole plan so far) for `run_id` under `name`, in one transaction.

        The run's count becomes, per release, the larger of what it already counts and `events`; the
        PLD composition of every run's count on `name` must stay within its epsilon at its delta, else
        BudgetExceeded (exit 3) and nothing is written. Call it before the run reads anything private.
        `data_digest`: `data_digest(ImageData.keyed_digest)` of the run's data (a change warns).
        """
        if not run_id:
            raise InputError("a reservation needs a run id")
        events = list(events)
        with self._write() as c:
            budget = self.budget(name)
            runs = self.runs(name)
            mine = next((r for r in runs if r.run_id == run_id), None)
            others = [e for r in runs if r.run_id != run_id for e in r.counted]
            counted = larger_of(mine.counted if mine else (), events)
            total = epsilon_pld([*others, *counted], budget.delta)
            if total > budget.epsilon * (1 + 1e-9):
                what = ", ".join(f"{e.label or e.kind} x{e.steps}" for e in events) or "nothing new"
                raise BudgetExceeded(
                    f"budget book: {name!r} would reach epsilon {total:.4g} > its budget {budget.epsilon:g} "
                    f"(delta {budget.delta:g}; composed over {len(runs) + (mine is None)} runs) with {what}; "
                    "nothing was reserved")
            now = time.time()
            if mine is None:
                c.execute("INSERT INTO runs (budget, run_id, status, reserved, spent, counted, info, created, "
                          "updated) VALUES (?, ?, 'reserved', ?, '[]', ?, ?, ?, ?)",
                          (name, run_id, _dump(larger_of((), events)), _dump(counted), json.dumps(info or {}), now,
                           now))
            else:
                c.execute("UPDATE runs SET reserved = ?, counted = ?, updated = ? WHERE budget = ? AND run_id = ?",
                          (_dump(larger_of(mine.reserved, events)), _dump(counted), now, name, run_id))
            changed = False
            if data_digest is not None:
                old = c.execute("SELECT data_digest FROM budgets WHERE name = ?", (name,)).fetchone()[0]
                changed = old is not None and old != data_digest
                c.execute("UPDATE budgets SET data_digest = ? WHERE name = ?", (data_digest, name))
                c.execute("UPDATE runs SET data_digest = ? WHERE budget = ? AND run_id = ?",
                          (data_digest, name, run_id))
        if changed:
            print(f"dpimages: warning: the data under budget {name!r} differs from its previous run's (keyed "
                  "digest); the budget belongs to the name and still counts every earlier run", file=sys.stderr)
        return Reservation(name, run_id, tuple(counted), total, budget.epsilon, budget.delta)

    def record(self, name: str, run_id: str, spent: Sequence[PrivacyEvent], *, finished: bool = True) -> Reservation:
        """Record what `run_id` actually spent; its count becomes the larger of its count and `spent`, never less.

        Spends were reserved before their noise was drawn (the ledger's hook), so this cannot refuse: it
        writes what happened, even past the budget.
        """
        with self._write() as c:
            budget = self.budget(name)
            runs = self.runs(name)
            mine = next((r for r in runs if r.run_id == run_id), None)
            now = time.time()
            status = "finished" if finished else "reserved"
            if mine is None:
                counted = larger_of((), spent)
                c.execute("INSERT INTO runs (budget, run_id, status, reserved, spent, counted, info, created, "
                          "updated) VALUES (?, ?, ?, '[]', ?, ?, '{}', ?, ?)",
                          (name, run_id, status, _dump(counted), _dump(counted), now, now))
            else:
                counted = larger_of(mine.counted, spent)
                c.execute("UPDATE runs SET status = ?, spent = ?, counted = ?, updated = ? WHERE budget = ? AND "
                          "run_id = ?", (status, _dump(larger_of((), spent)), _dump(counted), now, name, run_id))
            others = [e for r in runs if r.run_id != run_id for e in r.counted]
        total = epsilon_pld([*others, *counted], budget.delta)
        return Reservation(name, run_id, tuple(counted), total, budget.epsilon, budget.delta)

    # -- reading ---------------------------------------------------------------------------------
    def summary(self, name: str) -> dict[str, Any]:
        """``{"budget", "epsilon_total" (PLD composition), "epsilon_total_rdp", "epsilon_sum" (naive sum of each
        run's epsilon, for comparison), "epsilon_budget", "epsilon_remaining", "delta", "runs"}``."""
        with self._read():
            budget, runs = self.budget(name), self.runs(name)
        events = [e for r in runs for e in r.counted]
        total = epsilon_pld(events, budget.delta)
        return {
            "budget": name,
            "epsilon_total": total,
            "epsilon_total_rdp": epsilon_rdp(events, budget.delta),
            "epsilon_sum": math.fsum(epsilon_pld(r.counted, budget.delta) for r in runs),
            "epsilon_budget": budget.epsilon,
            "epsilon_remaining": max(0.0, budget.epsilon - total),
            "delta": budget.delta,
            "runs": len(runs),
            "accountant": "dp-accounting PLD composition of every run's events (add/remove), at the budget's delta",
        }

    def history(self, name: str) -> list[dict[str, Any]]:
        """One row per run, in order: its events, its own epsilon and the running total (composed) and sum."""
        with self._read():
            budget, runs = self.budget(name), self.runs(name)
        rows, so_far, running_sum = [], [], 0.0
        for i, r in enumerate(runs, 1):
            so_far.extend(r.counted)
            eps = epsilon_pld(r.counted, budget.delta)
            running_sum += eps
            rows.append({
                "index": i, "run_id": r.run_id, "status": r.status, "created": r.created, "updated": r.updated,
                "info": r.info, "events": [e.to_json() for e in r.counted], "epsilon": eps,
                "epsilon_total": epsilon_pld(so_far, budget.delta), "epsilon_sum": running_sum,
            })
        return rows

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` for a sound file)."""
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])
