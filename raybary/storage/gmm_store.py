"""GMM stores, ``raybary.gmms.parquet/1``: many GMMs, one row per component.

The input of a distance job (``raybary distances``): the problem store's long
format one level down. Columns::

    gmm_id int64, weight float64, mean list<float64> (d values),
    and exactly one covariance column, as in a problem store:
      cov           list<float64> (d*d values, row-major)   full covariances
      cov_diag      list<float64> (d values, the variances)  diagonal ones
      cov_spherical float64 (one variance; C = v * I)        spherical ones

A GMM's components are its rows in file order; store order is ascending
``gmm_id``. The same rules as a problem store apply, because the same code
reads it: :class:`GMMStore` is a
:class:`~raybary.storage.parquet_store.ParquetProblemStore` whose rows are
read as problems of one GMM each (``problem_id = gmm_id``, ``gmm = 0``,
``lambda = 1``). Any integer or floating types and list types are accepted,
a pandas index is ignored, any other column is refused; range reads touch
only the row groups that hold them; each GMM is validated by
:mod:`raybary.validation`'s rules on reading, and its messages name it
(``gmm 17, component 2: ...``).

Write one with :func:`write_gmms` (from :class:`raybary.GMM` objects, e.g.
``GMM.from_sklearn(model)``) or :func:`generate_gmms` (``raybary generate
OUT --gmms N``). Zarr GMM stores are not supported (yet): a distance job's
input is small next to its output.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.columns import (
    COVARIANCE_FIELDS,
    ProblemColumns,
    check_covariance_type,
    segment_indices,
)
from raybary.storage.errors import StoreDataError, StoreFormatError
from raybary.storage.options import StorageOptions
from raybary.storage.parquet_store import (
    _COV_ARROW,
    _TYPE_RULES,
    FORMAT_KEY,
    ROW_GROUP_ROWS,
    VERSION_KEY,
    ParquetProblemStore,
    _covariance_problems,
    _normalise,
    _type_problems,
    columns_to_table,
    pandas_index_columns,
)
from raybary.types import GMM, Problem

__all__ = [
    "GMM_FORMAT",
    "GMM_VERSION",
    "GMM_FORMAT_ID",
    "GMMStore",
    "GMMShard",
    "gmm_schema",
    "gmm_schema_problems",
    "gmm_message",
    "open_gmm_store",
    "write_gmms",
    "generate_gmms",
]

GMM_FORMAT = "raybary.gmms.parquet"
GMM_VERSION = 1
GMM_FORMAT_ID = f"{GMM_FORMAT}/{GMM_VERSION}"
GMM_BASE_COLUMNS = ("gmm_id", "weight", "mean")
EXPECTED = (
    "expected columns: gmm_id int64, weight float64, mean list<float64> (d values), and one "
    "covariance column: cov list<float64> (d*d values, row-major), cov_diag list<float64> "
    "(d variances) or cov_spherical float64 (one variance); one row per component"
)
_RULES = {"gmm_id": (pa.types.is_integer, "int64 (any integer type is accepted)"),
          "weight": _TYPE_RULES["weight"], "mean": _TYPE_RULES["mean"]}


def gmm_schema(covariance_type: str = "full") -> pa.Schema:
    """The canonical Arrow schema of a GMM store of ``covariance_type`` covariances."""
    check_covariance_type(covariance_type)
    return pa.schema(
        [("gmm_id", pa.int64()), ("weight", pa.float64()), ("mean", pa.list_(pa.float64())),
         (COVARIANCE_FIELDS[covariance_type], _COV_ARROW[covariance_type])],
        metadata={FORMAT_KEY: GMM_FORMAT.encode(), VERSION_KEY: str(GMM_VERSION).encode()},
    )


def gmm_schema_problems(schema: pa.Schema) -> list[str]:
    """What is wrong with ``schema`` for a GMM store (empty if nothing)."""
    problems = []
    meta = schema.metadata or {}
    if FORMAT_KEY in meta:
        name = meta.get(FORMAT_KEY, b"?").decode()
        version = meta.get(VERSION_KEY, b"?").decode()
        if name != GMM_FORMAT or version != str(GMM_VERSION):
            problems.append(f"metadata says format {name!r} version {version}, expected "
                            f"{GMM_FORMAT!r} version {GMM_VERSION}")
    problems += _type_problems(schema, _RULES)
    problems += _covariance_problems(schema)
    index = pandas_index_columns(schema)
    known = (*GMM_BASE_COLUMNS, *COVARIANCE_FIELDS.values())
    unknown = [n for n in schema.names if n not in known and n not in index]
    if unknown:
        problems.append("unknown column" + ("s " if len(unknown) > 1 else " ")
                        + ", ".join(repr(n) for n in unknown)
                        + " (a GMM store has gmm_id, weight, mean and one covariance column)")
    if "problem_id" in schema.names:
        problems.append("this looks like a problem store (raybary.problems.parquet): a distance "
                        "job takes a GMM store, one row per component of each GMM; write one "
                        "with raybary.storage.write_gmms or `raybary generate OUT --gmms N`")
    return problems


def _as_problem_rows(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """GMM rows as rows of the problem long format: one problem per GMM
    (``problem_id = gmm_id``, ``gmm = 0``, ``lambda = 1``), cast to its types."""
    n = batch.num_rows
    cov = next(c for c in COVARIANCE_FIELDS.values() if c in batch.schema.names)
    table = pa.table({"problem_id": batch.column("gmm_id"),
                      "gmm": pa.array(np.zeros(n, np.int32)),
                      "lambda": pa.array(np.ones(n)),
                      "weight": batch.column("weight"), "mean": batch.column("mean"),
                      cov: batch.column(cov)})
    return _normalise(table)


_PROBLEM_GMM0 = re.compile(r"\bproblem (-?\d+), gmm 0\b")
_PROBLEM = re.compile(r"\bproblem (-?\d+)\b")


def gmm_message(message: str | None) -> str | None:
    """A validation message of a one-GMM problem, naming the GMM: ``problem 17,
    gmm 0, component 2: ...`` becomes ``gmm 17, component 2: ...``."""
    if message is None:
        return None
    return _PROBLEM.sub(r"gmm \1", _PROBLEM_GMM0.sub(r"gmm \1", message))


@dataclass
class GMMShard:
    """GMMs read from a store: ``ids`` (int64), the validated :class:`raybary.GMM`
    or ``None`` where invalid, and the messages (``None`` where valid)."""

    ids: np.ndarray
    gmms: list[GMM | None]
    errors: list[str | None]


class GMMStore(ParquetProblemStore):
    """A GMM store (module docstring); positions ``0..n_gmms-1`` in ``gmm_id`` order.

    Opening checks every file's schema and scans ``gmm_id`` once, as a
    problem store's opening scans ``problem_id``; :meth:`read_gmms` reads and
    validates a range, :meth:`positions` looks ids up.
    """

    format = GMM_FORMAT_ID
    ID_COLUMN = "gmm_id"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self._all_ids: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_all_ids"] = None
        return state

    _schema_problems = staticmethod(gmm_schema_problems)
    _normalised = staticmethod(_as_problem_rows)

    @staticmethod
    def _refusal(url: str, problems: list[str]) -> StoreFormatError:
        lines = "\n".join(f"  - {p}" for p in problems)
        return StoreFormatError(f"{url} is not a valid raybary GMM store ({GMM_FORMAT_ID}):\n"
                                f"{lines}\n{EXPECTED}")

    @staticmethod
    def _base_columns() -> tuple[str, ...]:
        return GMM_BASE_COLUMNS

    @property
    def n_gmms(self) -> int:
        return self.n_problems

    def read_gmms(self, start: int, stop: int, *, dtype: str = "float64") -> GMMShard:
        """The GMMs at positions ``start:stop``, validated for a solve in ``dtype``."""
        shard = self.read(start, stop, dtype=dtype)
        return GMMShard(shard.problem_ids,
                        [None if p is None else p.gmms[0] for p in shard.problems],
                        [gmm_message(e) for e in shard.errors])

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The store positions of ``ids`` (-1 where an id is not in the store).
        The first call reads every id (8 bytes a GMM) and keeps them."""
        if self._all_ids is None:
            self._all_ids = self.problem_ids()
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._all_ids, ids)
        pos = np.minimum(pos, max(len(self._all_ids) - 1, 0))
        found = len(self._all_ids) > 0
        hit = (self._all_ids[pos] == ids) if found else np.zeros(len(ids), bool)
        return np.where(hit, pos, -1).astype(np.int64)


