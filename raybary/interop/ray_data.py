"""Ray Data: barycenters as one step of a ``ray.data`` pipeline.

Ray users run batch inference as ``ds.map_batches(CallableClass, ...)``. This
module gives them that class, :class:`BarycenterSolver`, and a reader,
:func:`read_problems_dataset`, that turns a raybary problem store into such a
dataset. Rows are one problem each, with nested list columns (see
``docs/ray_data.md``)::

    problem rows  problem_id  int64
                  lambdas     list<double>                      [J]
                  weights     list<list<double>>                [J][K_j]
                  means       list<list<list<double>>>          [J][K_j][d]
                  covs        list<list<list<list<double>>>>    [J][K_j][d][d]
                              (or list<list<list<double>>>      [J][K_j][d*d], row-major)
                  error       string, optional: a row whose error is set is not
                              solved; it comes back ``invalid`` with that message

    result rows   problem_id, status ('ok' | 'invalid' | 'failed'), error,
                  objective, iterations, converged, marginal_error, restart,
                  n_components (the scalar columns of a results directory's
                  ``problems/`` table), and the barycenter:
                  weights [n], means [n][d], covs [n][d][d] (null unless 'ok')

Any list type (list, large_list, fixed_size_list) of any numbers is accepted
and cast; Ray's tensor columns (what ``ray.data.from_items`` makes of
``ndarray`` cells) too.

The nested rows are decoded into :class:`~raybary.storage.columns.ProblemColumns`
and validated by :meth:`~raybary.storage.columns.ProblemColumns.to_problems`
(the rules and messages of ``raybary run``), then solved together with the
runner's failure isolation (:func:`raybary.batch.outcome.solve_outcome`): an
invalid problem is returned with status ``invalid`` and its message, a
problem on which the solver raises with ``failed``, and every other row of
the batch is solved.

``ray`` is imported only inside the functions that need it, so
``import raybary.interop`` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raybary.options import SolverOptions
from raybary.storage.arrow import list_array, offsets
from raybary.storage.base import DEFAULT_SHARD_SIZE, shard_bounds, shard_count
from raybary.storage.columns import ProblemColumns
from raybary.storage.results.layout import result_columns
from raybary.types import GMM, BatchOutcome, Problem
from raybary.validation import join_messages, where

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

__all__ = [
    "BarycenterSolver",
    "read_problems_dataset",
    "problems_to_table",
    "results_to_gmms",
    "problem_row_schema",
    "result_row_schema",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_READ_TASKS",
]

_F64 = pa.float64()
_LIST1 = pa.list_(_F64)
_LIST2 = pa.list_(_LIST1)
_LIST3 = pa.list_(_LIST2)
_LIST4 = pa.list_(_LIST3)
#: The nested input columns and their canonical types (covs: the ``[d][d]`` form).
_INPUTS = {"lambdas": _LIST1, "weights": _LIST2, "means": _LIST3, "covs": _LIST4}


def problem_row_schema(flat_covs: bool = False) -> pa.Schema:
    """Schema of the problem rows: ``covs`` as ``[J][K][d][d]``, or ``[J][K][d*d]``
    row-major with ``flat_covs`` (both are accepted)."""
    return pa.schema([("problem_id", pa.int64()), ("lambdas", _LIST1), ("weights", _LIST2),
                      ("means", _LIST3), ("covs", _LIST3 if flat_covs else _LIST4),
                      ("error", pa.string())])


def result_row_schema() -> pa.Schema:
    """Schema of the result rows of :class:`BarycenterSolver` (before any kept columns)."""
    return pa.schema([
        ("problem_id", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("objective", _F64),
        ("costs", _LIST1),
        ("iterations", pa.int32()),
        ("converged", pa.bool_()),
        ("marginal_error", _F64),
        ("restart", pa.int32()),
        ("n_components", pa.int32()),
        ("weights", _LIST1),
        ("means", _LIST2),
        ("covs", _LIST3),
    ])


# ------------------------------------------------------------------ batches to Arrow
def _plain(x: Any) -> Any:
    """A cell as something ``pa.array`` takes: nested lists, 1-D numeric arrays kept."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            return [_plain(e) for e in x]
        return x if x.ndim <= 1 else x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(e) for e in x]
    return x


