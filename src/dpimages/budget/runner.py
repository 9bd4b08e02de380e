"""What the fit runner calls to put a run's releases under a budget outside the run: the book, or a larger plan.

`fit_run(..., budget=...)` takes a budget name (the owner's book, `BookBudget`) or any `RunBudget`. The
runner calls, in this order:

1. `open_run_budget` before the data is loaded (bad input exits 2 with nothing written);
2. ``check(dataset_size)`` once the public N is known, before the run directory exists;
3. ``attach(ledger, run, private, resume)`` right after the run's ledger is made or loaded, before the
   method's fit: from then on every reservation of the ledger (and every spend beyond its reservations)
   is also reserved outside, through the ledger's ``on_reserve`` hook, before anything is released;
4. ``finish(ledger)`` after the fit, before privacy.json is written for the last time: its dict (or None)
   goes into privacy.json under ``budget_book`` and into the report.

A refusal (BudgetExceeded, exit 3) in step 3 happens inside the ledger's ``reserve``, before the method's
first release, so the runner's usual clean-up applies: nothing was released, the new run directory is
removed, and the book wrote nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from dpimages.budget.book import BudgetBook, check_name
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger, validate_budget
from dpimages.runs import Run

RUN_ID_FILE = "budget-book.json"  # under checkpoints/ (owner only): the run's id and budget name in the book


class RunBudget(Protocol):
    """A budget outside the run that its ledger's reservations must also fit (see the module docstring)."""

    def check(self, dataset_size: int) -> None: ...

    def attach(self, ledger: PrivacyLedger, run: Run, private: ImageData, resume: bool) -> None: ...

    def finish(self, ledger: PrivacyLedger) -> dict[str, Any] | None: ...


def _inside(path: Path, folder: str | os.PathLike) -> bool:
    folder_abs = Path(os.path.abspath(folder))
    return folder_abs == path or folder_abs in path.parents


class BookBudget:
    """A run's account in the owner's budget book under the name `name` (see `dpimages.budget.book`).

    The run's id is a random UUID written to ``checkpoints/budget-book.json`` when the run starts, so that
    ``--resume`` reserves under the same id (its reservation is reused, never counted twice), and a run
    started without a book and resumed with one is counted in full (what it already spent included).
    """

    def __init__(self, name: str, book: str | os.PathLike | None = None,
                 run_dir: str | os.PathLike | None = None) -> None:
        check_name(name)
        self.book = BudgetBook(book)  # an existing book only: InputError, nothing created
        self.budget = self.book.budget(name)  # InputError for an unknown name
        if run_dir is not None and _inside(self.book.path, run_dir):
            raise InputError(f"budget book {self.book.path} lies inside the run directory {run_dir}: run "
                             "directories are shared, the book is owner only; keep it outside")
        self.name = name
        self.run_id = ""
        self._digest: str | None = None

    def check(self, dataset_size: int) -> None:
        """InputError unless the name's delta suits this data set (delta < 1/N): its total is stated at that delta."""
        try:
            validate_budget(self.budget.epsilon, self.budget.delta, dataset_size)
        except InputError as e:
            raise InputError(f"budget {self.name!r}: {e} (set a smaller delta with `dpimages budget set`)") from None

    def attach(self, ledger: PrivacyLedger, run: Run, private: ImageData, resume: bool) -> None:
        """Take or reuse the run's id, then hook the ledger to the book (module docstring, step 3)."""
        path = run.checkpoint_dir / RUN_ID_FILE
        saved = json.loads(path.read_text()) if resume and path.exists() else None
        if saved is not None and saved.get("budget") != self.name:
            raise InputError(f"--resume: {run.path} was started under budget {saved.get('budget')!r}, not "
                             f"{self.name!r}")
        run_id = saved["run_id"] if saved else uuid.uuid4().hex
        if saved is None and run.writer:
            run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"budget": self.name, "run_id": run_id}))
            os.replace(tmp, path)
        info = {"method": run.read_config().get("method", ""), "run_dir": str(run.path.resolve()),
                "epsilon": ledger.epsilon_budget, "delta": ledger.delta}
        self.attach_ledger(ledger, run_id, private, info)

    def attach_ledger(self, ledger: PrivacyLedger, run_id: str, private: ImageData, info: dict[str, Any]) -> None:
        """Hook `ledger` to the book under `run_id`; a ledger that already holds events (a resumed run) reserves
        them at once, so what was spent before the book knew the run is counted before anything more runs."""
        self.run_id = run_id
        self._digest = self.book.data_digest(private.keyed_digest)

        def reserve(plan: list[PrivacyEvent]) -> None:
            self.book.reserve(self.name, run_id, plan, data_digest=self._digest, info=info)

        ledger.on_reserve = reserve
        if ledger.events:
            reserve(list(ledger.events))

    def finish(self, ledger: PrivacyLedger) -> dict[str, Any]:
        """Record the run's spend (its count never drops below its reservation); the name's totals after it."""
        self.book.record(self.name, self.run_id, ledger.events)
        return {**self.book.summary(self.name), "run_id": self.run_id}


def prefixed_events(events: list[PrivacyEvent], prefix: str) -> list[PrivacyEvent]:
    """`events` with their labels prefixed by ``PREFIX: ``: one stage's releases, distinct from another stage's."""
    return [replace(e, label=f"{prefix}: {e.label}") for e in events]


class StageBudget:
    """A run that is one stage of a larger plan reserved in `parent` (the tuning ledger): every reservation of
    the run is reserved in `parent` too, with its labels prefixed by ``PREFIX: `` so that stages with the same
    releases stay distinct there. `parent` refuses a stage that would go beyond its plan and budget."""

    def __init__(self, parent: PrivacyLedger, prefix: str) -> None:
        self.parent = parent
        self.prefix = prefix

    def check(self, dataset_size: int) -> None:
        return None

    def attach(self, ledger: PrivacyLedger, run: Run, private: ImageData, resume: bool) -> None:
        ledger.on_reserve = lambda plan: self.parent.reserve(*prefixed_events(plan, self.prefix))

    def finish(self, ledger: PrivacyLedger) -> None:
        return None


def open_run_budget(budget: str | RunBudget | None, book: str | os.PathLike | None,
                    run_dir: str | os.PathLike, world_size: int = 1) -> RunBudget | None:
    """The run's outside budget from `fit_run`'s arguments (module docstring, step 1); InputError on bad input."""
    if budget is None:
        if book is not None:
            raise InputError("--budget-book needs --budget NAME (the data set's name in the book)")
        return None
    if world_size > 1:
        raise InputError("--budget is not supported under torchrun yet (only rank 0 could consult the book); fit "
                         "in one process, or without --budget")
    if isinstance(budget, str):
        return BookBudget(budget, book, run_dir)
    return budget
