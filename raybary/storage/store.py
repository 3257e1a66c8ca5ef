"""Problem stores: open a Parquet or Zarr store and read shards of it.

:func:`open_store` is the entry point of the runner::

    store = open_store("s3://bucket/batch.zarr")     # schema checked here
    shard = store.read(2000, 3000)                   # problems 2000..2999 in store order
    for pid, problem, error in zip(shard.problem_ids, shard.problems, shard.errors):
        ...                                          # problem is None where error is set

A store object holds the URL and small metadata only, so it pickles cheaply
(it is sent to Ray actors, each of which then reads its own shards).

This module owns opening a URL; the interface (:class:`ProblemStore`,
:class:`ShardInput`) lives in :mod:`~raybary.storage.base` and the table of
formats (which class opens which URL) in :mod:`~raybary.storage.formats`.
Both are re-exported here, so ``raybary.storage.store.ProblemStore`` and
``raybary.storage.store.detect_format`` keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raybary.storage import _fs
from raybary.storage.base import ProblemStore, ShardInput
from raybary.storage.formats import detect_format, store_format
from raybary.storage.options import StorageOptions

__all__ = ["ShardInput", "ProblemStore", "open_store", "detect_format"]


def open_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> ProblemStore:
    """Open a problem store; its schema is checked here, before any work starts.

    ``storage_options`` go to the URL's fsspec filesystem (e.g.
    ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for ``s3://``; see
    :class:`~raybary.storage.options.StorageOptions`); the store keeps them,
    so its reads (and the actors it is sent to) use them too.

    The format comes from the suffix or the directory's contents (see
    :func:`~raybary.storage.formats.detect_format`). Raises
    ``FileNotFoundError`` if nothing is there and
    :class:`~raybary.storage.errors.StoreFormatError` (listing what is wrong
    and what was expected) if the format cannot be told, or the schema,
    format name or version is wrong.
    """
    url = _fs.strip_url(str(url))
    options = StorageOptions.of(storage_options)
    fs, path = _fs.url_to_fs(url, options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no problem store at {_fs.redact_url(url)}")
    return store_format(detect_format(url, options)).store(url, options)
