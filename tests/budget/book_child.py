"""Child processes for tests/budget (not a test module): a racing reservation, and a writer that gets SIGKILLed.

    python book_child.py race BOOK NAME RUN_ID NOISE_MULTIPLIER GO_FILE [unsafe]
    python book_child.py writer BOOK NAME

``race`` prints ``ready``, waits for GO_FILE, reserves one Gaussian release and prints ``ok`` or ``refused``.
Its composition is slowed down by one second (so both processes are surely inside `reserve` at once);
``unsafe`` is the mutation that removes the safeguard: `reserve` runs without its BEGIN IMMEDIATE
transaction. ``writer`` reserves run w0, w1, ... in a loop and prints each id once `reserve` has returned.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dpimages.budget.book as book_module
from dpimages.budget.book import BudgetBook
from dpimages.errors import BudgetExceeded
from dpimages.privacy import PrivacyEvent


def race(book_path: str, name: str, run_id: str, nm: float, go: str, unsafe: bool) -> None:
    slow = book_module.epsilon_pld

    def slow_pld(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(1.0)
        return slow(*args, **kwargs)

    book_module.epsilon_pld = slow_pld
    book = BudgetBook(book_path)
    if unsafe:
        @contextmanager
        def no_transaction():  # noqa: ANN202
            yield book._conn

        book._write = no_transaction
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    try:
        book.reserve(name, run_id, [PrivacyEvent.gaussian(nm, 1, "race")])
        print("ok", flush=True)
    except BudgetExceeded:
        print("refused", flush=True)


def writer(book_path: str, name: str) -> None:
    book = BudgetBook(book_path)
    i = 0
    while True:
        book.reserve(name, f"w{i}", [PrivacyEvent.gaussian(50.0, 1, "loop")])
        print(f"w{i}", flush=True)
        i += 1


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "race":
        race(rest[0], rest[1], rest[2], float(rest[3]), rest[4], len(rest) > 5 and rest[5] == "unsafe")
    elif mode == "writer":
        writer(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
