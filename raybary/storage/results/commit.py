"""Committing one shard of results, in an actor: :class:`ShardCommitter`.

A committer is small and picklable (the URL and the run's settings, no
lease, no driver state): the driver's :class:`~raybary.storage.results.ResultWriter`
makes one (:meth:`~raybary.storage.results.ResultWriter.committer`) and each
actor gets a copy.

A commit draws a commit id, writes the shard's grids into a group named by
it (``grids.zarr/shard-000012-<commit>``: no other attempt writes there, and
the committed attempt's grids are not touched), removes the shard's old
marker, writes each table (its footer carries the commit id: ``problems``,
``barycenters`` and, in a run that stores plans, ``plans``) to ``_tmp/`` and
renames it onto its fixed name, then writes the marker (the commit id, the
grids group and, with plans, ``plan_rows``: the marker says which tables it
commits, :func:`~raybary.storage.results.layout.marker_tables`). A reader that follows the markers never sees half a shard, a
rewritten shard replaces the old one (same file names; the marker names the
new grids): never a duplicate, and a shard's grids always come from the
attempt whose tables are read.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.arrow import list_array, offsets
from raybary.storage.base import shard_bounds, shard_count
from raybary.storage.errors import InputChangedError
from raybary.storage.options import StorageOptions
from raybary.storage.results.layout import (
    COMMIT_KEY,
    COMMITS_DIR,
    DEFAULT_TABLES,
    GRIDS_DIR,
    PLANS_DIR,
    barycenters_schema,
    curve_length,
    grid_group_name,
    input_changes,
    now_iso,
    option_columns,
    plans_schema,
    problems_schema,
    result_columns,
    run_tmp,
    shard_name,
)
from raybary.types import BatchOutcome

__all__ = ["ShardCommitter", "ShardGrids"]


class ShardGrids(NamedTuple):
    """The log-densities of one shard, rows in shard order (NaN rows where none).

    ``d >= 2`` problems have grids: ``barycenter [n,H,W]``, ``extent [n,4]``
    (xmin, xmax, ymin, ymax), ``inputs [n,J,H,W]`` (``J`` up to the run's
    input grids, NaN-padded); ``d = 1`` problems curves: ``curve [n,L]``,
    ``curve_extent [n,2]`` (xmin, xmax), ``curve_inputs [n,J,L]``. A problem
    has a grid row or a curve row, not both. A field left ``None`` is all NaN.
    """

    barycenter: np.ndarray | None = None
    extent: np.ndarray | None = None
    inputs: np.ndarray | None = None
    curve: np.ndarray | None = None
    curve_extent: np.ndarray | None = None
    curve_inputs: np.ndarray | None = None


@dataclass(frozen=True)
class ShardCommitter:
    """Writes and commits the shards of one run (see the module docstring).

    Attributes are the run's settings (as :class:`~raybary.storage.results.ResultWriter`
    takes them): the output ``url``, the ``run_id`` whose ``_tmp/`` folder it
    writes through, ``n_problems`` and ``shard_size`` (shard ``i`` is store
    positions :meth:`shard_range` ``(i)``), ``grid_shape`` and
    ``input_grid_gmms``, the solver ``options`` (recorded as ``opt_<key>``
    columns), the input's URL, fingerprint and per-shard first and last
    problem ids (:meth:`check_input` compares them), ``plans`` (also
    write each shard's plans, ``plans/``), and the output's
    ``storage_options`` (an actor writes with them; never shown).
    """

    url: str
    run_id: str
    n_problems: int
    shard_size: int
    grid_shape: tuple[int, int] | None = None
    input_grid_gmms: int = 0
    options: dict | None = None
    input_url: str | None = None
    input_fingerprint: dict | None = None
    input_shards: list | None = None
    plans: bool = False
    storage_options: StorageOptions = field(default_factory=StorageOptions, repr=False,
                                            compare=False)
    tables: tuple[str, ...] = DEFAULT_TABLES
    shard_stops: tuple[int, ...] | None = None

    def filesystem(self):
        """``(fs, root)`` of the output, with its storage options."""
        return _fs.url_to_fs(self.url, self.storage_options)

    @property
    def n_shards(self) -> int:
        if self.shard_stops is not None:
            return len(self.shard_stops)
        return shard_count(self.n_problems, self.shard_size)

    @property
    def curve_length(self) -> int | None:
        """Points of a ``d = 1`` problem's curve (``None`` without grids)."""
        return None if self.grid_shape is None else curve_length(self.grid_shape)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Positions ``(start, stop)`` of shard ``shard_index``: ``shard_size``
        consecutive positions each, or, where ``shard_stops`` is given (shards
        of unequal sizes, e.g. the tiles of a distance job), up to the shard's stop."""
        if self.shard_stops is None:
            return shard_bounds(shard_index, self.n_problems, self.shard_size)
        if not 0 <= shard_index < len(self.shard_stops):
            raise IndexError(f"shard {shard_index} is outside 0..{len(self.shard_stops) - 1}")
        start = self.shard_stops[shard_index - 1] if shard_index else 0
        return int(start), int(self.shard_stops[shard_index])

    def check_input(self, store, shard_index: int, problem_ids: np.ndarray) -> None:
        """After reading a shard: raise :class:`InputChangedError` if the input is
        not the one this run started on (its fingerprint, or the shard's first
        and last problem id, differ)."""
        changes = []
        if self.input_shards is not None and len(problem_ids):
            want = self.input_shards[shard_index]
            got = [int(problem_ids[0]), int(problem_ids[-1])]
            if got != want:
                changes.append(f"shard {shard_index}: problem ids {want[0]}..{want[1]} at the "
                               f"start, {got[0]}..{got[1]} now")
        if self.input_fingerprint is not None:
            changes += input_changes(self.input_fingerprint, store.fingerprint())
        if changes:
            raise InputChangedError(
                f"the input {self.input_url} changed during the run:\n"
                + "\n".join(f"  - {c}" for c in changes)
                + "\nthe run stops (results already committed are of the old input); "
                "start over with --overwrite once the input is final."
            )

    def commit_shard(self, shard_index: int, outcome: BatchOutcome,
                     grids: ShardGrids | None = None, gave_up: str | None = None) -> dict:
        """Write and atomically commit shard ``shard_index``; return its marker.

        ``outcome`` has one row per problem of the shard, in store order (a
        result given for a ``failed`` problem is recorded in ``problems/`` but
        no barycenter rows are written). ``grids`` (required to be shaped for
        this run; ``None``: NaN rows) go into a group of this commit's own,
        written before the old marker is removed: an attempt that stops after
        its grids leaves the committed shard as it was. ``gave_up``: the
        shard was not solved (every attempt was lost to infrastructure
        faults); recorded in the marker, so that a resumed run solves it again.
        """
        start, stop = self.shard_range(shard_index)
        if len(outcome) != stop - start:
            raise ValueError(f"shard {shard_index} has {stop - start} problems (positions "
                             f"{start}:{stop}), the outcome {len(outcome)}")
        block = None if self.grid_shape is None else self._grid_block(outcome, grids)
        commit = uuid.uuid4().hex
        extra = {}
        if block is not None:  # into a group of this commit's own: the committed one is untouched
            extra["grids"] = self._write_grids(shard_index, start, stop, commit, block)
        tables = {"problems": self._problems_table(shard_index, start, outcome),
                  "barycenters": _barycenters_table(outcome)}
        extra["barycenter_rows"] = tables["barycenters"].num_rows
        if self.plans:
            tables[PLANS_DIR] = _plans_table(outcome)
            extra["plan_rows"] = tables[PLANS_DIR].num_rows
        return self.commit_tables(
            shard_index, tables, outcome.counts(), seconds=float(np.nansum(outcome.seconds)), gave_up=gave_up,
            commit=commit, extra=extra)

    def commit_tables(self, shard_index: int, tables: Mapping[str, pa.Table],
                      counts: Mapping[str, int], *, seconds: float = 0.0,
                      gave_up: str | None = None, commit: str | None = None,
                      extra: Mapping[str, object] | None = None) -> dict:
        """Atomically commit shard ``shard_index``'s ``tables`` (one per name of
        :attr:`tables`, e.g. ``{"problems": ..., "barycenters": ...}``); return its marker.

        The protocol of every kind of run (the module docstring): remove the old
        marker, write each table through ``_tmp/`` onto ``sub/shard-NNNNNN.parquet``
        with ``commit`` (a new id if ``None``) in its footer, then write the
        marker: the shard's range, ``counts`` by status, ``seconds``, ``extra``
        entries (the grids group, ...) and ``gave_up`` where given. A marker of
        a run whose tables are not the default ones lists them (``tables``), so
        that verifying it checks those files.
        """
        if sorted(tables) != sorted(self.tables):
            raise ValueError(f"shard {shard_index}: tables {sorted(tables)} given, this run "
                             f"writes {sorted(self.tables)}")
        start, stop = self.shard_range(shard_index)
        fs, root = self.filesystem()
        commit = commit or uuid.uuid4().hex
        info = {"shard": shard_index, "start": start, "stop": stop, "commit": commit,
                "counts": {k: int(v) for k, v in counts.items()}, "seconds": float(seconds),
                **(extra or {})}
        if tuple(self.tables) != DEFAULT_TABLES:
            info["tables"] = list(self.tables)
        marker = posixpath.join(root, COMMITS_DIR, shard_name(shard_index) + ".json")
        if fs.exists(marker):
            fs.rm(marker)
        _write_tables(fs, root, shard_name(shard_index), commit, run_tmp(root, self.run_id),
                      dict(tables))
        info["committed"] = now_iso()
        if gave_up is not None:
            info["gave_up"] = str(gave_up)
        _fs.write_json_atomic(fs, marker, info, run_tmp(root, self.run_id))
        return info

    def _grid_block(self, outcome: BatchOutcome, grids: ShardGrids | None) -> dict[str, np.ndarray]:
        """The shard's grid and curve arrays, checked (before anything is written)."""
        g = grids or ShardGrids()
        n, (h, w), length = len(outcome), self.grid_shape, self.curve_length
        block = {
            "problem_id": outcome.problem_ids,
            "extent": _grid_rows(g.extent, (n, 4), "extent", np.float64),
            "barycenter": _grid_rows(g.barycenter, (n, h, w), "barycenter"),
            "curve_extent": _grid_rows(g.curve_extent, (n, 2), "curve_extent", np.float64),
            "curve": _grid_rows(g.curve, (n, length), "curve"),
        }
        if self.input_grid_gmms:
            block["inputs"] = _input_rows(g.inputs, n, self.input_grid_gmms, (h, w), "inputs")
            block["curve_inputs"] = _input_rows(g.curve_inputs, n, self.input_grid_gmms,
                                                (length,), "curve_inputs")
        elif g.inputs is not None or g.curve_inputs is not None:
            raise ValueError("input grids given but the run stores none (input_grid_gmms=0)")
        return block

    def _write_grids(self, shard_index: int, start: int, stop: int, commit: str,
                     block: dict[str, np.ndarray]) -> str:
        """Write the grids of commit ``commit`` into a new group of their own; return its name."""
        name = grid_group_name(shard_index, commit)
        group = _fs.open_zarr_group(_fs.join_url(self.url, GRIDS_DIR, name), "w",
                                    self.storage_options)
        for key, arr in block.items():
            fill = -1 if key == "problem_id" else float("nan")
            out = group.create_array(key, shape=arr.shape, chunks=arr.shape, dtype=arr.dtype,
                                     fill_value=fill, dimension_names=_GRID_DIMS[key])
            out[...] = arr
        group.attrs.update({"shard": shard_index, "start": start, "stop": stop, "commit": commit})
        return name

    def _problems_table(self, shard_index: int, start: int, outcome: BatchOutcome) -> pa.Table:
        n = len(outcome)
        columns = {
            "problem_id": pa.array(outcome.problem_ids, pa.int64()),
            "position": pa.array(np.arange(start, start + n), pa.int64()),
            "shard": pa.array(np.full(n, shard_index), pa.int32()),
            "status": pa.array(outcome.statuses, pa.string()),
            "error": pa.array(outcome.errors, pa.string()),
            **result_columns(outcome.results),
            "seconds": pa.array(outcome.seconds, pa.float64()),
        }
        for key, (dtype, value) in option_columns(self.options or {}).items():
            columns[key] = pa.array([value] * n, dtype)
        return pa.table(columns, schema=problems_schema(self.options or {}))


_GRID_DIMS = {
    "problem_id": ["problem"],
    "extent": ["problem", "xmin_xmax_ymin_ymax"],
    "barycenter": ["problem", "y", "x"],
    "inputs": ["problem", "gmm", "y", "x"],
    "curve_extent": ["problem", "xmin_xmax"],
    "curve": ["problem", "x"],
    "curve_inputs": ["problem", "gmm", "x"],
}


def _grid_rows(arr, shape, name, dtype=np.float32) -> np.ndarray:
    if arr is None:
        return np.full(shape, np.nan, dtype=dtype)
    arr = np.asarray(arr, dtype=dtype)
    if arr.shape != shape:
        raise ValueError(f"grids.{name} must have shape {shape}, got {arr.shape}")
    return arr


def _input_rows(arr, n: int, j: int, tail: tuple[int, ...], name: str) -> np.ndarray:
    """``[n, j, *tail]`` float32 rows of input GMMs: ``arr`` ``[n, J <= j, *tail]``, NaN-padded."""
    out = np.full((n, j, *tail), np.nan, dtype=np.float32)
    if arr is not None:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim != 2 + len(tail) or arr.shape[0] != n or arr.shape[2:] != tail \
                or arr.shape[1] > j:
            raise ValueError(f"grids.{name} must have shape ({n}, J <= {j}, "
                             f"{', '.join(map(str, tail))}), got {arr.shape}")
        out[:, : arr.shape[1]] = arr
    return out


def _barycenters_table(outcome: BatchOutcome) -> pa.Table:
    """One row per barycenter component of the shard's ``ok`` problems."""
    rows = [(pid, r) for pid, s, r in zip(outcome.problem_ids, outcome.statuses, outcome.results)
            if s == "ok"]
    if not rows:
        return barycenters_schema().empty_table()
    sizes = np.array([len(r.weights) for _, r in rows], dtype=np.int64)
    means = [np.asarray(r.means, dtype=np.float64) for _, r in rows]
    covs = [np.asarray(r.covs, dtype=np.float64) for _, r in rows]
    mean_len = np.repeat([m.shape[1] if m.ndim == 2 else 0 for m in means], sizes)
    smaller = "shards (--shard-size)"
    return pa.table(
        {
            "problem_id": pa.array(np.repeat([i for i, _ in rows], sizes), pa.int64()),
            "component": pa.array(np.concatenate([np.arange(k) for k in sizes]), pa.int32()),
            "weight": pa.array(np.concatenate([np.asarray(r.weights, np.float64) for _, r in rows])),
            "mean": list_array(offsets(mean_len), np.concatenate([m.reshape(-1) for m in means]),
                               smaller=smaller),
            "cov": list_array(offsets(mean_len * mean_len),
                              np.concatenate([c.reshape(-1) for c in covs]), smaller=smaller),
        },
        schema=barycenters_schema(),
    )


def _plans_table(outcome: BatchOutcome) -> pa.Table:
    """One row per plan entry of the shard's ``ok`` problems: every entry of
    every plan (``Result.plans``, padding already dropped; a GMM without a
    plan, of lambda 0, has no rows), zeros included, in the order problem,
    gmm, bar_component, component."""
    ids, gmms, bars, comps, masses = [], [], [], [], []
    for pid, status, r in zip(outcome.problem_ids, outcome.statuses, outcome.results):
        if status != "ok" or r is None or r.plans is None:
            continue
        for j, plan in enumerate(r.plans):
            if plan is None:
                continue
            plan = np.asarray(plan, np.float64)
            bar, comp = np.indices(plan.shape, dtype=np.int32)
            ids.append(np.full(plan.size, pid, np.int64))
            gmms.append(np.full(plan.size, j, np.int32))
            bars.append(bar.reshape(-1))
            comps.append(comp.reshape(-1))
            masses.append(plan.reshape(-1))
    if not ids:
        return plans_schema().empty_table()
    columns = [np.concatenate(c) for c in (ids, gmms, bars, comps, masses)]
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=plans_schema())


def _write_tables(fs, root: str, name: str, commit: str, tmp: str,
                  tables: dict[str, pa.Table]) -> None:
    """Write ``sub/name.parquet`` for each table, its footer carrying ``commit``."""
    for sub, table in tables.items():
        table = table.replace_schema_metadata({COMMIT_KEY: commit.encode()})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        _fs.write_bytes_atomic(fs, posixpath.join(root, sub, name + ".parquet"),
                               sink.getvalue(), tmp)