def _column_array(values: Any, type_: pa.DataType | None) -> pa.Array:
    """One column of a NumPy/pandas batch (or a Ray tensor column) as an Arrow array."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if not isinstance(arr.type, pa.ExtensionType):
            return arr
        values = arr.to_numpy(zero_copy_only=False)  # Ray's tensor columns
    if hasattr(getattr(values, "array", None), "__arrow_array__"):  # pandas, Arrow-backed
        return pa.array(values.array)
    values = values.to_numpy() if hasattr(values, "to_numpy") else values
    if isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 1:
        return pa.array(values, type_)
    return pa.array([_plain(v) for v in values], type_)


def _as_table(batch: Any, types: Mapping[str, pa.DataType | None],
              optional: Sequence[str] = ()) -> pa.Table:
    """The columns ``types`` (plus ``optional`` ones, if present) of a batch in any of
    Ray Data's formats (``pyarrow.Table``, ``pandas.DataFrame``, dict of NumPy
    arrays) or a list of row dicts, as one Arrow table."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, list):
        batch = {k: [row.get(k) for row in batch] for k in {k for r in batch for k in r}}
    names = list(batch.column_names) if isinstance(batch, pa.Table) else list(batch.keys())
    missing = [n for n in types if n not in names]
    if missing:
        raise ValueError(f"the batch has no column {', '.join(map(repr, missing))}; "
                         f"expected columns {', '.join(types)} (got {', '.join(names)})")
    wanted = list(types) + [n for n in optional if n in names and n not in types]
    arrays = []
    for name in wanted:
        col = batch.column(name) if isinstance(batch, pa.Table) else batch[name]
        arrays.append(_column_array(col, types.get(name)))
    return pa.Table.from_arrays(arrays, names=wanted)


