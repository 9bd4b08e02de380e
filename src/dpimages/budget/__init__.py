"""One privacy budget per data set across runs (the owner's budget book), and private tuning.

`BudgetBook` (`book.py`) is the SQLite book itself; `BookBudget` and `StageBudget` (`runner.py`) are what
`fit_run(..., budget=...)` uses to reserve a run's releases outside the run; `dpimages.tune` tunes a
method's settings on private data and pays for it. Names are imported on first use, so that the command line
(`dpimages.budget_cli`) starts without the accountant.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "BudgetBook": "book", "Reservation": "book", "default_book_path": "book",
    "BookBudget": "runner", "RunBudget": "runner", "StageBudget": "runner", "open_run_budget": "runner",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'dpimages.budget' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dpimages.budget.{_NAMES[name]}"), name)
