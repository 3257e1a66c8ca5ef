"""GMM stores: many GMMs, the input of a distance job (``raybary distances``).

Two formats, the problem stores' one level down: Parquet,
``raybary.gmms.parquet/1``, one row per component::

    gmm_id int64, weight float64, mean list<float64> (d values),
    and exactly one covariance column, as in a problem store:
      cov           list<float64> (d*d values, row-major)   full covariances
      cov_diag      list<float64> (d values, the variances)  diagonal ones
      cov_spherical float64 (one variance; C = v * I)        spherical ones

and Zarr v3, ``raybary.gmms.zarr/1`` (one dimension ``d`` per store; every
array chunked along its first axis, ``chunk_gmms`` GMMs a chunk)::

    STORE.zarr/                     group attributes:
                                      format = "raybary.gmms.zarr", format_version = 1, dim = d
      gmms/id            int64   [G]      GMM ids, strictly ascending
      gmms/offset        int64   [G+1]    GMM g owns components offset[g]:offset[g+1]
      components/weight  float64 [N]
      components/mean    float64 [N, d]
      and exactly one covariance array, as in a Zarr problem store:
      components/cov, components/cov_diag or components/cov_spherical

A GMM's components are its rows (array entries) in order; store order is
ascending ``gmm_id``. The same rules as a problem store apply, because the
same code reads it: :class:`GMMStore` is a
:class:`~raybary.storage.parquet_store.ParquetProblemStore` and
:class:`ZarrGMMStore` a :class:`~raybary.storage.zarr_store.ZarrProblemStore`
(with the layout :data:`GMM_ZARR_LAYOUT`, no problems level) whose GMMs are
read as problems of one GMM each (``problem_id = gmm_id``, ``gmm = 0``,
``lambda = 1``). Any integer or floating types (and, in Parquet, list types)
are accepted; in Parquet a pandas index is ignored and any other column is
refused; range reads touch only the row groups or chunks that hold them;
each GMM is validated by :mod:`raybary.validation`'s rules on reading, and
its messages name it (``gmm 17, component 2: ...``).

:func:`open_gmm_store` tells the format from the URL (``*.zarr``, or a
directory with a ``zarr.json``: Zarr; otherwise Parquet). Write one with
:func:`write_gmms` (from :class:`raybary.GMM` objects, e.g.
``GMM.from_sklearn(model)``) or :func:`generate_gmms` (``raybary generate
OUT --gmms N``); :func:`convert_gmms` (``raybary convert``) converts between
the formats.
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
from raybary.storage.formats import format_from_name
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
from raybary.storage.zarr_store import (
    CHUNK_PROBLEMS,
    COMPONENT_ARRAYS,
    COMPONENTS_EXPECTED,
    ZarrLayout,
    ZarrProblemStore,
    ZarrProblemWriter,
)
from raybary.types import GMM, Problem

__all__ = [
    "GMM_FORMAT",
    "GMM_VERSION",
    "GMM_FORMAT_ID",
    "GMM_ZARR_FORMAT_ID",
    "GMMStore",
    "ZarrGMMStore",
    "ZarrGMMWriter",
    "AnyGMMStore",
    "GMMShard",
    "gmm_schema",
    "gmm_schema_problems",
    "gmm_message",
    "open_gmm_store",
    "write_gmms",
    "generate_gmms",
    "convert_gmms",
]

GMM_FORMAT = "raybary.gmms.parquet"
GMM_VERSION = 1
GMM_FORMAT_ID = f"{GMM_FORMAT}/{GMM_VERSION}"
GMM_ZARR_FORMAT = "raybary.gmms.zarr"
GMM_ZARR_FORMAT_ID = f"{GMM_ZARR_FORMAT}/{GMM_VERSION}"
GMM_BASE_COLUMNS = ("gmm_id", "weight", "mean")
EXPECTED = (
    "expected columns: gmm_id int64, weight float64, mean list<float64> (d values), and one "
    "covariance column: cov list<float64> (d*d values, row-major), cov_diag list<float64> "
    "(d variances) or cov_spherical float64 (one variance); one row per component"
)
#: The Zarr GMM store: the problem store's layout without its problems level.
GMM_ZARR_LAYOUT = ZarrLayout(
    GMM_ZARR_FORMAT, GMM_VERSION, "GMM",
    {"gmms/id": ("i", lambda P, G, N, d: (G,), False),
     "gmms/offset": ("i", lambda P, G, N, d: (G + 1,), False), **COMPONENT_ARRAYS},
    "gmms/id", ("gmms/id", "gmms/id", "components/weight"), (("gmms/offset", 2),),
    "expected a Zarr v3 group with attributes format='raybary.gmms.zarr', format_version=1, "
    "dim=d and arrays gmms/id int64[G] (ascending), gmms/offset int64[G+1] (GMM g owns "
    "components offset[g]:offset[g+1]), " + COMPONENTS_EXPECTED,
    (("problems/id", "this looks like a problem store (raybary.problems.zarr): a distance "
      "job takes a GMM store; write one with raybary.storage.write_gmms or "
      "`raybary generate OUT.zarr --gmms N`"),))
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


class _GMMReads:
    """What a GMM store adds to the problem store it is (a Parquet or a Zarr
    one whose problems are one GMM each): reads as :class:`GMMShard` and id
    lookups. Positions ``0..n_gmms-1`` are in ``gmm_id`` order."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_all_ids", None)
        return state

    def read_gmms(self, start: int, stop: int, *, dtype: str = "float64") -> GMMShard:
        """The GMMs at positions ``start:stop``, validated for a solve in ``dtype``."""
        shard = self.read(start, stop, dtype=dtype)
        return GMMShard(shard.problem_ids,
                        [None if p is None else p.gmms[0] for p in shard.problems],
                        [gmm_message(e) for e in shard.errors])

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The store positions of ``ids`` (-1 where an id is not in the store).
        The first call reads every id (8 bytes a GMM) and keeps them."""
        all_ids = self.__dict__.get("_all_ids")
        if all_ids is None:
            all_ids = self._all_ids = self.problem_ids()
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(all_ids, ids), max(len(all_ids) - 1, 0))
        hit = (all_ids[pos] == ids) if len(all_ids) else np.zeros(len(ids), bool)
        return np.where(hit, pos, -1).astype(np.int64)


class GMMStore(_GMMReads, ParquetProblemStore):
    """A Parquet GMM store (module docstring).

    Opening checks every file's schema and scans ``gmm_id`` once, as a
    problem store's opening scans ``problem_id``; :meth:`read_gmms` reads and
    validates a range, :meth:`positions` looks ids up.
    """

    format = GMM_FORMAT_ID
    ID_COLUMN = "gmm_id"

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


class ZarrGMMStore(_GMMReads, ZarrProblemStore):
    """A Zarr GMM store (module docstring): a Zarr problem store without the
    problems level, each position one GMM (``lambda = 1``, ``gmm = 0``)."""

    format = GMM_ZARR_FORMAT_ID
    layout = GMM_ZARR_LAYOUT

    def _problem_offsets(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop + 1, dtype=np.int64)

    def _gmm_fields(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray | None]:
        return np.ones(g1 - g0), None

    def max_gmms(self, block_problems: int = 1 << 20) -> int:
        return 1


#: A GMM store of either format, as :func:`open_gmm_store` opens it.
AnyGMMStore = GMMStore | ZarrGMMStore


def _is_zarr(url: str, options: StorageOptions) -> bool:
    """Whether ``url`` names a Zarr GMM store: its suffix, else a ``zarr.json`` in it."""
    name = format_from_name(url)
    if name is not None:
        return name == "zarr"
    fs, path = _fs.url_to_fs(url, options)
    return bool(fs.isdir(path) and fs.exists(path.rstrip("/") + "/zarr.json"))


def open_gmm_store(url: str, *,
                   storage_options: Mapping[str, Any] | None = None) -> AnyGMMStore:
    """Open a GMM store, Zarr (``*.zarr``, or a directory holding a
    ``zarr.json``) or Parquet (a file or directory otherwise); its layout
    is checked here, as :func:`~raybary.storage.open_store` checks a problem store's.

    Raises ``FileNotFoundError`` if nothing is there and
    :class:`~raybary.storage.errors.StoreFormatError` naming what is wrong
    otherwise (a problem store: with a hint).
    """
    url = _fs.strip_url(str(url))
    options = StorageOptions.of(storage_options)
    fs, path = _fs.url_to_fs(url, options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no GMM store at {_fs.redact_url(url)}")
    return (ZarrGMMStore if _is_zarr(url, options) else GMMStore)(url, options)


# ------------------------------------------------------------------ writing
def gmm_table(cols: ProblemColumns, covariance_type: str = "full") -> pa.Table:
    """The GMM-store rows of a batch whose problems are one GMM each (the
    problem ids are the GMM ids), covariances in the ``covariance_type`` column."""
    rows = columns_to_table(cols, covariance_type)
    cov = COVARIANCE_FIELDS[covariance_type]
    return pa.Table.from_arrays([rows.column("problem_id"), rows.column("weight"),
                                 rows.column("mean"), rows.column(cov)],
                                schema=gmm_schema(covariance_type))


class ZarrGMMWriter(ZarrProblemWriter):
    """Write one-GMM problems (ids = GMM ids, ascending) as a Zarr GMM store:
    the problem writer, its levels above the components replaced."""

    layout = GMM_ZARR_LAYOUT

    def _spec(self, cp: int, cg: int, cc: int) -> dict[str, tuple]:
        return {"gmms/id": ((0,), (cp,), "int64"), "gmms/offset": ((1,), (cp,), "int64"),
                **self._component_spec(cc)}

    def _append_levels(self, cols: ProblemColumns, P: int, G: int, N: int) -> None:
        self._arrays["gmms/id"].append(cols.problem_id)
        self._arrays["gmms/offset"].append(cols.comp_offset[1:] + N)


def _write(url: str, cols: ProblemColumns, covariance_type: str, overwrite: bool,
           options: StorageOptions, dim: int | None = None,
           chunk_gmms: int | None = None) -> AnyGMMStore:
    """Write one-GMM problems ``cols`` (ids ascending) as a GMM store at ``url``
    (Zarr for ``*.zarr``, else one Parquet file), refusing an existing one
    unless ``overwrite``; return it opened."""
    fs, path = _fs.url_to_fs(url, options)
    if fs.exists(path):
        if not overwrite:
            raise FileExistsError(f"{_fs.redact_url(url)} exists; pass overwrite=True "
                                  "(--overwrite) to replace it")
        fs.rm(path, recursive=True)
    if format_from_name(url) == "zarr":
        with _fs.atomic_output(url, overwrite=overwrite, storage_options=options) as tmp:
            writer = ZarrGMMWriter(tmp, dim=dim, chunk_problems=chunk_gmms or CHUNK_PROBLEMS,
                                   covariance_type=covariance_type, storage_options=options)
            writer.write(cols)  # a refused batch leaves nothing behind
            writer.close()
        return open_gmm_store(url, storage_options=options)
    parent = posixpath.dirname(path)
    if parent:
        with contextlib.suppress(FileExistsError):
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(gmm_table(cols, covariance_type), f, row_group_size=ROW_GROUP_ROWS,
                       compression="zstd")
    return open_gmm_store(url, storage_options=options)


def write_gmms(url: str, gmms: Sequence[GMM], ids: Sequence[int] | None = None, *,
               covariance_type: str = "full", overwrite: bool = False,
               chunk_gmms: int | None = None,
               storage_options: Mapping[str, Any] | None = None) -> AnyGMMStore:
    """Write ``gmms`` (:class:`raybary.GMM` objects, e.g. ``GMM.from_sklearn(m)``)
    to a GMM store at ``url``; return it opened.

    ``*.zarr`` writes a Zarr GMM store (one dimension ``d``; ``chunk_gmms``
    GMMs a chunk, default 8192), any other name one Parquet file.

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
    return _write(url, cols, check_covariance_type(covariance_type), overwrite,
                  StorageOptions.of(storage_options), chunk_gmms=chunk_gmms)


