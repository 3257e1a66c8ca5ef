"""Storage: problem stores (Parquet, Zarr), validation on reading, results.

No Ray and no JAX here: readers hand NumPy :class:`raybary.types.Problem`
objects to the solver and the :class:`~raybary.storage.results.ResultWriter`
takes :class:`raybary.types.Result` objects back. See ``docs/storage.md``.

Main entry points (imported lazily, so ``import raybary.storage`` is cheap):

* :func:`open_store` -> :class:`ProblemStore` with ``.read(start, stop)`` -> :class:`ShardInput`
* :class:`StorageOptions`: fsspec options for a URL (every function that takes
  a URL takes ``storage_options=``), shown by key only
* :func:`convert`, :func:`write_store`, :func:`write_problems`
* the table of formats (name -> store class, writer, URL suffixes) in
  :mod:`raybary.storage.formats`
* :class:`ResultWriter`, :func:`read_results`
* GMM stores (the input of a distance job; Parquet or Zarr): :func:`write_gmms`,
  :func:`generate_gmms`, :func:`open_gmm_store`, :func:`convert_gmms`; its output:
  :func:`read_distances`
* generators in :mod:`raybary.storage.generate`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from raybary.storage.errors import ResultsConflictError, StoreDataError, StoreFormatError

_LAZY = {
    "open_store": "raybary.storage.store",
    "StorageOptions": "raybary.storage.options",
    "detect_format": "raybary.storage.formats",
    "ProblemStore": "raybary.storage.base",
    "ShardInput": "raybary.storage.base",
    "ProblemColumns": "raybary.storage.columns",
    "convert": "raybary.storage.conversion",
    "write_store": "raybary.storage.conversion",
    "write_problems": "raybary.storage.conversion",
    "ResultWriter": "raybary.storage.results",
    "Results": "raybary.storage.results",
    "read_results": "raybary.storage.results",
    "BarycenterNotFoundError": "raybary.storage.results",
    "ParquetProblemStore": "raybary.storage.parquet_store",
    "ZarrProblemStore": "raybary.storage.zarr_store",
    "PARQUET_FORMAT_ID": "raybary.storage.parquet_store",
    "ZARR_FORMAT_ID": "raybary.storage.zarr_store",
    "GMMStore": "raybary.storage.gmm_store",
    "ZarrGMMStore": "raybary.storage.gmm_store",
    "convert_gmms": "raybary.storage.gmm_store",
    "open_gmm_store": "raybary.storage.gmm_store",
    "write_gmms": "raybary.storage.gmm_store",
    "generate_gmms": "raybary.storage.gmm_store",
    "read_distances": "raybary.storage.results.distances",
    "Distances": "raybary.storage.results.distances",
}

__all__ = ["StoreFormatError", "StoreDataError", "ResultsConflictError", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from raybary.storage.base import ProblemStore, ShardInput
    from raybary.storage.columns import ProblemColumns
    from raybary.storage.conversion import convert, write_problems, write_store
    from raybary.storage.formats import detect_format
    from raybary.storage.gmm_store import (
        GMMStore,
        ZarrGMMStore,
        convert_gmms,
        generate_gmms,
        open_gmm_store,
        write_gmms,
    )
    from raybary.storage.options import StorageOptions
    from raybary.storage.parquet_store import PARQUET_FORMAT_ID, ParquetProblemStore
    from raybary.storage.results import (
        BarycenterNotFoundError,
        Results,
        ResultWriter,
        read_results,
    )
    from raybary.storage.results.distances import Distances, read_distances
    from raybary.storage.store import open_store
    from raybary.storage.zarr_store import ZARR_FORMAT_ID, ZarrProblemStore


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raybary.storage' has no attribute {name!r}")
