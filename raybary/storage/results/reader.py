"""The reader of a results directory: :func:`read_results`, :class:`Results`, :class:`Grids`, :func:`summarize`.

This module owns reading ``OUT/``: it follows the commit markers (see
:mod:`~raybary.storage.results.layout`), so a reader never sees half a shard
or a duplicate, whatever the writers are doing meanwhile. It writes nothing.

Barycenters come back as :class:`raybary.GMM` (NumPy only, no JAX) with
:meth:`Results.barycenter`, :meth:`Results.iter_barycenters` and
:meth:`Results.barycenter_arrays`; an id without one raises
:class:`BarycenterNotFoundError`.
"""

from __future__ import annotations

import json
import operator
import posixpath
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute, for Results.plans
import pyarrow.parquet as pq

from raybary.errors import RaybaryError
from raybary.storage import _fs
from raybary.storage.options import StorageOptions
from raybary.storage.results.layout import (
    COMMIT_KEY,
    DEFAULT_TABLES,
    GRIDS_DIR,
    LAYOUT_FILE,
    MANIFEST_FILE,
    PLANS_DIR,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    STATUSES,
    UNREADABLE,
    barycenters_schema,
    curve_length,
    plans_schema,
    problems_schema,
    read_markers,
    shard_name,
)
from raybary.types import GMM

__all__ = ["BarycenterNotFoundError", "Curves", "Grids", "Results", "read_results", "summarize"]


