"""Exceptions of the storage layer (user-facing: :class:`~raybary.errors.RaybaryError`,
and ``ValueError`` as before, exit status 1)."""

from __future__ import annotations

from raybary.errors import RaybaryError

__all__ = ["StoreFormatError", "StoreDataError", "ResultsConflictError", "InputChangedError"]


class StoreFormatError(RaybaryError, ValueError):
    """A store is refused before any work starts: wrong schema, format name or version.

    The message lists everything that is wrong and what was expected.
    """


class StoreDataError(RaybaryError, ValueError):
    """A store's data cannot be represented or is internally inconsistent.

    Raised, for instance, when converting a Parquet store with mixed dimensions
    to Zarr (one ``d`` per store), or when a Zarr store's offsets are corrupt.
    Ordinary bad *values* (NaN, non positive definite covariances, ...) never
    raise: they are reported per problem by :mod:`raybary.validation`.
    """


class ResultsConflictError(RaybaryError, ValueError):
    """An output directory exists and was written with different settings."""


class InputChangedError(ResultsConflictError):
    """The input store changed under a run (or since its results were started):
    its results would mix two inputs, so the run stops."""
