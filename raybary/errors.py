"""The base class of raybary's user-facing errors.

An error a user can act on (a bad store, an output of other options, an
unreachable cluster, a job that could not finish, ...) is a
:class:`RaybaryError`: its message says what is wrong and what to do, and its
:attr:`~RaybaryError.exit_code` is the command line's exit status for it (the
CLI prints ``Error: <message>``, without a traceback). Catch
``raybary.RaybaryError`` to handle all of them at once.

Exit codes, as the CLI has always used them: 1 when a run or its data failed,
2 for a bad command line or bad options (:class:`OptionsError`).

Several subclasses also derive from :class:`ValueError` (the storage errors,
:class:`OptionsError`, ...), so code that catches ``ValueError`` keeps working.
Importing this module imports nothing else (the CLI and the storage layer use it).
"""

from __future__ import annotations

__all__ = ["RaybaryError", "OptionsError", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_FAILED = 1  # a run or its data failed
EXIT_USAGE = 2  # a bad command line or bad options (click's own exit status for these)


class RaybaryError(Exception):
    """An error for the user: its message is shown as is; :attr:`exit_code` is the CLI's
    exit status for it."""

    exit_code: int = EXIT_FAILED


class OptionsError(RaybaryError, ValueError):
    """Options that cannot be used together or are out of range (exit status 2)."""

    exit_code = EXIT_USAGE
