"""The Parquet long format, ``raybary.problems.parquet/1``: one row per component.

Columns (names fixed, since outside tools write them)::

    problem_id int64, gmm int32, lambda float64, weight float64,
    mean list<float64> (d values), and exactly one covariance column:
      cov           list<float64> (d*d values, row-major)   full covariances
      cov_diag      list<float64> (d values, the variances)  diagonal ones
      cov_spherical float64 (one variance; C = v * I)        spherical ones

The covariance column's name says the form (scikit-learn's
``covariance_type``: full, diag, spherical); it is never inferred from
lengths, and a file with two covariance columns, or none, is refused.
Readers expand diagonal and spherical covariances to full matrices
(:meth:`ProblemColumns.with_covariances`).

Any integer type is accepted for ``problem_id`` and ``gmm``, any integer or
floating type for ``lambda``, ``weight`` and ``cov_spherical``, and any list
type (list, large_list, fixed_size_list) of numbers for ``mean``, ``cov`` and
``cov_diag``. Any other
column is refused (a typo such as ``weights`` must not pass silently), except
a pandas index (``__index_level_0__``, or the columns that pandas' metadata
names as its index), which is ignored. The ``lambda`` of a GMM is repeated on
each of its rows.
A GMM's components are its rows in file order; GMMs are ordered by ``gmm``.

Store order is ascending ``problem_id``. Ranges are read without loading the
store: opening scans the ``problem_id`` column once, one row group at a time,
and keeps a few numbers per row group. If the rows are sorted by
``problem_id`` (files in name order, then rows; what raybary writes), a shard
read touches only the row groups that hold it. Otherwise the store keeps the
sorted distinct ids in memory (8 bytes per problem) and a shard read scans the
row groups whose min/max overlap it.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.arrow import list_array
from raybary.storage.base import ProblemStore
from raybary.storage.columns import (
    COVARIANCE_FIELDS,
    COVARIANCE_TYPES,
    ProblemColumns,
    check_covariance_type,
)
from raybary.storage.errors import StoreDataError, StoreFormatError
from raybary.storage.options import StorageOptions
from raybary.validation import fmt_number, where

__all__ = [
    "PARQUET_FORMAT",
    "PARQUET_VERSION",
    "PARQUET_FORMAT_ID",
    "problem_schema",
    "schema_covariance_type",
    "columns_to_table",
    "table_to_columns",
    "schema_problems",
    "ParquetProblemWriter",
    "ParquetProblemStore",
]

PARQUET_FORMAT = "raybary.problems.parquet"
PARQUET_VERSION = 1
PARQUET_FORMAT_ID = f"{PARQUET_FORMAT}/{PARQUET_VERSION}"
FORMAT_KEY = b"raybary.format"
VERSION_KEY = b"raybary.format_version"
BASE_COLUMNS = ("problem_id", "gmm", "lambda", "weight", "mean")
#: The covariance columns, one per form (exactly one of them in a store).
COVARIANCE_COLUMNS = tuple(COVARIANCE_FIELDS[t] for t in COVARIANCE_TYPES)
EXPECTED = (
    "expected columns: problem_id int64, gmm int32, lambda float64, weight float64, "
    "mean list<float64> (d values), and one covariance column: cov list<float64> "
    "(d*d values, row-major), cov_diag list<float64> (d variances) or cov_spherical "
    "float64 (one variance)"
)
_COV_ARROW = {"full": pa.list_(pa.float64()), "diag": pa.list_(pa.float64()),
              "spherical": pa.float64()}
#: Rows per Parquet row group written by raybary.
ROW_GROUP_ROWS = 65536
#: Rows per batch when streaming a row group.
BATCH_ROWS = 65536


def problem_schema(covariance_type: str = "full") -> pa.Schema:
    """The canonical Arrow schema of a store of ``covariance_type`` covariances
    (its column ``cov``, ``cov_diag`` or ``cov_spherical``), with the format
    name and version as metadata."""
    check_covariance_type(covariance_type)
    return pa.schema(
        [
            ("problem_id", pa.int64()),
            ("gmm", pa.int32()),
            ("lambda", pa.float64()),
            ("weight", pa.float64()),
            ("mean", pa.list_(pa.float64())),
            (COVARIANCE_FIELDS[covariance_type], _COV_ARROW[covariance_type]),
        ],
        metadata={FORMAT_KEY: PARQUET_FORMAT.encode(), VERSION_KEY: str(PARQUET_VERSION).encode()},
    )


# ------------------------------------------------------------------ schema
def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_number_list(t: pa.DataType) -> bool:
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return lists and _is_number(t.value_type)


_TYPE_RULES = {
    "problem_id": (pa.types.is_integer, "int64 (any integer type is accepted)"),
    "gmm": (pa.types.is_integer, "int32 (any integer type is accepted)"),
    "lambda": (_is_number, "float64 (any integer or floating type is accepted)"),
    "weight": (_is_number, "float64 (any integer or floating type is accepted)"),
    "mean": (_is_number_list, "list<float64> (any list of numbers is accepted)"),
}
_COV_RULES = {
    "cov": (_is_number_list, "list<float64> (any list of numbers is accepted)"),
    "cov_diag": (_is_number_list, "list<float64> (any list of numbers is accepted)"),
    "cov_spherical": (_is_number, "float64 (any integer or floating type is accepted)"),
}


_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")


def pandas_index_columns(schema: pa.Schema) -> set[str]:
    """Columns that hold a pandas index (written by ``DataFrame.to_parquet``): ignored."""
    names = {n for n in schema.names if _PANDAS_INDEX.match(n)}
    try:
        meta = schema.pandas_metadata or {}
    except (ValueError, TypeError):  # malformed pandas metadata: not our business
        meta = {}
    names |= {c for c in meta.get("index_columns", []) if isinstance(c, str)}
    return names


def unknown_columns(schema: pa.Schema) -> list[str]:
    """Columns that are neither those of the long format nor a pandas index."""
    index = pandas_index_columns(schema)
    known = (*BASE_COLUMNS, *COVARIANCE_COLUMNS)
    return [n for n in schema.names if n not in known and n not in index]


def schema_covariance_type(schema: pa.Schema) -> str | None:
    """The covariance form of a schema (``"full"``, ``"diag"``, ``"spherical"``),
    from the name of its one covariance column; ``None`` if it has none or several."""
    present = [t for t in COVARIANCE_TYPES if COVARIANCE_FIELDS[t] in schema.names]
    return present[0] if len(present) == 1 else None


def _covariance_problems(schema: pa.Schema) -> list[str]:
    """What is wrong with the covariance column: none, several, or a wrong type."""
    present = [n for n in COVARIANCE_COLUMNS if n in schema.names]
    if not present:
        return ["column 'cov' is missing (a store has exactly one covariance column, whose "
                "name says the form: 'cov' for full covariances, 'cov_diag' for diagonal ones, "
                "'cov_spherical' for spherical ones)"]
    if len(present) > 1:
        return [f"columns {' and '.join(repr(n) for n in present)} are both present: a store has "
                "exactly one covariance column, whose name says the form ('cov' full, "
                "'cov_diag' diagonal, 'cov_spherical' spherical); keep one"]
    return _type_problems(schema, {present[0]: _COV_RULES[present[0]]})


def _type_problems(schema: pa.Schema, rules: dict) -> list[str]:
    problems = []
    for name, (ok, expected) in rules.items():
        idx = schema.get_all_field_indices(name)
        if not idx:
            problems.append(f"column {name!r} is missing")
        elif len(idx) > 1:
            problems.append(f"column {name!r} appears {len(idx)} times")
        elif not ok(schema.field(idx[0]).type):
            problems.append(
                f"column {name!r} has type {schema.field(idx[0]).type}, expected {expected}"
            )
    return problems


def schema_problems(schema: pa.Schema) -> list[str]:
    """What is wrong with ``schema`` for the long format (empty if nothing)."""
    problems = []
    meta = schema.metadata or {}
    if FORMAT_KEY in meta or VERSION_KEY in meta:
        name = meta.get(FORMAT_KEY, b"?").decode()
        version = meta.get(VERSION_KEY, b"?").decode()
        if name != PARQUET_FORMAT or version != str(PARQUET_VERSION):
            problems.append(
                f"metadata says format {name!r} version {version}, expected "
                f"{PARQUET_FORMAT!r} version {PARQUET_VERSION}"
            )
    problems += _type_problems(schema, _TYPE_RULES)
    problems += _covariance_problems(schema)
    unknown = unknown_columns(schema)
    if unknown:
        problems.append(
            f"unknown column{'s' if len(unknown) > 1 else ''} "
            + ", ".join(repr(n) for n in unknown)
            + " (only the six columns below are allowed; a pandas index such as "
            "'__index_level_0__' is ignored: drop other columns, or rename them if they are "
            "misspelt)"
        )
    return problems


def _refuse(url: str, problems: list[str]) -> StoreFormatError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return StoreFormatError(
        f"{url} is not a valid raybary Parquet problem store ({PARQUET_FORMAT_ID}):\n"
        f"{lines}\n{EXPECTED}"
    )


# ------------------------------------------------------------------ encode
def columns_to_table(cols: ProblemColumns, covariance_type: str = "full") -> pa.Table:
    """Encode a batch in the long format (one row per component), its
    covariances in the ``covariance_type`` column (``cov``, ``cov_diag``,
    ``cov_spherical``).

    Raises :class:`StoreDataError` for problems the long format cannot hold:
    a problem without GMMs or a GMM without components has no row; and for
    covariances the form cannot hold (non-zero off-diagonal entries for
    ``diag``, unequal variances for ``spherical``: nothing is dropped silently).
    """
    rows_per_gmm = np.diff(cols.comp_offset)
    empty = np.zeros(cols.n_problems, dtype=bool) | (cols.components_per_problem() == 0)
    if cols.n_gmms and np.any(rows_per_gmm == 0):
        gmm_problem = np.repeat(np.arange(cols.n_problems), np.diff(cols.gmm_offset))
        empty[gmm_problem[rows_per_gmm == 0]] = True
    if empty.any():
        raise StoreDataError(
            "the Parquet long format has one row per component and cannot hold a problem "
            f"without GMMs or a GMM without components: problems {cols.problem_id[empty][:10].tolist()}"
        )
    gmm_problem = np.repeat(cols.problem_id, np.diff(cols.gmm_offset))
    cov_offset, cov_values = cols.stored_covariances(covariance_type)
    cov = (pa.array(cov_values, pa.float64()) if cov_offset is None
           else list_array(cov_offset, cov_values))
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(gmm_problem, rows_per_gmm), pa.int64()),
            pa.array(np.repeat(cols.gmm_label, rows_per_gmm).astype(np.int32), pa.int32()),
            pa.array(np.repeat(cols.lambdas, rows_per_gmm), pa.float64()),
            pa.array(cols.weight, pa.float64()),
            list_array(cols.mean_offset, cols.mean_values),
            cov,
        ],
        schema=problem_schema(covariance_type),
    )


# ------------------------------------------------------------------ decode
def _normalise(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """Select the six columns and cast them to the canonical types."""
    target = problem_schema(_covariance_type(batch.schema))
    try:
        arrays = [pc.cast(batch.column(f.name), f.type) for f in target]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise StoreDataError(f"cannot convert the columns to {EXPECTED[18:]}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=target)


def _covariance_type(schema: pa.Schema) -> str:
    covariance_type = schema_covariance_type(schema)
    if covariance_type is None:
        raise StoreDataError("; ".join(_covariance_problems(schema)))
    return covariance_type


def table_to_columns(table: pa.Table) -> ProblemColumns:
    """Decode long-format rows (any order) into a batch, sorted by problem then gmm.

    The covariances come from the table's one covariance column, expanded to
    full matrices (:meth:`ProblemColumns.with_covariances`). Nulls and
    lambdas that differ within a GMM become per-problem issues; a null
    ``problem_id`` raises :class:`StoreDataError`.
    """
    table = _normalise(table)
    covariance_type = _covariance_type(table.schema)
    field = COVARIANCE_FIELDS[covariance_type]
    n = table.num_rows
    if table.column("problem_id").null_count:
        raise StoreDataError("column 'problem_id' has null values; every row needs a problem id")
    pid = table.column("problem_id").to_numpy()
    gmm_null = _nulls(table.column("gmm"))
    gmm = table.column("gmm").fill_null(np.iinfo(np.int32).min).to_numpy()
    order = np.lexsort((np.arange(n), gmm, pid))
    if not np.array_equal(order, np.arange(n)):
        table = table.take(order)
        pid, gmm, gmm_null = pid[order], gmm[order], gmm_null[order]
    new_problem = np.ones(n, dtype=bool)
    new_problem[1:] = pid[1:] != pid[:-1]
    new_gmm = new_problem.copy()
    new_gmm[1:] |= gmm[1:] != gmm[:-1]
    gmm_starts = np.flatnonzero(new_gmm)
    problem_starts = np.flatnonzero(new_problem)
    comp_offset = np.append(gmm_starts, n).astype(np.int64)
    gmm_offset = np.append(np.searchsorted(gmm_starts, problem_starts), len(gmm_starts))
    lam_rows = _floats(table.column("lambda"))
    mean_offset, mean_values, mean_null, mean_elem_null = _lists(table.column("mean"))
    if covariance_type == "spherical":
        cov_offset, cov_values = None, _floats(table.column(field))
        cov_null, cov_elem_null = _nulls(table.column(field)), np.zeros(n, dtype=bool)
    else:
        cov_offset, cov_values, cov_null, cov_elem_null = _lists(table.column(field))
    cols = ProblemColumns(
        problem_id=pid[problem_starts].astype(np.int64),
        gmm_offset=gmm_offset.astype(np.int64),
        gmm_label=gmm[gmm_starts].astype(np.int32),
        lambdas=lam_rows[gmm_starts],
        comp_offset=comp_offset,
        weight=_floats(table.column("weight")),
        mean_offset=mean_offset,
        mean_values=mean_values,
        cov_offset=np.zeros(n + 1, dtype=np.int64),
        cov_values=np.zeros(0),
    )
    flags = {
        "gmm is missing (null)": gmm_null,
        "lambda is missing (null)": _nulls(table.column("lambda")),
        "weight is missing (null)": _nulls(table.column("weight")),
        "mean is missing (null)": mean_null,
        "mean contains a missing (null) value": mean_elem_null,
        f"{field} is missing (null)": cov_null,
        f"{field} contains a missing (null) value": cov_elem_null,
    }
    cols.issues = _row_issues(cols, flags, lam_rows)
    return cols.with_covariances(covariance_type, cov_values, cov_offset)


def _nulls(col: pa.ChunkedArray) -> np.ndarray:
    if col.null_count == 0:
        return np.zeros(len(col), dtype=bool)
    return col.is_null().to_numpy()


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return col.fill_null(np.nan).to_numpy().astype(np.float64, copy=False)


def _lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    n = len(arr)
    list_null = _nulls(pa.chunked_array([arr]))
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(arr)
    elem_null = np.zeros(n, dtype=bool)
    if values.null_count:
        rows = np.repeat(np.arange(n), lengths)[values.is_null().to_numpy(zero_copy_only=False)]
        elem_null[rows] = True
        values = values.fill_null(np.nan)
    return offsets, values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False), list_null, elem_null


def _row_issues(cols: ProblemColumns, flags: dict[str, np.ndarray], lam_rows: np.ndarray) -> dict:
    row_gmm = np.repeat(np.arange(cols.n_gmms), np.diff(cols.comp_offset))
    lam_first = np.repeat(cols.lambdas, np.diff(cols.comp_offset))
    same = (lam_rows == lam_first) | (np.isnan(lam_rows) & np.isnan(lam_first))
    conflict = ~same & ~flags["lambda is missing (null)"]
    any_flag = conflict.copy()
    for v in flags.values():
        any_flag |= v
    if not any_flag.any():
        return {}
    gmm_problem = np.repeat(np.arange(cols.n_problems), np.diff(cols.gmm_offset))
    issues: dict[int, list[str]] = {}
    for r in np.flatnonzero(any_flag):
        g = int(row_gmm[r])
        p = int(gmm_problem[g])
        k = int(r - cols.comp_offset[g])
        label = None if flags["gmm is missing (null)"][r] else cols.gmm_label[g]
        loc = where(cols.problem_id[p], label, k)
        for text, mask in flags.items():
            if mask[r]:
                issues.setdefault(p, []).append(f"{loc}: {text}")
        if conflict[r]:
            issues.setdefault(p, []).append(
                f"{where(cols.problem_id[p], label)}: lambda differs between the GMM's rows "
                f"({fmt_number(lam_first[r])} on component 0, {fmt_number(lam_rows[r])} "
                f"on component {k})"
            )
    return issues


# ------------------------------------------------------------------ writer
class ParquetProblemWriter:
    """Write batches to one Parquet file in the long format, in row groups.

    Problems must be written in ascending ``problem_id`` order (what the
    store readers expect for cheap range reads). ``covariance_type`` picks the
    covariance column (``cov``, ``cov_diag``, ``cov_spherical``); a batch
    whose covariances that form cannot hold is refused
    (:meth:`ProblemColumns.stored_covariances`). Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, url: str, *, row_group_rows: int = ROW_GROUP_ROWS,
                 compression: str = "zstd", covariance_type: str = "full",
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.covariance_type = check_covariance_type(covariance_type)
        self.row_group_rows = row_group_rows
        self._fs, self._path = _fs.url_to_fs(url, storage_options)
        self._fs.makedirs(posixpath.dirname(self._path) or "/", exist_ok=True)
        self._file = None if _fs.is_local(self._fs) else self._fs.open(self._path, "wb")
        # dictionary encoding only where values repeat: on the float lists it is tried
        # page after page and abandoned, which made writing slower (and files larger)
        self._writer = pq.ParquetWriter(
            self._path if self._file is None else self._file, problem_schema(covariance_type),
            compression=compression, use_dictionary=["problem_id", "gmm", "lambda"],
        )
        self._last_id: int | None = None
        self.n_problems = 0

    def write(self, cols: ProblemColumns) -> None:
        """Append a batch (ids ascending and above those already written)."""
        if cols.n_problems == 0:
            return
        ids = cols.problem_id
        if np.any(np.diff(ids) <= 0) or (self._last_id is not None and ids[0] <= self._last_id):
            raise StoreDataError("problems must be written in strictly ascending problem_id order")
        self._writer.write_table(columns_to_table(cols, self.covariance_type),
                                 row_group_size=self.row_group_rows)
        self._last_id = int(ids[-1])
        self.n_problems += cols.n_problems

    def close(self) -> None:
        self._writer.close()
        if self._file is not None:
            self._file.close()

    def abort(self) -> None:
        """Release the file after a failure (the caller removes it)."""
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ParquetProblemWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ store
@dataclass
class _RowGroupIndex:
    """A few numbers per non-empty row group, in store file order."""

    file: np.ndarray
    group: np.ndarray
    first: np.ndarray
    last: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    new: np.ndarray  # problems whose first row is in this row group (sorted stores)
    sorted: bool
    n_rows: int


