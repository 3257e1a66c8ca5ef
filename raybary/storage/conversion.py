"""Write problem stores from batches, and convert between formats.

Both go through :func:`write_store`, which writes to a temporary sibling and
moves it into place at the end: a refused or crashed conversion leaves
nothing behind, and an existing output is only replaced with ``overwrite``.
The output's format (its writer) comes from the table in
:mod:`~raybary.storage.formats`; :func:`output_format` is re-exported from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from raybary.storage import _fs
from raybary.storage.base import ProblemStore
from raybary.storage.columns import ProblemColumns, check_covariance_type
from raybary.storage.errors import StoreDataError
from raybary.storage.formats import output_format, store_format
from raybary.storage.store import open_store
from raybary.types import Problem
from raybary.validation import join_messages

__all__ = ["write_store", "write_problems", "convert", "output_format"]

#: Problems per block when converting.
BLOCK_PROBLEMS = 65536


def write_store(
    url: str,
    batches: Iterable[ProblemColumns],
    *,
    overwrite: bool = False,
    dim: int | None = None,
    chunk_problems: int | None = None,
    progress: Callable[[int], None] | None = None,
    covariance_type: str = "full",
    storage_options: Mapping[str, Any] | None = None,
) -> ProblemStore:
    """Write batches (ids ascending across batches) to a new store and open it.

    The format comes from the suffix: ``*.parquet`` writes one Parquet file
    (row groups of 65,536 rows), ``*.zarr`` a Zarr store (``chunk_problems``
    problems per chunk, default 8192). ``covariance_type`` is the form the
    covariances are stored in: ``"full"`` (``d*d`` values, column/array
    ``cov``), ``"diag"`` (the ``d`` variances, ``cov_diag``) or
    ``"spherical"`` (one variance, ``cov_spherical``); covariances that the
    form cannot hold (a non-zero off-diagonal entry for ``diag``, variances
    that differ for ``spherical``) are refused, naming the first such
    component, and nothing is written. Batches with decoding or shape issues
    are refused (:class:`StoreDataError`). ``progress(n)`` is called with the
    number of problems of each batch written. ``storage_options`` go to the
    URL's fsspec filesystem (and stay with the store returned).
    """
    check_covariance_type(covariance_type)
    fmt = store_format(output_format(url))
    with _fs.atomic_output(url, overwrite=overwrite, storage_options=storage_options) as tmp:
        writer = fmt.writer(tmp, dim=dim, chunk_problems=chunk_problems,
                            covariance_type=covariance_type, storage_options=storage_options)
        try:
            for cols in batches:
                _refuse_issues(cols, url)
                writer.write(cols)
                if progress is not None:
                    progress(cols.n_problems)
        except BaseException:
            writer.abort()  # no format attributes / footer: never a valid-looking store
            raise
        writer.close()
    return open_store(url, storage_options=storage_options)


def _refuse_issues(cols: ProblemColumns, url: str) -> None:
    issues = cols.structural_messages()
    if issues:
        messages = [m for k in sorted(issues) for m in issues[k]]
        raise StoreDataError(
            f"cannot write {_fs.redact_url(url)}: {len(issues)} problems cannot be stored as they are "
            f"(fix them first): {join_messages(messages, 10)}"
        )


def write_problems(
    url: str,
    problems: Sequence[Problem],
    problem_ids: Sequence[int] | None = None,
    *,
    overwrite: bool = False,
    covariance_type: str = "full",
    storage_options: Mapping[str, Any] | None = None,
) -> ProblemStore:
    """Write :class:`Problem` objects (ids default to ``0..P-1``, ascending) to a store,
    the covariances in the ``covariance_type`` form (see :func:`write_store`)."""
    cols = ProblemColumns.from_problems(problems, problem_ids)
    order = np.argsort(cols.problem_id, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        cols = cols.take(order)
    return write_store(url, [cols], overwrite=overwrite, covariance_type=covariance_type,
                       storage_options=storage_options)


def convert(
    src: str | ProblemStore,
    dst: str,
    *,
    overwrite: bool = False,
    block_problems: int = BLOCK_PROBLEMS,
    chunk_problems: int | None = None,
    progress: Callable[[int], None] | None = None,
    covariance_type: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
) -> ProblemStore:
    """Convert a problem store to another format (or re-chunk / sort it, or
    change the form its covariances are stored in).

    ``src`` (a URL or an open store) is opened, and its schema checked,
    before anything is written. The
    data stream through in blocks of ``block_problems``: memory is bounded by
    a block. Parquet to Zarr needs one dimension ``d`` in the whole store;
    problems that the output cannot hold (nulls, means of the wrong length,
    lambdas that differ within a GMM; for Parquet output, problems without
    GMMs) are refused with their messages, and nothing is written.
    ``covariance_type`` (``"full"``, ``"diag"``, ``"spherical"``; default:
    the input's) is the output's covariance form: a diagonal store converts
    to full losslessly, full to diagonal only if every off-diagonal entry is
    zero (else the first offending component is named and nothing is written).
    ``storage_options`` go to the filesystems of ``src`` (a URL) and
    ``dst`` (default for ``dst``: those ``src``, an open store, was opened
    with); ``output_storage_options``, if given, to ``dst``'s instead (not
    merged: e.g. another bucket's credentials).
    """
    store = src if isinstance(src, ProblemStore) else open_store(
        src, storage_options=storage_options)
    covariance_type = check_covariance_type(covariance_type or store.covariance_type)
    if _fs.strip_url(store.url) == _fs.strip_url(dst):
        raise ValueError("convert: the output must differ from the input")
    output_format(dst)
    batches = (cols for _, _, cols in store.iter_columns(block_problems))
    out_options = (output_storage_options if output_storage_options is not None
                   else storage_options if storage_options is not None else store.storage_options)
    return write_store(dst, batches, overwrite=overwrite, dim=store.dim,
                       chunk_problems=chunk_problems, progress=progress,
                       covariance_type=covariance_type, storage_options=out_options)
