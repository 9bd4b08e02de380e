"""Errors that the command line turns into exit codes.

`InputError` (exit 2): bad input or usage, reported as one line on stderr.
`BudgetExceeded` (exit 3): a release would exceed the privacy budget; raised
before any noise is drawn or private data is touched by that release.
Messages name parameters, shapes and dtypes, never private values.
"""

from __future__ import annotations


class DPImagesError(Exception):
    """Base class of dpimages' own errors."""

    exit_code = 1


class InputError(DPImagesError, ValueError):
    """Bad input: missing file, wrong shape or dtype, invalid parameter."""

    exit_code = 2


class BudgetExceeded(DPImagesError):
    """A release was refused because it would exceed the privacy budget."""

    exit_code = 3