def _cast(arr: pa.Array, type_: pa.DataType, name: str) -> pa.Array:
    if arr.type.equals(type_):
        return arr
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), type_)
    try:
        return pc.cast(arr, type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise ValueError(f"column {name!r} has type {arr.type}, expected {type_} "
                         f"(any list type of numbers is accepted): {e}") from e


def _list_depth(type_: pa.DataType) -> int:
    depth = 0
    while pa.types.is_list(type_) or pa.types.is_large_list(type_) or \
            pa.types.is_fixed_size_list(type_):
        type_, depth = type_.value_type, depth + 1
    return depth


# ------------------------------------------------------------------ nested rows to CSR
def _unnest(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """``(lengths, nulls, child)`` of a list array: lengths are 0 where the list is null."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64), nulls, pc.list_flatten(arr)


def _floats(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 (NaN where null) and the null mask."""
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    values = arr.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return values, nulls


def _owner(lengths: np.ndarray) -> np.ndarray:
    """For a CSR level, the parent of each child."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _structure(table: pa.Table, rows: np.ndarray, pid: np.ndarray,
               messages: dict[int, list[str]]) -> np.ndarray:
    """Check that the nested columns of ``rows`` agree on J and, per GMM, on K;
    record messages of the rows that do not (they cannot be decoded) and
    return the rows that can."""
    arrays = {n: table.column(n).combine_chunks().take(pa.array(rows)) for n in _INPUTS}
    top = {n: _unnest(a) for n, a in arrays.items()}
    j = np.stack([top[n][0] for n in _INPUTS])
    nulls = np.stack([top[n][1] for n in _INPUTS])
    bad = nulls.any(axis=0) | (j != j[0]).any(axis=0) | (j[0] == 0)
    for i in np.flatnonzero(bad):
        loc, r = where(pid[rows[i]]), int(rows[i])
        out = [f"{loc}: {n} is missing (null)" for k, n in enumerate(_INPUTS) if nulls[k, i]]
        if not out and (j[:, i] != j[0, i]).any():
            out.append(f"{loc}: lambdas has {j[0, i]} entries, weights {j[1, i]}, means "
                       f"{j[2, i]}, covs {j[3, i]} (each needs one per GMM)")
        if not out:
            out.append(f"{loc}: has no GMM")
        messages.setdefault(r, []).extend(out)
    rows = rows[~bad]
    if not len(rows):
        return rows
    arrays = {n: table.column(n).combine_chunks().take(pa.array(rows)) for n in _INPUTS}
    gmm_row = _owner(_unnest(arrays["lambdas"])[0])
    per_gmm = {n: _unnest(_unnest(arrays[n])[2]) for n in ("weights", "means", "covs")}
    k = np.stack([per_gmm[n][0] for n in per_gmm])
    nulls = np.stack([per_gmm[n][1] for n in per_gmm])
    gmm_bad = nulls.any(axis=0) | (k != k[0]).any(axis=0)
    local = np.arange(len(gmm_row)) - offsets(np.bincount(gmm_row, minlength=len(rows)))[gmm_row]
    for g in np.flatnonzero(gmm_bad):
        r = int(rows[gmm_row[g]])
        loc = where(pid[r], local[g])
        out = [f"{loc}: {n} is missing (null)" for q, n in enumerate(per_gmm) if nulls[q, g]]
        if not out:
            out.append(f"{loc}: weights has {k[0, g]} entries, means {k[1, g]}, covs {k[2, g]} "
                       "(each needs one per component)")
        messages.setdefault(r, []).extend(out)
    row_bad = np.zeros(len(rows), dtype=bool)
    row_bad[gmm_row[gmm_bad]] = True
    return rows[~row_bad]


def _decode(table: pa.Table, rows: np.ndarray, pid: np.ndarray, flat_covs: bool) -> ProblemColumns:
    """CSR columns of ``rows`` (already checked by :func:`_structure`); missing
    values and covariances that are not square become issues of their problem."""
    a = {n: table.column(n).combine_chunks().take(pa.array(rows)) for n in _INPUTS}
    n_gmm, _, lam = _unnest(a["lambdas"])
    lam_values, lam_null = _floats(lam)
    n_comp, _, w = _unnest(_unnest(a["weights"])[2])
    w_values, w_null = _floats(w)
    m_len, m_null, m = _unnest(_unnest(_unnest(a["means"])[2])[2])
    m_values, m_value_null = _floats(m)
    c_len, c_null, c = _unnest(_unnest(_unnest(a["covs"])[2])[2])
    square = np.ones(len(c_len), dtype=bool)
    c_part_null = np.zeros(len(c_len), dtype=bool)
    if not flat_covs:  # c_len counts rows; each row must have as many values as there are rows
        row_len, row_null, c = _unnest(c)
        row_comp = _owner(c_len)
        np.logical_or.at(c_part_null, row_comp, row_null)
        bad_row = row_len != c_len[row_comp]
        square[row_comp[bad_row]] = False
        row_offsets = offsets(row_len)
        c_rows = offsets(c_len)
        c_len = row_offsets[c_rows[1:]] - row_offsets[c_rows[:-1]]
    c_values, c_value_null = _floats(c)
    np.logical_or.at(c_part_null, _owner(c_len), c_value_null)
    m_part_null = np.zeros(len(m_len), dtype=bool)
    np.logical_or.at(m_part_null, _owner(m_len), m_value_null)
    gmm_offset = offsets(n_gmm)
    comp_offset = offsets(n_comp)
    cols = ProblemColumns(
        problem_id=pid[rows].astype(np.int64),
        gmm_offset=gmm_offset,
        gmm_label=(np.arange(len(lam_values)) - np.repeat(gmm_offset[:-1], n_gmm)).astype(np.int32),
        lambdas=lam_values,
        comp_offset=comp_offset,
        weight=w_values,
        mean_offset=offsets(m_len),
        mean_values=m_values,
        cov_offset=offsets(c_len),
        cov_values=c_values,
    )
    comp_flags = {
        "weight is missing (null)": w_null,
        "mean is missing (null)": m_null,
        "mean contains a missing (null) value": m_part_null,
        "cov is missing (null)": c_null,
        "cov contains a missing (null) value": c_part_null & ~c_null,
        "cov is not a square matrix (its rows have different lengths, or not as many "
        "values as there are rows)": ~square & ~c_null,
    }
    gmm_problem = _owner(n_gmm)
    comp_gmm = _owner(n_comp)
    issues: dict[int, list[str]] = {}
    for g in np.flatnonzero(lam_null):
        p = int(gmm_problem[g])
        issues.setdefault(p, []).append(f"{where(cols.problem_id[p], cols.gmm_label[g])}: "
                                        "lambda is missing (null)")
    any_comp = np.zeros(len(w_values), dtype=bool)
    for mask in comp_flags.values():
        any_comp |= mask
    for cc in np.flatnonzero(any_comp):
        g = int(comp_gmm[cc])
        p = int(gmm_problem[g])
        loc = where(cols.problem_id[p], cols.gmm_label[g], cc - comp_offset[g])
        issues.setdefault(p, []).extend(f"{loc}: {text}" for text, mask in comp_flags.items()
                                        if mask[cc])
    cols.issues = issues
    return cols


def decode_problems(batch: Any) -> ProblemColumns:
    """Problem rows (any of Ray Data's batch formats, see the module docstring)
    as :class:`~raybary.storage.columns.ProblemColumns`, unvalidated.

    Rows that cannot be decoded (a column null, lambdas / weights / means /
    covs of different lengths, a problem without GMMs) and rows whose
    ``error`` is set keep no GMMs and carry their messages in ``issues``, so
    :meth:`~raybary.storage.columns.ProblemColumns.to_problems` reports them
    invalid. Raises ``ValueError`` for a missing column, a column of the wrong
    type or a null ``problem_id``.
    """
    table = _as_table(batch, {"problem_id": pa.int64(), **{n: None for n in _INPUTS}},
                      optional=("error",))
    flat_covs = _list_depth(table.column("covs").type) == 3
    types = {**_INPUTS, "covs": _LIST3 if flat_covs else _LIST4, "problem_id": pa.int64()}
    table = pa.table({n: _cast(table.column(n).combine_chunks(), types[n], n) for n in types}
                     | ({"error": _cast(table.column("error").combine_chunks(), pa.string(),
                                        "error")} if "error" in table.column_names else {}))
    if table.column("problem_id").null_count:
        raise ValueError("column 'problem_id' has null values; every row needs a problem id")
    pid = table.column("problem_id").to_numpy()
    messages: dict[int, list[str]] = {}
    rows = np.arange(table.num_rows)
    if "error" in table.column_names:
        known = table.column("error").to_pylist()
        for i, e in enumerate(known):
            if e is not None:
                messages[i] = [e]
        rows = np.array([i for i, e in enumerate(known) if e is None], dtype=np.int64)
    rows = _structure(table, rows, pid, messages) if len(rows) else rows
    if len(rows):
        good = _decode(table, rows, pid, flat_covs)
    else:
        good = ProblemColumns.from_problems([])
    # put the undecodable rows back, in place, without GMMs
    n = table.num_rows
    n_gmm = np.zeros(n, dtype=np.int64)
    n_gmm[rows] = np.diff(good.gmm_offset)
    issues = {int(r): list(v) for r, v in messages.items()}
    for i, v in good.issues.items():
        issues.setdefault(int(rows[i]), []).extend(v)
    return ProblemColumns(
        problem_id=pid.astype(np.int64), gmm_offset=offsets(n_gmm), gmm_label=good.gmm_label,
        lambdas=good.lambdas, comp_offset=good.comp_offset, weight=good.weight,
        mean_offset=good.mean_offset, mean_values=good.mean_values,
        cov_offset=good.cov_offset, cov_values=good.cov_values, issues=issues)


# ------------------------------------------------------------------ CSR to nested rows
def _list(offs: np.ndarray, values: pa.Array, mask: np.ndarray | None = None) -> pa.ListArray:
    """A nested level of a batch's rows (:func:`raybary.storage.arrow.list_array`)."""
    return list_array(offs, values, mask=mask, smaller="batches")


def columns_to_rows(cols: ProblemColumns, errors: Sequence[str | None] | None = None,
                     flat_covs: bool = False) -> pa.Table:
    """Problem rows of a batch (the inverse of :func:`decode_problems`).

    A covariance of ``r*r`` values becomes ``r`` rows of ``r`` (any other
    count, which a problem with a message in ``errors`` may have, one row);
    ``flat_covs`` keeps them flat, ``d*d`` values row-major.
    """
    values = pa.array(cols.cov_values, _F64)
    if flat_covs:
        cov = _list(cols.cov_offset, values)
    else:
        n = np.diff(cols.cov_offset)
        r = np.rint(np.sqrt(n)).astype(np.int64)
        square = r * r == n
        rows_per = np.where(square, r, np.minimum(n, 1))
        row_len = np.repeat(np.where(square, r, n), rows_per)
        cov = _list(offsets(rows_per), _list(offsets(row_len), values))
    comp = cols.comp_offset
    if errors is None:
        errors = [None] * cols.n_problems
    return pa.Table.from_arrays([
        pa.array(cols.problem_id, pa.int64()),
        _list(cols.gmm_offset, pa.array(cols.lambdas, _F64)),
        _list(cols.gmm_offset, _list(comp, pa.array(cols.weight, _F64))),
        _list(cols.gmm_offset, _list(comp, _list(cols.mean_offset,
                                                 pa.array(cols.mean_values, _F64)))),
        _list(cols.gmm_offset, _list(comp, cov)),
        pa.array(list(errors), pa.string()),
    ], schema=problem_row_schema(flat_covs))


def problems_to_table(problems: Sequence[Problem], problem_ids: Sequence[int] | None = None,
                      *, flat_covs: bool = False) -> pa.Table:
    """:class:`raybary.Problem` objects as problem rows (ids default to ``0..P-1``);
    ``ray.data.from_arrow(table)`` makes a dataset of them."""
    return columns_to_rows(ProblemColumns.from_problems(list(problems), problem_ids),
                            flat_covs=flat_covs)


# ------------------------------------------------------------------ results
def results_table(outcome: BatchOutcome) -> pa.Table:
    """Result rows of a batch's outcome: the scalars of every result, the
    barycenter of ``ok`` ones (null elsewhere)."""
    ok = np.array([s == "ok" for s in outcome.statuses], dtype=bool)
    kept = [r for r, good in zip(outcome.results, ok) if good]
    sizes = np.zeros(len(outcome), dtype=np.int64)
    sizes[ok] = [len(r.weights) for r in kept]
    dims = np.zeros(len(outcome), dtype=np.int64)
    dims[ok] = [r.means.shape[1] for r in kept]
    comp_dim = np.repeat(dims, sizes)

    def flat(get):
        parts = [np.asarray(get(r), np.float64).reshape(-1) for r in kept]
        return pa.array(np.concatenate(parts) if parts else np.zeros(0), _F64)

    null = ~ok
    cov_rows = _list(offsets(np.repeat(comp_dim, comp_dim)), flat(lambda r: r.covs))
    columns = {
        "problem_id": pa.array(outcome.problem_ids, pa.int64()),
        "status": pa.array(outcome.statuses, pa.string()),
        "error": pa.array(outcome.errors, pa.string()),
        **result_columns(outcome.results),
        "weights": _list(offsets(sizes), flat(lambda r: r.weights), null),
        "means": _list(offsets(sizes), _list(offsets(comp_dim), flat(lambda r: r.means)), null),
        "covs": _list(offsets(sizes), _list(offsets(comp_dim), cov_rows), null),
    }
    schema = result_row_schema()
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def results_to_gmms(batch: Any) -> list[GMM | None]:
    """The barycenters of result rows as :class:`raybary.GMM` (``None`` where the
    status is not ``ok``), in row order. ``batch``: a ``pyarrow.Table``, a
    ``pandas.DataFrame``, a dict of columns, or a list of row dicts (what
    ``ds.take_all()`` returns)."""
    t = _as_table(batch, {"status": pa.string(), "weights": None, "means": None, "covs": None})
    w = _cast(t.column("weights").combine_chunks(), _LIST1, "weights")
    m = _cast(t.column("means").combine_chunks(), _LIST2, "means")
    c = _cast(t.column("covs").combine_chunks(), _LIST3, "covs")
    out: list[GMM | None] = []
    for i, status in enumerate(t.column("status").to_pylist()):
        if status != "ok" or not w[i].is_valid:
            out.append(None)
            continue
        weights = np.asarray(w[i].values, np.float64)
        n = len(weights)
        means = np.asarray(pc.list_flatten(m[i].values), np.float64).reshape(n, -1)
        d = means.shape[1]
        covs = np.asarray(pc.list_flatten(pc.list_flatten(c[i].values)), np.float64)
        out.append(GMM(weights, means, covs.reshape(n, d, d)))
    return out


class BarycenterSolver:
    r"""The barycenters of a batch of problem rows: a callable class for
    ``ray.data.Dataset.map_batches``.

    ::

        ds.map_batches(BarycenterSolver, fn_constructor_kwargs={"bar_size": 3},
                       batch_format="pyarrow", batch_size=1024,
                       compute=ray.data.ActorPoolStrategy(size=4))

    Each actor builds one instance; its options are checked and fixed here,
    once, and the solver's compiled programs stay warm in the actor's process
    for every later batch (and in JAX's persistent cache, ``RAYBARY_JAX_CACHE``,
    for the next actor).

    Args:
      options: the fields of :class:`raybary.SolverOptions` (``bar_size``,
        ``epsilon``, ``relative_epsilon``, ``restarts``, ``learn_weights``,
        ``dtype``, ``seed``, ``max_iterations``, ``tol``), with its defaults
        (those of ``raybary run``). Problem ``i``'s initialisation is seeded
        by ``seed`` and its ``problem_id``, so a result does not depend on the
        batch it was in.
      batch_size: problems per compiled call of the solver (default: that of
        :func:`raybary.solve`): a Ray batch of more rows is solved in several calls.
      keep_columns: input columns copied, unchanged, to the output rows
        (keys that later steps of the pipeline need).

    Calling it on a batch (``pyarrow.Table``, as with
    ``batch_format="pyarrow"``, the fastest; or ``pandas.DataFrame``, or a
    dict of NumPy arrays, Ray Data's default) returns a ``pyarrow.Table`` of
    result rows, one per input row, in order (schema: :func:`result_row_schema`
    plus ``keep_columns``). Invalid rows get status ``invalid`` and the
    message ``raybary run`` would write; a problem the solver raises on,
    ``failed``; the rest are solved.
    """

    def __init__(self, *, batch_size: int | None = None, keep_columns: Sequence[str] = (),
                 **options: Any) -> None:
        from raybary.batch.api import configure_jax

        self.options = SolverOptions.build(**options).resolved()
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        clash = sorted(set(keep_columns) & set(result_row_schema().names))
        if clash:
            raise ValueError(f"keep_columns {clash} would overwrite result columns")
        self.keep_columns = tuple(keep_columns)
        configure_jax()

    def __repr__(self) -> str:
        return f"BarycenterSolver({self.options})"

    def _solve(self, problems: Sequence[Problem], options: SolverOptions,
               ids: Sequence[int]) -> list:
        from raybary.batch.api import solve_with

        kw = {} if self.batch_size is None else {"batch_size": self.batch_size}
        return solve_with(problems, options, ids=ids, validate=False, **kw)

    def __call__(self, batch: Any) -> pa.Table:
        from raybary.batch.outcome import solve_outcome

        cols = decode_problems(batch)
        problems, errors = cols.to_problems(dtype=self.options.dtype)
        out = results_table(solve_outcome(cols.problem_id, problems, errors, self.options,
                                          solve_fn=self._solve))
        if self.keep_columns:
            kept = _as_table(batch, {n: None for n in self.keep_columns})
            for name in self.keep_columns:
                out = out.append_column(name, kept.column(name))
        return out


# ------------------------------------------------------------------ reading a store
def _read_shards(batch: dict, *, store, shard_size: int) -> pa.Table:
    """Map function of :func:`read_problems_dataset`: shard indices to problem rows."""
    tables = []
    for shard in np.asarray(batch["id"]).tolist():
        cols = store.read_columns(*shard_bounds(shard, store.n_problems, shard_size))
        structural = cols.structural_messages()
        errors = [join_messages(structural[i]) if i in structural else None
                  for i in range(cols.n_problems)]
        tables.append(columns_to_rows(cols, errors))
    return pa.concat_tables(tables) if tables else problem_row_schema().empty_table()


#: Read tasks of :func:`read_problems_dataset` at once (each reads one shard).
DEFAULT_READ_TASKS = 4


def read_problems_dataset(url: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
                          storage_options: Mapping[str, Any] | None = None,
                          num_cpus: float = 0.0, concurrency: int = DEFAULT_READ_TASKS,
                          **ray_remote_args: Any) -> ray.data.Dataset:
    """A problem store (Parquet or Zarr, local or remote) as a Ray dataset of
    problem rows (see the module docstring), one row per problem. Each read
    task yields ``shard_size`` problems in store order; the order of the
    shards is Ray Data's (``DataContext.get_current().execution_options.preserve_order
    = True`` keeps store order).

    The store is opened here (its schema checked, as ``raybary run`` does);
    the problems are read by Ray tasks, ``shard_size`` at a time
    (:meth:`~raybary.storage.ProblemStore.read_columns`), so the driver never
    holds them. Problems the store cannot decode (nulls, means of the wrong
    length, ...) come with ``error`` set to the message ``raybary run`` gives
    them, and :class:`BarycenterSolver` returns them ``invalid``; their
    values are checked by the solver, with its dtype. A relative local path
    is made absolute first (Ray's workers have their own working directory;
    the same goes for the paths given to Ray Data's writers). ``storage_options``
    go to the URL's fsspec filesystem (e.g. an S3 ``endpoint_url`` and keys);
    the read tasks get them with the store (as an argument, not through their
    environment).

    The read tasks ask Ray for ``num_cpus`` (default 0) and at most
    ``concurrency`` of them run at once (default :data:`DEFAULT_READ_TASKS`).
    Why 0: a solver actor pool as large as the cluster's CPUs
    (``ActorPoolStrategy(size=CPUs)``, one ``num_cpus=1`` actor per core)
    holds every CPU for the whole run, so a read task that waits for a free
    CPU never starts and the pipeline hangs with the actors idle. Reading a
    shard is mostly I/O and Arrow decoding, short next to solving it; the cap
    on concurrent tasks is what keeps reads from crowding the solvers (and
    from starting a worker process per shard). Raise ``concurrency`` for
    slow storage feeding many GPU actors. The shard numbers come from the
    driver (``ray.data.from_items``), so no other read task waits for a CPU
    either. Other ``ray_remote_args`` (``memory``, ``compute``, ...) go to
    the read tasks' ``map_batches``.
    """
    import ray.data

    from raybary.storage import open_store
    from raybary.storage._fs import absolute_local

    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if num_cpus < 0:
        raise ValueError(f"num_cpus must be at least 0, got {num_cpus}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1 (read tasks at once), got {concurrency}")
    # Ray's workers have their own working directory
    store = open_store(absolute_local(url), storage_options=storage_options)
    n_shards = shard_count(store.n_problems, shard_size)
    # from_items, not ray.data.range: range's read task asks for a whole CPU.
    shards = ray.data.from_items([{"id": i} for i in range(n_shards)],
                                 override_num_blocks=max(1, n_shards))
    # no more tasks than shards (Ray Data warns of a cap it cannot reach)
    tasks = max(1, min(int(concurrency), n_shards))
    ray_remote_args.setdefault("compute", ray.data.TaskPoolStrategy(size=tasks))
    return shards.map_batches(
        _read_shards, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"store": store, "shard_size": shard_size}, **ray_remote_args)