def open_gmm_store(url: str, *,
                   storage_options: Mapping[str, Any] | None = None) -> GMMStore:
    """Open a GMM store (a Parquet file or directory); its schema is checked here.

    Raises ``FileNotFoundError`` if nothing is there and
    :class:`~raybary.storage.errors.StoreFormatError` naming what is wrong
    otherwise (a Zarr URL: not supported).
    """
    url = _fs.strip_url(str(url))
    options = StorageOptions.of(storage_options)
    if url.rstrip("/").lower().endswith(".zarr"):
        raise StoreFormatError(f"{_fs.redact_url(url)}: GMM stores are Parquet "
                               f"({GMM_FORMAT_ID}); a Zarr GMM store is not supported")
    fs, path = _fs.url_to_fs(url, options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no GMM store at {_fs.redact_url(url)}")
    return GMMStore(url, options)


# ------------------------------------------------------------------ writing
def gmm_table(cols: ProblemColumns, covariance_type: str = "full") -> pa.Table:
    """The GMM-store rows of a batch whose problems are one GMM each (the
    problem ids are the GMM ids), covariances in the ``covariance_type`` column."""
    rows = columns_to_table(cols, covariance_type)
    cov = COVARIANCE_FIELDS[covariance_type]
    return pa.Table.from_arrays([rows.column("problem_id"), rows.column("weight"),
                                 rows.column("mean"), rows.column(cov)],
                                schema=gmm_schema(covariance_type))


def _write_table(url: str, table: pa.Table, overwrite: bool,
                 options: StorageOptions) -> None:
    """Write ``table`` as one Parquet file at ``url`` (refusing an existing one
    unless ``overwrite``)."""
    fs, path = _fs.url_to_fs(url, options)
    if fs.exists(path):
        if not overwrite:
            raise FileExistsError(f"{_fs.redact_url(url)} exists; pass overwrite=True "
                                  "(--overwrite) to replace it")
        fs.rm(path, recursive=True)
    parent = posixpath.dirname(path)
    if parent:
        with contextlib.suppress(FileExistsError):
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS, compression="zstd")