def generate_gmms(url: str, n_gmms: int, *, dim: int = 2, seed: int = 0,
                  covariance_type: str = "full", overwrite: bool = False,
                  chunk_gmms: int | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> AnyGMMStore:
    """Write ``n_gmms`` random GMMs (ids ``0..n-1``) to a GMM store at ``url``
    (``*.zarr``: Zarr, ``chunk_gmms`` GMMs a chunk; else Parquet).

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
    return _write(url, sub, covariance_type, overwrite, StorageOptions.of(storage_options),
                  dim=dim, chunk_gmms=chunk_gmms)


def convert_gmms(src: str | AnyGMMStore, dst: str, *, covariance_type: str | None = None,
                 overwrite: bool = False, chunk_gmms: int | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 output_storage_options: Mapping[str, Any] | None = None) -> AnyGMMStore:
    """Convert a GMM store to the format ``dst`` names (``*.zarr`` or Parquet),
    or change the form its covariances are stored in (``covariance_type``;
    default: the input's, refused naming the component if the form cannot
    hold them). The GMMs are read whole (a GMM store is small next to the
    distance job it feeds: N GMMs, N(N-1)/2 pairs), as stored, unvalidated.
    ``output_storage_options`` default to the input's.
    """
    store = src if isinstance(src, (GMMStore, ZarrGMMStore)) else open_gmm_store(
        src, storage_options=storage_options)
    if _fs.strip_url(store.url) == _fs.strip_url(dst):
        raise ValueError("convert: the output must differ from the input")
    covariance_type = check_covariance_type(covariance_type or store.covariance_type)
    options = StorageOptions.of(output_storage_options if output_storage_options is not None
                                else store.storage_options)
    cols = store.read_columns(0, store.n_gmms)
    try:
        return _write(dst, cols, covariance_type, overwrite, options, dim=cols.uniform_dim(),
                      chunk_gmms=chunk_gmms)
    except StoreDataError as e:  # the writers name problems: name the GMM
        raise StoreDataError(gmm_message(str(e))) from None