def _list_files(url: str, storage_options: StorageOptions) -> tuple[object, list[str]]:
    fs, path = _fs.url_to_fs(url, storage_options)
    if fs.isfile(path):
        return fs, [path]
    files = sorted(
        p for p in fs.find(path)
        if p.endswith((".parquet", ".pq"))
        and not any(part.startswith((".", "_")) for part in p[len(path):].split("/") if part)
    )
    if not files:
        raise StoreFormatError(f"{url} is a directory with no Parquet files (*.parquet) in it")
    return fs, files


class ParquetProblemStore(ProblemStore):
    """A Parquet file or dataset (directory) in the long format.

    Opening checks every file's schema (all files must have the same
    covariance column: ``covariance_type``) and scans ``problem_id`` once
    (one row group at a time) to build a small row-group index; see the
    module docstring for the memory behaviour.
    """

    format = PARQUET_FORMAT_ID
    #: The column that orders the store (a GMM store's is ``gmm_id``).
    ID_COLUMN = "problem_id"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = StorageOptions.of(storage_options)
        fs, self._files = _list_files(url, self.storage_options)
        problems = []
        forms: dict[str, list[str]] = {}
        for f in self._files:
            try:
                with self._open(fs, f) as pf:
                    schema = pf.schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                problems.append(f"{f}: not a readable Parquet file ({e})")
                continue
            label = f"{f}: " if len(self._files) > 1 else ""
            found = self._schema_problems(schema)
            problems += [label + p for p in found]
            if not found:
                forms.setdefault(schema_covariance_type(schema), []).append(f)
        if len(forms) > 1:
            problems.append(
                "the files have different covariance columns ("
                + "; ".join(f"{COVARIANCE_FIELDS[t]!r} in {', '.join(fs_[:3])}"
                            + (f" and {len(fs_) - 3} more" if len(fs_) > 3 else "")
                            for t, fs_ in forms.items())
                + "): a store has one covariance form; rewrite the files in one form")
        if problems:
            raise self._refusal(url, problems)
        self.covariance_type = next(iter(forms), "full")
        self._columns = [*self._base_columns(), COVARIANCE_FIELDS[self.covariance_type]]
        self._index = self._scan(fs)
        self._unique = None if self._index.sorted else self._collect_unique(fs)
        self.n_problems = int(self._index.new.sum()) if self._index.sorted else len(self._unique)
        self.dim = None

    # the format's own rules: a subclass of another long format (GMM stores) overrides these
    @staticmethod
    def _schema_problems(schema: pa.Schema) -> list[str]:
        """What is wrong with a file's ``schema`` (:func:`schema_problems`)."""
        return schema_problems(schema)

    @staticmethod
    def _refusal(url: str, problems: list[str]) -> StoreFormatError:
        """The error that refuses a store whose files have ``problems``."""
        return _refuse(url, problems)

    @staticmethod
    def _base_columns() -> tuple[str, ...]:
        """The columns read besides the covariance column (the id column first)."""
        return BASE_COLUMNS

    @staticmethod
    def _normalised(batch: pa.RecordBatch) -> pa.Table:
        """Rows read from a file as the problem long format's canonical table."""
        return _normalise(batch)

    # pickling: no file handles, no O(P) arrays
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_unique"] = None
        return state

    @staticmethod
    @contextlib.contextmanager
    def _open(fs, path: str) -> Iterator[pq.ParquetFile]:
        """A ``ParquetFile``; a remote file's handle is closed afterwards."""
        if _fs.is_local(fs):
            pf = pq.ParquetFile(path)
            try:
                yield pf
            finally:
                pf.close()
        else:
            with fs.open(path, "rb") as f:
                yield pq.ParquetFile(f)

    def _row_groups(self, fs) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(file, row_group, problem_ids)`` for every row group, one at a time."""
        for fi in range(len(self._files)):
            with self._open(fs, self._files[fi]) as pf:
                for gi in range(pf.num_row_groups):
                    col = pf.read_row_group(gi, columns=[self.ID_COLUMN]).column(0)
                    if col.null_count:
                        raise StoreDataError(
                            f"{self._files[fi]}, row group {gi}: column {self.ID_COLUMN!r} has "
                            f"{col.null_count} null values; every row needs an id"
                        )
                    yield fi, gi, col.to_numpy().astype(np.int64, copy=False)

    def _collect_unique(self, fs) -> np.ndarray:
        """The sorted distinct ids (unsorted stores only: 8 bytes per problem)."""
        uniques = [np.unique(ids) for _, _, ids in self._row_groups(fs)]
        return np.unique(np.concatenate(uniques)) if uniques else np.zeros(0, np.int64)

    def _scan(self, fs) -> _RowGroupIndex:
        rows: dict[str, list] = {k: [] for k in ("file", "group", "first", "last", "lo", "hi", "new")}
        is_sorted, prev_last, n_rows = True, None, 0
        for fi, gi, ids in self._row_groups(fs):
            if len(ids) == 0:
                continue
            n_rows += len(ids)
            step = np.diff(ids)
            distinct = 1 + int(np.count_nonzero(step))
            if np.any(step < 0) or (prev_last is not None and ids[0] < prev_last):
                is_sorted = False
            carried = prev_last is not None and ids[0] == prev_last
            for key, val in (("file", fi), ("group", gi), ("first", ids[0]), ("last", ids[-1]),
                             ("lo", ids.min()), ("hi", ids.max()),
                             ("new", distinct - int(carried))):
                rows[key].append(val)
            prev_last = ids[-1]
        return _RowGroupIndex(
            **{k: np.asarray(v, dtype=np.int64) for k, v in rows.items()},
            sorted=is_sorted, n_rows=n_rows,
        )

    # --------------------------------------------------------------- lookups
    def _unique_ids(self) -> np.ndarray:
        if self._unique is None:
            fs, _ = self.filesystem()
            self._unique = self._collect_unique(fs)
        return self._unique

    def _group_of(self, position: int) -> int:
        cum = np.concatenate([[0], np.cumsum(self._index.new)])
        return int(np.searchsorted(cum, position, side="right") - 1)

    def _new_ids(self, fs, g: int) -> np.ndarray:
        """Distinct ids whose first row is in row group ``g`` (sorted stores)."""
        with self._open(fs, self._files[int(self._index.file[g])]) as pf:
            ids = pf.read_row_group(int(self._index.group[g]), columns=[self.ID_COLUMN]).column(0)
        ids = np.unique(ids.to_numpy())
        if g > 0 and len(ids) and ids[0] == self._index.last[g - 1]:
            ids = ids[1:]
        return ids

    def _id_range(self, fs, start: int, stop: int) -> tuple[int, int, list[int]]:
        """Ids of positions ``start`` and ``stop-1`` and the row groups to read."""
        ix = self._index
        if not ix.sorted:
            unique = self._unique_ids()
            lo, hi = int(unique[start]), int(unique[stop - 1])
            groups = np.flatnonzero((ix.lo <= hi) & (ix.hi >= lo))
            return lo, hi, groups.tolist()
        cum = np.concatenate([[0], np.cumsum(ix.new)])
        ga, gb = self._group_of(start), self._group_of(stop - 1)
        lo = int(self._new_ids(fs, ga)[start - cum[ga]])
        hi = int(self._new_ids(fs, gb)[stop - 1 - cum[gb]])
        ge = gb
        while ge + 1 < len(ix.first) and ix.first[ge + 1] == hi:
            ge += 1
        return lo, hi, list(range(ga, ge + 1))

    def _read_rows(self, start: int, stop: int, columns: list[str]) -> pa.Table | None:
        fs, _ = self.filesystem()
        lo, hi, groups = self._id_range(fs, start, stop)
        pieces = []
        with contextlib.ExitStack() as stack:
            files: dict[int, pq.ParquetFile] = {}
            for g in groups:
                fi = int(self._index.file[g])
                if fi not in files:
                    files[fi] = stack.enter_context(self._open(fs, self._files[fi]))
                self._read_group(files[fi], int(self._index.group[g]), columns, lo, hi, pieces)
        if not pieces:
            return None
        return pa.concat_tables(pieces)

    def _read_group(self, pf: pq.ParquetFile, group: int, columns: list[str], lo: int, hi: int,
                    pieces: list) -> None:
        """Append the rows of row group ``group`` with ids in ``lo..hi`` to ``pieces``."""
        for batch in pf.iter_batches(BATCH_ROWS, row_groups=[group], columns=columns):
            ids = batch.column(0)
            if self._index.sorted and pc.min(ids).as_py() > hi:
                break
            kept = batch.filter(pc.and_(pc.greater_equal(ids, lo), pc.less_equal(ids, hi)))
            if kept.num_rows:
                pieces.append(self._normalised(kept) if len(columns) > 1
                              else pa.Table.from_batches([kept]))

    # ------------------------------------------------------------- interface
    def problem_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_problems if stop is None else stop
        start, stop = self._check_range(start, stop)
        if start == stop:
            return np.zeros(0, dtype=np.int64)
        if not self._index.sorted:
            return self._unique_ids()[start:stop].copy()
        table = self._read_rows(start, stop, [self.ID_COLUMN])
        return np.unique(table.column(0).to_numpy()).astype(np.int64)

    def read_columns(self, start: int, stop: int) -> ProblemColumns:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return table_to_columns(problem_schema(self.covariance_type).empty_table())
        return table_to_columns(self._read_rows(start, stop, self._columns))

    def describe(self) -> dict:
        out = super().describe()
        out.update(files=len(self._files), row_groups=len(self._index.first),
                   rows=self._index.n_rows, sorted_by_problem_id=self._index.sorted)
        return out