def write_gmms(url: str, gmms: Sequence[GMM], ids: Sequence[int] | None = None, *,
               covariance_type: str = "full", overwrite: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> GMMStore:
    """Write ``gmms`` (:class:`raybary.GMM` objects, e.g. ``GMM.from_sklearn(m)``)
    to a GMM store at ``url`` (``*.parquet``); return it opened.

    ``ids`` are the GMMs' ids (distinct integers; default ``0..len-1``): the
    distance job's output names pairs by them. Rows are written in ``gmm_id``
    order. ``covariance_type`` ``"diag"`` or ``"spherical"`` stores the
    diagonals or the variance, refusing covariances that form cannot hold.
    Values are written as given: they are validated when read.
    """
    gmms = list(gmms)
    for k, g in enumerate(gmms):
        if not isinstance(g, GMM):
            raise TypeError(f"gmms[{k}] must be a raybary.GMM, got {type(g).__name__} "
                            "(a scikit-learn model goes in as raybary.GMM.from_sklearn(model))")
    ids = np.arange(len(gmms), dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (len(gmms),) or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be {len(gmms)} integers, one per GMM")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        u, counts = np.unique(ids, return_counts=True)
        raise StoreDataError(f"ids must be distinct: {u[counts > 1][:10].tolist()} repeat")
    order = np.argsort(ids, kind="stable")
    cols = ProblemColumns.from_problems([Problem((gmms[k],), np.ones(1)) for k in order],
                                        ids[order])
    options = StorageOptions.of(storage_options)
    _write_table(url, gmm_table(cols, check_covariance_type(covariance_type)), overwrite,
                 options)
    return open_gmm_store(url, storage_options=options)


def generate_gmms(url: str, n_gmms: int, *, dim: int = 2, seed: int = 0,
                  covariance_type: str = "full", overwrite: bool = False,
                  storage_options: Mapping[str, Any] | None = None) -> GMMStore:
    """Write ``n_gmms`` random GMMs (ids ``0..n-1``) to a GMM store at ``url``.

    The GMMs are those of the tutorial family's problems
    (:mod:`raybary.storage.generate`: 2, 3 and 5 components, in turn), in
    order: GMM ``3p + j`` is GMM ``j`` of problem ``p`` of the same ``seed``;
    ``covariance_type`` as :func:`raybary.storage.generate.generate`'s.
    """
    from raybary.storage.generate import project_covariances, tutorial_columns

    if n_gmms < 0:
        raise ValueError("n_gmms must be non-negative")
    cols = tutorial_columns(-(-n_gmms // 3), dim=dim, seed=seed)
    cols = project_covariances(cols, check_covariance_type(covariance_type))
    g = np.arange(n_gmms)
    comps, comp_offset = segment_indices(cols.comp_offset, g)
    sub = ProblemColumns(
        problem_id=g.astype(np.int64), gmm_offset=np.arange(n_gmms + 1, dtype=np.int64),
        gmm_label=np.zeros(n_gmms, np.int32), lambdas=np.ones(n_gmms),
        comp_offset=comp_offset, weight=cols.weight[comps],
        mean_offset=np.arange(len(comps) + 1, dtype=np.int64) * dim,
        mean_values=cols.mean_values.reshape(-1, dim)[comps].reshape(-1),
        cov_offset=np.arange(len(comps) + 1, dtype=np.int64) * dim * dim,
        cov_values=cols.cov_values.reshape(-1, dim * dim)[comps].reshape(-1))
    options = StorageOptions.of(storage_options)
    _write_table(url, gmm_table(sub, covariance_type), overwrite, options)
    return open_gmm_store(url, storage_options=options)
