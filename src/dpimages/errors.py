"""Errors that the command line turns into exit codes.

`InputError` (exit 2): bad input or usage, reported as one line on stderr.
`BudgetExceeded` (exit 3): a release would exceed the privacy budget; raised
before any noise is drawn or private data is touched by that release.
Messages name parameters, shapes and dtypes, never private values.
"""

from __future__ import annotations

import os
from pathlib import Path


class DPImagesError(Exception):
    """Base class of dpimages' own errors."""

    exit_code = 1


class InputError(DPImagesError, ValueError):
    """Bad input: missing file, wrong shape or dtype, invalid parameter."""

    exit_code = 2


class BudgetExceeded(DPImagesError):
    """A release was refused because it would exceed the privacy budget."""

    exit_code = 3


def require_empty_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` as a Path when it does not exist or is an empty folder; else InputError (exit 2), nothing written."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{what} {out} exists and is not an empty folder: choose a new one")
    return out