class BarycenterNotFoundError(RaybaryError, KeyError):
    """A problem id has no barycenter in a results directory: the id is in no
    committed shard, or its problem's status is not ``"ok"`` (the message names
    the id, and the status and error). Also a :class:`KeyError`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Curves(NamedTuple):
    """Curve rows (``d = 1`` problems) of positions ``start:stop``; NaN / -1 where none.

    ``curve[k, c]`` is the log-density of the barycenter at ``x_c``,
    ``x = linspace(xmin, xmax, L)`` with ``(xmin, xmax) = extent[k]``;
    ``inputs[k, j]`` that of input GMM ``j`` (``None`` unless asked for).
    """

    problem_id: np.ndarray
    extent: np.ndarray
    curve: np.ndarray
    inputs: np.ndarray | None


class _Spans(NamedTuple):
    """Rows ``start:stop`` of the grids: the grid shape, shard size, and per
    committed shard overlapping them ``(shard, grids group or None, lo, hi)``."""

    shape: tuple[int, int]
    start: int
    stop: int
    size: int
    spans: list[tuple[int, str | None, int, int]]


class Grids(NamedTuple):
    """Grid rows of positions ``start:stop``; rows of uncommitted shards are NaN / -1."""

    problem_id: np.ndarray
    extent: np.ndarray
    barycenter: np.ndarray
    inputs: np.ndarray | None


@dataclass
class Results:
    """What :func:`read_results` returns.

    Attributes:
      url: the output directory.
      problems: one row per problem of the committed shards, in store order.
      barycenters: one row per barycenter component (ok problems only).
      layout: the run's settings (``_layout.json``).
      manifest: ``_manifest.json``, or ``None`` while the run is not finished.
      committed_shards: indices of the shards read.
      grid_groups: for each committed shard, the ``grids.zarr`` group its
        commit wrote (``None``: results of an older layout, whose grids are
        arrays at the root of ``grids.zarr``).
      storage_options: the fsspec options the directory was read with (grids
        are read with them too; never shown).
      commits: the commit id of each shard read (:meth:`plans` reads the
        same commits' plans).
      table_format: ``"pandas"`` or ``"pyarrow"``, as :func:`read_results` was asked.
    """

    url: str
    problems: Any
    barycenters: Any
    layout: dict
    manifest: dict | None
    committed_shards: list[int]
    grid_groups: dict[int, str | None] = field(default_factory=dict, repr=False)
    storage_options: StorageOptions = field(default_factory=StorageOptions, repr=False,
                                            compare=False)
    commits: dict[int, str] = field(default_factory=dict, repr=False)
    table_format: str = "pandas"

    @property
    def complete(self) -> bool:
        """Whether the run finished with every shard committed."""
        return bool(self.manifest and self.manifest.get("complete"))

    def _grid_spans(self, start: int, stop: int | None) -> _Spans:
        """Where rows ``start:stop`` (store positions) of the grids and curves are."""
        shape = self.layout.get("grid_shape")
        if shape is None:
            raise ValueError(f"{self.url} has no grids (the run had no grid_shape)")
        n, size = int(self.layout["n_problems"]), int(self.layout["shard_size"])
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        spans = []
        for shard in self.committed_shards:
            lo, hi = max(shard * size, start), min((shard + 1) * size, n, stop)
            if lo < hi:
                spans.append((shard, self.grid_groups.get(shard), lo, hi))
        return _Spans((int(shape[0]), int(shape[1])), start, stop, size, spans)

    def curves(self, start: int = 0, stop: int | None = None, *, inputs: bool = False) -> Curves:
        """Load the curve rows (``d = 1`` problems) ``start:stop`` (store positions),
        from the same groups as :meth:`grids`.

        Rows of problems without a curve (``d >= 2``, invalid; the barycenter's
        where not ``ok``) and of shards not committed are NaN, their problem id -1.
        """
        rows = self._grid_spans(start, stop)
        j = int(self.layout.get("input_grid_gmms") or 0) if inputs else 0
        m, length = rows.stop - rows.start, curve_length(rows.shape)
        out = Curves(np.full(m, -1, dtype=np.int64), np.full((m, 2), np.nan),
                     np.full((m, length), np.nan, dtype=np.float32),
                     np.full((m, j, length), np.nan, dtype=np.float32) if j else None)
        for shard, name, lo, hi in rows.spans:
            # a group that has gone: its rows stay NaN (grids() warns of it)
            source = (_attempt_group(self.url, shard, name, self.storage_options, warn=False)
                      if name else None)
            if source is None:
                continue
            dst, src = slice(lo - rows.start, hi - rows.start), slice(lo - shard * rows.size,
                                                                      hi - shard * rows.size)
            out.problem_id[dst] = source["problem_id"][src]
            out.extent[dst] = source["curve_extent"][src]
            out.curve[dst] = source["curve"][src]
            if out.inputs is not None and "curve_inputs" in source:
                out.inputs[dst] = source["curve_inputs"][src]
        return out

    def grids(self, start: int = 0, stop: int | None = None, *, inputs: bool = False) -> Grids:
        """Load grid rows ``start:stop`` (store positions) from ``grids.zarr``.

        A committed shard's rows come from the grids its commit wrote (the
        group its marker names), so they always match its rows in
        :attr:`problems`; rows of other shards are NaN / -1.
        """
        rows = self._grid_spans(start, stop)
        j = int(self.layout.get("input_grid_gmms") or 0) if inputs else 0
        out = _empty_grids(rows.stop - rows.start, rows.shape, j)
        for shard, name, lo, hi in rows.spans:
            source = (_attempt_group(self.url, shard, name, self.storage_options)
                      if name else None)
            first = shard * rows.size  # the store position of the group's row 0
            if source is not None:
                _copy_rows(out, source, slice(lo - rows.start, hi - rows.start),
                           slice(lo - first, hi - first))
        return out

    # -------------------------------------------------------- plans
    def plans(self, problem_ids: Sequence[int] | np.ndarray | None = None) -> Any:
        """The plans of the ``ok`` problems (all, or those of ``problem_ids``), one
        row per plan entry: ``problem_id, gmm, bar_component, component, mass``
        (a DataFrame, or a Table if read ``as_="pyarrow"``; ``plans/`` in
        docs/storage.md). Only in a run made with plans (``--plans``).

        The shards' plans are read when asked for, from the commits whose
        :attr:`problems` were read: a shard rewritten since is left out, with
        a warning (read the results again). With ``problem_ids``, only the
        shards that hold them are read.
        """
        if not self.layout.get("plans"):
            raise ValueError(f"{_fs.redact_url(self.url)} has no plans: the run did not store "
                             "them (raybary run --plans, or GridOptions(plans=True))")
        shard = _numbers(self.problems, "shard")
        wanted = None
        if problem_ids is not None:
            wanted = np.unique(np.asarray(problem_ids, dtype=np.int64).reshape(-1))
            shard = shard[np.isin(_numbers(self.problems, "problem_id"), wanted)]
        fs, root = _fs.url_to_fs(self.url, self.storage_options)
        tables = []
        for i in sorted(set(shard.tolist())):
            table, why = _committed_table(fs, root, PLANS_DIR, i, self.commits[i])
            if table is None:
                what = "was rewritten since the results were read" if why == _REWRITTEN else why
                warnings.warn(f"the plans of shard {i} are left out: {what} (read the results "
                              "again)", stacklevel=2)
                continue
            tables.append(table)
        out = _concat(tables, plans_schema())
        if wanted is not None:
            out = out.filter(pa.compute.is_in(out.column("problem_id"), pa.array(wanted)))
        return out.to_pandas() if self.table_format == "pandas" else out

    # -------------------------------------------------------- barycenters as GMMs
    def barycenter_arrays(self, problem_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The barycenter of problem ``problem_id`` as ``(weights (n,), means (n, d), covs (n, d, d))``.

        Components are in ``component`` order; each row's ``cov`` list is the
        covariance flattened row-major (``cov[i * d + j] = C[i, j]``). Raises
        :class:`BarycenterNotFoundError` if the id is in no committed shard or
        its status is not ``"ok"``.
        """
        pid = self._ok_problem(problem_id)
        table = self.barycenters
        rows = np.flatnonzero(_numbers(table, "problem_id") == pid)
        rows = rows[np.argsort(_numbers(table, "component")[rows], kind="stable")]
        return _BarycenterRows(table).arrays(rows)

    def barycenter(self, problem_id: int) -> GMM:
        """The barycenter of problem ``problem_id`` as a :class:`raybary.GMM`
        (``res.barycenter(pid).to_sklearn()`` gives it to scikit-learn); errors as
        :meth:`barycenter_arrays`."""
        return GMM(*self.barycenter_arrays(problem_id))

    def iter_barycenters(self) -> Iterator[tuple[int, GMM]]:
        """Yield ``(problem_id, GMM)`` for every ok problem, in ``problem_id`` order.

        One GMM at a time: the rows are ordered once by ``(problem_id,
        component)`` (an index array), and each GMM is built from its own rows
        only (a Table's list columns are read in place, chunk by chunk).
        """
        table = self.barycenters
        ids = _numbers(table, "problem_id")
        if not len(ids):
            return
        order = np.lexsort((_numbers(table, "component"), ids))
        sorted_ids = ids[order]
        cuts = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
        starts, stops = np.append(0, cuts), np.append(cuts, len(order))
        rows = _BarycenterRows(table)
        for a, b in zip(starts.tolist(), stops.tolist()):
            yield int(sorted_ids[a]), GMM(*rows.arrays(order[a:b]))

    def _ok_problem(self, problem_id: int) -> int:
        """``problem_id`` as an int, if its problem is here with status ok (else
        :class:`BarycenterNotFoundError`, naming the id and its status)."""
        pid = operator.index(problem_id)
        hit = np.flatnonzero(_numbers(self.problems, "problem_id") == pid)
        if not len(hit):
            where = "" if self.complete else "; the run is not finished: it may come later"
            raise BarycenterNotFoundError(
                f"problem {pid} is not in the results at {self.url} (in no committed shard{where})")
        status = _cell(self.problems, "status", int(hit[0]))
        if status != "ok":
            error = _cell(self.problems, "error", int(hit[0]))
            why = f": {error}" if isinstance(error, str) and error else ""
            raise BarycenterNotFoundError(
                f"problem {pid} has no barycenter: its status is {status!r}{why}")
        return pid


