"""How every command turns the errors a user can act on into ``Error: ...`` and an exit code.

A :class:`~raybary.errors.RaybaryError` is printed as ``Error: <message>``
(no traceback) and the command exits with its ``exit_code``: 1 when the run or
its data failed, 2 for bad options (click then also prints the usage hint, as
it does for its own usage errors). Commands name the built-in exceptions that
are the user's to fix too (e.g. ``FileNotFoundError`` for an input path);
those exit with 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import click

from raybary.errors import EXIT_USAGE, RaybaryError

__all__ = ["user_errors", "as_click_exception"]

F = TypeVar("F", bound=Callable)


def as_click_exception(error: BaseException) -> click.ClickException:
    """The click exception that prints ``error`` as ``Error: ...`` and exits with its code."""
    code = getattr(error, "exit_code", 1)
    if code == EXIT_USAGE:
        return click.UsageError(str(error), ctx=click.get_current_context(silent=True))
    out = click.ClickException(str(error))
    out.exit_code = code
    return out


def user_errors(*also: type[BaseException]) -> Callable[[F], F]:
    """Decorator for a command: :class:`~raybary.errors.RaybaryError` and the
    exceptions in ``also`` become ``Error: ...`` with their exit code."""
    caught = (RaybaryError, *also)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except click.ClickException:
                raise
            except caught as e:
                raise as_click_exception(e) from e

        wrapper.handles_user_errors = True  # type: ignore[attr-defined] - checked by the tests
        return wrapper  # type: ignore[return-value]

    return decorate
