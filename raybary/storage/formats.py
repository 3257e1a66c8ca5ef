"""The table of problem-store formats: the one place that maps a format to its code.

Each :class:`StoreFormat` says how a URL of that format is recognised (its
suffixes, and a probe for a directory named otherwise), which
:class:`~raybary.storage.base.ProblemStore` class opens it and which writer
writes it. :func:`~raybary.storage.store.open_store` and
:mod:`~raybary.storage.conversion` both go through :data:`FORMATS`, so a
format is added (or a rule changed) here and nowhere else.

Dependencies run one way: :mod:`~raybary.storage.base` <- the format modules
(:mod:`~raybary.storage.parquet_store`, :mod:`~raybary.storage.zarr_store`)
<- this table <- :mod:`~raybary.storage.store` and
:mod:`~raybary.storage.conversion`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fsspec import AbstractFileSystem

from raybary.storage import _fs
from raybary.storage.base import ProblemStore
from raybary.storage.columns import ProblemColumns
from raybary.storage.errors import StoreFormatError
from raybary.storage.parquet_store import (
    PARQUET_FORMAT_ID,
    ParquetProblemStore,
    ParquetProblemWriter,
)
from raybary.storage.zarr_store import (
    CHUNK_PROBLEMS,
    ZARR_FORMAT_ID,
    ZarrProblemStore,
    ZarrProblemWriter,
)

__all__ = [
    "ProblemWriter",
    "StoreFormat",
    "FORMATS",
    "store_format",
    "format_from_name",
    "detect_format",
    "output_format",
    "naming_hint",
]


class ProblemWriter(Protocol):
    """What :func:`~raybary.storage.conversion.write_store` needs of a format's writer."""

    def write(self, cols: ProblemColumns) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class StoreFormat:
    """One problem-store format.

    Attributes:
      name: the short name (``"parquet"``, ``"zarr"``).
      format_id: the versioned format id written into and checked on stores.
      suffixes: URL suffixes (lower case) that name this format.
      describe: what such a URL points at, for messages.
      store: the :class:`ProblemStore` class that opens it
        (``store(url, storage_options)``).
      writer: ``writer(url, dim=..., chunk_problems=..., covariance_type=...,
        storage_options=...)`` -> a new writer (``covariance_type`` ``"full"``,
        ``"diag"`` or ``"spherical"``: the form the covariances are stored in).
      holds: ``holds(fs, path)``: whether a directory without a suffix is of
        this format (probes run in :data:`FORMATS` order).
    """

    name: str
    format_id: str
    suffixes: tuple[str, ...]
    describe: str
    store: type[ProblemStore]
    writer: Callable[..., ProblemWriter]
    holds: Callable[[AbstractFileSystem, str], bool]


def _parquet_writer(url: str, *, dim: int | None = None, chunk_problems: int | None = None,
                    covariance_type: str = "full",
                    storage_options: Mapping[str, Any] | None = None) -> ProblemWriter:
    # one dimension or many; row groups, not chunks
    return ParquetProblemWriter(url, covariance_type=covariance_type,
                                storage_options=storage_options)


def _zarr_writer(url: str, *, dim: int | None = None, chunk_problems: int | None = None,
                 covariance_type: str = "full",
                 storage_options: Mapping[str, Any] | None = None) -> ProblemWriter:
    return ZarrProblemWriter(url, dim=dim, chunk_problems=chunk_problems or CHUNK_PROBLEMS,
                             covariance_type=covariance_type, storage_options=storage_options)


def _holds_zarr(fs: AbstractFileSystem, path: str) -> bool:
    return bool(fs.exists(path + "/zarr.json"))


def _holds_parquet(fs: AbstractFileSystem, path: str) -> bool:
    return bool(fs.glob(path + "/**/*.parquet"))


#: The formats by name. Directory probes run in this order: a ``zarr.json`` is
#: exact, a ``*.parquet`` file anywhere below is the fallback.
FORMATS: dict[str, StoreFormat] = {
    "zarr": StoreFormat("zarr", ZARR_FORMAT_ID, (".zarr",), "", ZarrProblemStore,
                        _zarr_writer, _holds_zarr),
    "parquet": StoreFormat("parquet", PARQUET_FORMAT_ID, (".parquet", ".pq"),
                           "a Parquet file or a directory of Parquet files",
                           ParquetProblemStore, _parquet_writer, _holds_parquet),
}


def naming_hint() -> str:
    """How to name a store so that its format is known (ends every "cannot tell" message)."""
    named = " or ".join(f"*{FORMATS[k].suffixes[0]}" for k in sorted(FORMATS))
    details = "; ".join(
        f"{', '.join('*' + s for s in f.suffixes)}: "
        + (f"{f.describe}, " if f.describe else "") + f"format {f.format_id}"
        for f in (FORMATS[k] for k in sorted(FORMATS)))
    return f"name it {named} ({details})"


def store_format(name: str) -> StoreFormat:
    """The table entry of format ``name``; :class:`StoreFormatError` for an unknown one."""
    try:
        return FORMATS[name]
    except KeyError:
        raise StoreFormatError(
            f"unknown problem-store format {name!r}: known formats are "
            f"{', '.join(sorted(FORMATS))}; {naming_hint()}") from None


def format_from_name(url: str) -> str | None:
    """The format whose suffix ends ``url``, or ``None``."""
    name = _fs.strip_url(str(url)).lower()
    for fmt in FORMATS.values():
        if name.endswith(fmt.suffixes):
            return fmt.name
    return None


def detect_format(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The format of an existing store: from the URL's suffix, or a directory's contents.

    ``*.parquet`` / ``*.pq`` (a file or a directory of Parquet files) is
    Parquet, ``*.zarr`` is Zarr; another directory is Zarr if it holds a
    ``zarr.json`` and Parquet if it holds ``*.parquet`` files (looked at
    with ``storage_options``). Raises :class:`StoreFormatError` otherwise.
    """
    name = format_from_name(url)
    if name is not None:
        return name
    fs, path = _fs.url_to_fs(url, storage_options)
    if fs.isdir(path):
        for fmt in FORMATS.values():
            if fmt.holds(fs, path):
                return fmt.name
    raise StoreFormatError(f"cannot tell the format of {url}: {naming_hint()}")


def output_format(url: str) -> str:
    """The format of a store to be written, from the URL's suffix.

    Raises :class:`StoreFormatError` (a ``ValueError``) if no suffix matches.
    """
    name = format_from_name(url)
    if name is None:
        raise StoreFormatError(f"cannot tell the output format of {url}: {naming_hint()}")
    return name