def _numbers(table, name: str) -> np.ndarray:
    """Column ``name`` of a DataFrame or Table as a NumPy array."""
    col = table.column(name) if isinstance(table, pa.Table) else table[name]
    return np.asarray(col.to_numpy())


def _cell(table, name: str, row: int):
    """The value at position ``row`` of column ``name`` of a DataFrame or Table."""
    if isinstance(table, pa.Table):
        return table.column(name)[row].as_py()
    return table[name].iloc[row]


class _ListColumn:
    """The rows of a ``list<double>`` column (Table or DataFrame) as flat NumPy arrays.

    A Table's chunks are viewed, not copied: row ``r`` of chunk ``c`` is
    ``values_c[offsets_c[r] - offsets_c[0] : offsets_c[r + 1] - offsets_c[0]]``.
    """

    def __init__(self, table, name: str) -> None:
        if isinstance(table, pa.Table):
            chunks = table.column(name).chunks
            self._values = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
            self._offsets = [c.offsets.to_numpy() for c in chunks]
            self._starts = np.cumsum([0] + [len(c) for c in chunks])
            self._objects = None
        else:
            self._objects = table[name].to_numpy()

    def flat(self, rows: np.ndarray) -> np.ndarray:
        """The lists of ``rows``, concatenated (float64)."""
        if self._objects is not None:
            parts = [np.asarray(self._objects[r], dtype=np.float64) for r in rows]
        else:
            parts = []
            for r in rows.tolist():
                c = int(np.searchsorted(self._starts, r, side="right")) - 1
                off, local = self._offsets[c], r - int(self._starts[c])
                parts.append(self._values[c][off[local] - off[0]:off[local + 1] - off[0]])
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


class _BarycenterRows:
    """Barycenter components of given rows of the ``barycenters`` table, as arrays."""

    def __init__(self, table) -> None:
        self._weight = _numbers(table, "weight")
        self._mean, self._cov = _ListColumn(table, "mean"), _ListColumn(table, "cov")

    def arrays(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(weights (n,), means (n, d), covs (n, d, d))`` of ``rows`` (in that order);
        ``d`` is the length of the rows' mean lists, covariances are row-major."""
        n = len(rows)
        means = self._mean.flat(rows)
        d = means.size // n if n else 0
        covs = self._cov.flat(rows)
        if means.size != n * d or covs.size != n * d * d:
            raise ValueError(f"barycenter rows of unequal or inconsistent lengths: {n} components, "
                             f"{means.size} mean and {covs.size} covariance values")
        return (self._weight[rows].astype(np.float64), means.reshape(n, d),
                covs.reshape(n, d, d))


def _attempt_group(url: str, shard: int, name: str, storage_options: StorageOptions, *,
                   warn: bool = True):
    """The grids group ``name`` of shard ``shard``'s committed attempt (``None``, with a
    warning unless ``warn`` is false, if it has gone: its rows stay NaN)."""
    try:
        return _fs.open_zarr_group(_fs.join_url(url, GRIDS_DIR, name), "r", storage_options)
    except _missing():
        if warn:
            warnings.warn(f"the grids of shard {shard} ({GRIDS_DIR}/{name}) are missing: its "
                          "grid rows are left NaN (a re-run redoes the shard)", stacklevel=3)
        return None


def _missing() -> tuple[type[Exception], ...]:
    """What opening a zarr group that is not there raises (zarr is imported only for grids)."""
    import zarr.errors

    return (FileNotFoundError, zarr.errors.NodeNotFoundError)


def _empty_grids(m: int, shape: tuple[int, int], j: int) -> Grids:
    """``m`` rows of no grid: problem id -1, NaN elsewhere; ``inputs`` only if ``j``."""
    h, w = shape
    return Grids(
        np.full(m, -1, dtype=np.int64),
        np.full((m, 4), np.nan, dtype=np.float64),
        np.full((m, h, w), np.nan, dtype=np.float32),
        np.full((m, j, h, w), np.nan, dtype=np.float32) if j else None,
    )


def _copy_rows(out: Grids, group, dst: slice, src: slice) -> None:
    out.problem_id[dst] = group["problem_id"][src]
    out.extent[dst] = group["extent"][src]
    out.barycenter[dst] = group["barycenter"][src]
    if out.inputs is not None and "inputs" in group:
        out.inputs[dst] = group["inputs"][src]


def read_results(path: str, *, as_: str = "pandas",
                 storage_options: Mapping[str, Any] | None = None) -> Results:
    """Read the committed shards of an output directory.

    Args:
      path: the output directory (local path or fsspec URL).
      as_: ``"pandas"`` (DataFrames) or ``"pyarrow"`` (Tables).
      storage_options: for the URL's fsspec filesystem (e.g. ``{"endpoint_url":
        ..., "key": ..., "secret": ...}`` for ``s3://``); kept by the
        :class:`Results` for its grids.

    Only shards with a commit marker are read, and only files whose commit id
    matches the marker (a shard being rewritten meanwhile is left out), so a
    reader never sees half a shard or a duplicate. The directories can also be
    read directly, e.g. ``duckdb.sql("SELECT * FROM 'OUT/problems/*.parquet'")``,
    once the manifest exists.
    """
    if as_ not in ("pandas", "pyarrow"):
        raise ValueError("as_ must be 'pandas' or 'pyarrow'")
    url = _fs.strip_url(str(path))
    options = StorageOptions.of(storage_options)
    fs, root = _fs.url_to_fs(url, options)
    layout_path = posixpath.join(root, LAYOUT_FILE)
    if not fs.exists(layout_path):
        raise FileNotFoundError(f"{_fs.redact_url(url)} is not a raybary results directory "
                                f"(no {LAYOUT_FILE})")
    layout = _fs.read_json(fs, layout_path)
    if tuple(layout.get("tables") or DEFAULT_TABLES)[:2] != DEFAULT_TABLES:
        raise ValueError(f"{_fs.redact_url(url)} holds the tables {layout['tables']}, not "
                         "barycenters: read a distance job's output with raybary.read_distances")
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    manifest = _fs.read_json(fs, manifest_path) if fs.exists(manifest_path) else None
    problems, barycenters, grid_groups, commits = [], [], {}, {}
    for shard, info in sorted(read_markers(fs, root).items()):
        tables = _read_shard(fs, root, shard, info)
        if tables is None:
            continue
        grid_groups[shard] = info.get("grids")
        commits[shard] = info["commit"]
        problems.append(tables[0])
        barycenters.append(tables[1])
    p = _concat(problems, problems_schema(layout.get("options") or {}))
    b = _concat(barycenters, barycenters_schema())
    if as_ == "pandas":
        p, b = p.to_pandas(), b.to_pandas()
    return Results(url, p, b, layout, manifest, list(grid_groups), grid_groups, options,
                   commits, as_)


_REWRITTEN = "rewritten"  # what _committed_table says of a table of another commit


def _read_shard(fs, root: str, shard: int, info: dict,
                subs: tuple[str, ...] = DEFAULT_TABLES) -> tuple[pa.Table, ...] | None:
    """The tables ``subs`` of a shard's committed attempt (``None``, with a
    warning, if one is not that attempt's). A marker that names plans must
    find its plans table of the same commit too (its footer only is read
    here; :meth:`Results.plans` reads the rows)."""
    out, why = [], ""
    for sub in subs:
        table, why = _committed_table(fs, root, sub, shard, info["commit"])
        if table is None:
            break
        out.append(table)
    if not why and "plan_rows" in info and PLANS_DIR not in subs:
        why = _committed_table(fs, root, PLANS_DIR, shard, info["commit"], footer=True)[1]
    if why == _REWRITTEN:
        warnings.warn(f"shard {shard} is being rewritten; left out", stacklevel=3)
    elif why:
        warnings.warn(f"{why}: shard {shard} left out (a re-run redoes it)", stacklevel=3)
    return None if why else tuple(out)


def _committed_table(fs, root: str, sub: str, shard: int, commit: str, *,
                     footer: bool = False) -> tuple[pa.Table | None, str]:
    """``(table, "")``: table ``sub`` of shard ``shard`` if its footer carries
    ``commit`` (``footer``: read the footer only, the table is ``None``); else
    ``(None, why)``: :data:`_REWRITTEN`, or that it cannot be read."""
    path = posixpath.join(root, sub, shard_name(shard) + ".parquet")
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f) if footer else None
            table = None if footer else pq.read_table(f)
    except FileNotFoundError:
        return None, _REWRITTEN
    except UNREADABLE as e:
        return None, f"{sub}/{posixpath.basename(path)} cannot be read ({type(e).__name__})"
    schema = schema if footer else table.schema
    if (schema.metadata or {}).get(COMMIT_KEY, b"").decode() != commit:
        return None, _REWRITTEN
    return (None if footer else table.replace_schema_metadata(None)), ""


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


# ------------------------------------------------------------------ summary
def summarize(path: str, *, top: int = 5,
              storage_options: Mapping[str, Any] | None = None) -> str:
    """A text summary of an output directory (what ``raybary show`` prints)."""
    res = read_results(path, storage_options=storage_options)
    p = res.problems
    lines = [f"results {_fs.redact_url(res.url)} ({RESULTS_FORMAT}/{RESULTS_VERSION})"]
    lay = res.layout
    state = "finished" if res.manifest else "not finished (no manifest)"
    lines.append(f"  input: {lay.get('input_url')}  problems: {lay['n_problems']}  "
                 f"shards: {len(res.committed_shards)}/{lay.get('n_shards')} committed, {state}")
    counts = p["status"].value_counts().to_dict() if len(p) else {}
    lines.append("  status: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES))
    if lay.get("options"):
        lines.append("  options: " + json.dumps(lay["options"], sort_keys=True))
    obj = p.loc[p["status"] == "ok", "objective"].dropna() if len(p) else p.get("objective")
    if obj is not None and len(obj):
        qs = obj.quantile([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        lines.append("  objective quantiles: " + ", ".join(
            f"{label} {v:.6g}" for label, v in zip(["min", "5%", "25%", "50%", "75%", "95%", "max"], qs)))
        conv = p.loc[p["status"] == "ok", "converged"]
        lines.append(f"  converged: {int(conv.sum())} of {len(conv)} ok")
    solved = p[p["status"] != "invalid"] if len(p) else p
    if len(solved) and solved["seconds"].notna().any():
        lines.append(f"  solver time: {p['seconds'].sum():.3f} s in all")
        slow = solved.nlargest(top, "seconds")
        lines.append(f"  slowest {len(slow)} (their share of the solver time, by plan iterations):")
        for _, r in slow.iterrows():
            its = "-" if r.iterations != r.iterations else int(r.iterations)
            lines.append(f"    problem {r.problem_id}: {r.seconds:.4f} s, status {r.status}, "
                         f"iterations {its}")
    for status in ("failed", "invalid"):
        bad = p[p["status"] == status] if len(p) else p
        if len(bad):
            lines.append(f"  {status} ({len(bad)}; first {min(len(bad), 2 * top)}):")
            for _, r in bad.head(2 * top).iterrows():
                named = str(r.error).startswith(f"problem {r.problem_id}")
                lines.append(f"    {r.error}" if named else f"    problem {r.problem_id}: {r.error}")
    return "\n".join(lines)
