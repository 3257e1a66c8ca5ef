"""The writer of a results directory: :class:`ResultWriter` (lease, prepare, commits, finalize).

This module owns everything that writes ``OUT/`` (the names, schemas and
markers it follows are in :mod:`~raybary.storage.results.layout`).

Usage (the runner)::

    writer = ResultWriter(out, n_problems=store.n_problems, shard_size=1000,
                          grid_shape=(100, 100), input_grid_gmms=3,
                          options=solver_options, input_url=store.url)
    done = writer.prepare()                    # driver, once; returns committed shards
    for i in range(writer.n_shards):           # each in some actor
        if i in done: continue
        start, stop = writer.shard_range(i)
        ...
        writer.commit_shard(i, start, stop, ids, statuses, errors, results, seconds,
                            grids=g, grid_extents=e, input_grids=gi,
                            curves=c, curve_extents=ce, input_curves=ci)  # d = 1 problems
    writer.finalize({"wall_seconds": ...})     # driver, once, last

A commit draws a commit id, writes the shard's grids into a group named by
it (``grids.zarr/shard-000012-<commit>``: no other attempt writes there, and
the committed attempt's grids are not touched), removes the shard's old
marker, writes each table (its footer carries the commit id) to ``_tmp/`` and
renames it onto its fixed name, then writes the marker (the commit id and the
grids group). A reader that follows the markers
(:func:`~raybary.storage.results.read_results`) never sees half a shard, a
rewritten shard replaces the old one (same file names; the marker names the
new grids): never a duplicate, and a shard's grids always come from the
attempt whose tables are read. :meth:`ResultWriter.finalize` removes the
grids of attempts that did not commit.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import socket
import time
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.errors import InputChangedError, ResultsConflictError
from raybary.storage.results.layout import (
    _SETTINGS,
    COMMIT_KEY,
    COMMITS_DIR,
    GRIDS_DIR,
    GRIDS_FORMAT,
    GRIDS_VERSION,
    LAYOUT_FILE,
    LEASE_FILE,
    LEASE_SETTLE_S,
    LEASE_STALE_S,
    MANIFEST_FILE,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    STATUSES,
    TMP_DIR,
    _attempt_grids,
    _differences,
    _fresh_listing,
    _jsonable,
    _now,
    _option_columns,
    _pid_alive,
    _read_lease,
    _shard_name,
    _shard_of,
    _verified_markers,
    barycenters_schema,
    curve_length,
    grid_group_name,
    input_changes,
    problems_schema,
)
from raybary.types import Result

__all__ = ["ResultWriter"]


class ResultWriter:
    """Writes one run's results; picklable (holds the URL and settings only).

    Args:
      url: the output directory (local path or fsspec URL).
      n_problems: problems in the input store (grid rows = store positions).
      shard_size: problems per shard; shard ``i`` is positions
        ``i*shard_size : min((i+1)*shard_size, n_problems)``.
      grid_shape: ``(H, W)`` of the log-density grids, or ``None`` for no grids;
        ``d = 1`` problems get curves of :attr:`curve_length` ``= max(H, W)``
        points instead.
      input_grid_gmms: store the input GMMs' grids (and curves) too, up to
        this many GMMs per problem (``0``: none); ``inputs`` is
        ``[n, input_grid_gmms, H, W]``, ``curve_inputs`` ``[n, input_grid_gmms, L]``.
      options: the solver options (JSON-able); recorded in the layout, the
        manifest and as ``opt_<key>`` columns of ``problems/``.
      input_url: the input store's URL, recorded.
      input_fingerprint: the input's :meth:`ProblemStore.fingerprint`, and
      input_shards: each shard's first and last problem id: recorded, and a
        resume against an input that differs in either is refused.
    """

    def __init__(
        self,
        url: str,
        *,
        n_problems: int,
        shard_size: int,
        grid_shape: tuple[int, int] | None = None,
        input_grid_gmms: int = 0,
        options: dict | None = None,
        input_url: str | None = None,
        input_fingerprint: dict | None = None,
        input_shards: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        if input_grid_gmms and grid_shape is None:
            raise ValueError("input_grid_gmms needs a grid_shape")
        self.url = _fs.strip_url(str(url))
        self.n_problems = int(n_problems)
        self.shard_size = int(shard_size)
        self.grid_shape = None if grid_shape is None else (int(grid_shape[0]), int(grid_shape[1]))
        self.input_grid_gmms = int(input_grid_gmms)
        self.options = _jsonable(options or {})
        self.input_url = input_url
        self.retried_gave_up: list[int] = []  # set by prepare()
        self.run_id = uuid.uuid4().hex[:16]  # this run's temporary files and lease
        self._leased = False
        self.input_fingerprint = input_fingerprint
        self.input_shards = None if input_shards is None else [
            [int(a), int(b)] for a, b in input_shards]

    # ------------------------------------------------------------- geometry
    @property
    def curve_length(self) -> int | None:
        """Points of a ``d = 1`` problem's curve (``None`` without grids)."""
        return None if self.grid_shape is None else curve_length(self.grid_shape)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_problems / self.shard_size)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Positions ``(start, stop)`` of shard ``shard_index``."""
        if not 0 <= shard_index < self.n_shards:
            raise IndexError(f"shard {shard_index} is outside 0..{self.n_shards - 1}")
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.n_problems)

    def settings(self) -> dict:
        out = {k: getattr(self, k) for k in _SETTINGS}
        if out.get("input_url"):  # never record credentials
            out["input_url"] = _fs.redact_url(out["input_url"])
        return _jsonable(out)

    def _paths(self) -> tuple[Any, str]:
        return _fs.url_to_fs(self.url)

    def _tmp(self, root: str) -> str:
        """This run's temporary folder (other runs' are never touched)."""
        return posixpath.join(root, TMP_DIR, self.run_id)

    # ---------------------------------------------------------------- lease
    def acquire_lease(self) -> None:
        """Take OUTPUT's lease (``_lease.json``: run id, host, pid, heartbeat),
        driver side, before :meth:`prepare`.

        Another run's lease with a heartbeat younger than ``LEASE_STALE_S``
        raises :class:`ResultsConflictError`; an older one, or one whose
        driver ran on this machine and has exited, is taken over (its run is
        presumed dead). The lease is written, then read back after a
        moment: of two runs starting at once, the one that reads another id
        gives up. Works alike on local disks and object stores (no locks, one
        small object). A folder that is not raybary results is left alone
        (:meth:`prepare` refuses it)."""
        fs, root = self._paths()
        if fs.exists(root) and self._foreign(fs, root):
            return
        held = _read_lease(fs, root)
        if held is not None and held.get("run_id") != self.run_id:
            age = time.time() - float(held.get("heartbeat", 0.0))
            gone = held.get("host") == socket.gethostname() and not _pid_alive(held.get("pid"))
            if gone:  # its driver ran on this machine and has exited (killed, crashed)
                age = max(age, LEASE_STALE_S)
            if age < LEASE_STALE_S:
                raise ResultsConflictError(
                    f"another run is writing {self.url}: run {held.get('run_id')} on "
                    f"{held.get('host')} (pid {held.get('pid')}), last heartbeat {age:.0f} s "
                    f"ago. Wait for it to finish or stop it (a lease without a heartbeat for "
                    f"{LEASE_STALE_S:.0f} s is taken over), or write to another OUTPUT."
                )
            warnings.warn(f"taking over {self.url} from run {held.get('run_id')}, whose last "
                          f"heartbeat was {age:.0f} s ago", stacklevel=2)
        self._write_lease(fs, root)
        time.sleep(LEASE_SETTLE_S)
        now = _read_lease(fs, root)
        if now is None or now.get("run_id") != self.run_id:
            raise ResultsConflictError(
                f"another run (run {None if now is None else now.get('run_id')}) took "
                f"{self.url} at the same moment; wait for it or write to another OUTPUT")
        self._leased = True

    def heartbeat(self) -> bool:
        """Refresh the lease (driver, every ``LEASE_HEARTBEAT_S``); ``False`` if
        another run has taken it over (this one should stop writing)."""
        if not self._leased:
            return True
        fs, root = self._paths()
        held = _read_lease(fs, root)
        if held is not None and held.get("run_id") != self.run_id:
            self._leased = False
            return False
        self._write_lease(fs, root)
        return True

    def release_lease(self) -> None:
        """Give the lease back (driver, at the end, whatever happened)."""
        if not self._leased:
            return
        self._leased = False
        fs, root = self._paths()
        held = _read_lease(fs, root)
        if held is not None and held.get("run_id") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(posixpath.join(root, LEASE_FILE))

    def _write_lease(self, fs, root: str) -> None:
        lease = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                 "heartbeat": time.time(), "written": _now()}
        _fs.write_json_atomic(fs, posixpath.join(root, LEASE_FILE), lease, self._tmp(root))

    @staticmethod
    def _foreign(fs, root: str) -> bool:
        """A non-empty folder without our layout: not raybary results."""
        if fs.exists(posixpath.join(root, LAYOUT_FILE)):
            return False
        names = {posixpath.basename(_fs.strip_url(p)) for p in fs.ls(root, detail=False)}
        return bool(names - {LEASE_FILE, TMP_DIR})

    # -------------------------------------------------------------- prepare
    def prepare(self, *, overwrite: bool = False) -> set[int]:
        """Create the layout (driver, once); return the shards already committed.

        If ``url`` holds results written with the same settings, they are kept
        (a re-run skips the committed shards, except those that gave up, whose
        problems were committed ``failed`` after infrastructure faults: they
        are solved again) and the old manifest is removed.
        Different settings raise :class:`ResultsConflictError` (listing the
        differences) unless ``overwrite=True``, which deletes the old results
        and starts afresh. A non-empty directory that is not raybary results,
        and an output that is, contains or lies inside the input store, are
        refused even with ``overwrite=True``: nothing but our own results is
        ever deleted.
        """
        fs, root = self._paths()
        self._check_not_input(fs, root)
        if fs.exists(root):
            layout_path = posixpath.join(root, LAYOUT_FILE)
            if fs.exists(layout_path):
                old = _fs.read_json(fs, layout_path)
                diffs = _differences({k: old.get(k) for k in _SETTINGS}, self.settings())
                if not overwrite and diffs:
                    raise ResultsConflictError(
                        f"{self.url} holds results written with different settings:\n"
                        + "\n".join(f"  - {d}" for d in diffs)
                        + "\npass overwrite=True (--overwrite) to replace them"
                    )
                if not overwrite:
                    self._check_same_input(old)
                    if fs.exists(posixpath.join(root, MANIFEST_FILE)):
                        fs.rm(posixpath.join(root, MANIFEST_FILE))
                    markers = _verified_markers(fs, root, repair=True)
                    # shards that gave up (infrastructure faults) are solved again
                    self.retried_gave_up = sorted(k for k, m in markers.items()
                                                  if m.get("gave_up"))
                    return {k for k, m in markers.items() if not m.get("gave_up")}
            elif self._foreign(fs, root):
                raise ResultsConflictError(
                    f"{self.url} exists, is not empty and is not a raybary results directory "
                    f"(no {LAYOUT_FILE}); raybary does not write into or delete it, even with "
                    "--overwrite: choose a new or empty OUTPUT"
                )
            fs.rm(root, recursive=True)
            if self._leased:  # it went with the old results
                self._write_lease(fs, root)
        for sub in ("problems", "barycenters", COMMITS_DIR, TMP_DIR):
            fs.makedirs(posixpath.join(root, sub), exist_ok=True)
        if self.grid_shape is not None:
            self._create_grids()
        layout = {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                  "created": _now(), "n_shards": self.n_shards, **self.settings()}
        if self.input_fingerprint is not None:
            layout["input_fingerprint"] = self.input_fingerprint
        if self.input_shards is not None:
            layout["input_shards"] = self.input_shards
        _fs.write_json_atomic(fs, posixpath.join(root, LAYOUT_FILE), layout, self._tmp(root))
        return set()

    def _check_same_input(self, old: dict) -> None:
        """Refuse to resume results of an input that has changed since."""
        changes = input_changes(old.get("input_fingerprint"), self.input_fingerprint,
                                old.get("input_shards"), self.input_shards)
        if changes:
            raise ResultsConflictError(
                f"the input {self.input_url} changed since the results in {self.url} were "
                f"started ({old.get('created', '?')}):\n"
                + "\n".join(f"  - {c}" for c in changes)
                + "\nresuming would mix results of two inputs. Start over with --overwrite "
                "(overwrite=True; deletes the old results), or write to a new OUTPUT."
            )

    def check_input(self, store, shard_index: int, problem_ids: np.ndarray) -> None:
        """In an actor, after reading a shard: raise :class:`InputChangedError`
        if the input is not the one this run started on (its fingerprint, or
        the shard's first and last problem id, differ)."""
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

    def _check_not_input(self, fs, root: str) -> None:
        """Refuse an output that is, contains or lies inside the input store."""
        if not self.input_url:
            return
        try:
            in_fs, in_root = _fs.url_to_fs(self.input_url)
        except ImportError:  # no driver for the input's protocol here: not the output's
            return
        if _fs.fs_protocols(in_fs) != _fs.fs_protocols(fs):
            return
        out_p, in_p = _fs.canonical_path(fs, root), _fs.canonical_path(in_fs, in_root)
        if out_p == in_p or in_p.startswith(out_p.rstrip("/") + "/"):
            where = "is" if out_p == in_p else "contains"
        elif out_p.startswith(in_p.rstrip("/") + "/"):
            where = "is inside"
        else:
            return
        raise ResultsConflictError(
            f"the output {self.url} {where} the input store {self.input_url}; "
            "results go to a directory of their own (for example next to the input)"
        )

    def _create_grids(self) -> None:
        """Create ``grids.zarr``: a group whose attributes describe the grids;
        each attempt at a shard adds a group of its own (:meth:`_write_grids`)."""
        h, w = self.grid_shape
        group = _fs.open_zarr_group(_fs.join_url(self.url, GRIDS_DIR), "w")
        group.attrs.update({
            "format": GRIDS_FORMAT, "format_version": GRIDS_VERSION,
            "values": "log-density",
            "layout": "one group per attempt at a shard, shard-NNNNNN-<commit>; the shard's "
                      "commit marker (_commits/shard-NNNNNN.json) names the group of the "
                      "committed attempt, the others are never read. In a group, row k is store "
                      "position start + k (its attributes give start and stop); grid[k, r, c] "
                      "is the log-density at (x_c, y_r), x = linspace(xmin, xmax, W), "
                      "y = linspace(ymin, ymax, H) (rows of d >= 2 problems); curve[k, c] is "
                      "the log-density at x_c, x = linspace(xmin, xmax, L) with (xmin, xmax) = "
                      "curve_extent[k] (rows of d = 1 problems); NaN where none",
            "grid_shape": [h, w], "input_grid_gmms": self.input_grid_gmms,
            "curve_length": self.curve_length,
            "extent_columns": ["xmin", "xmax", "ymin", "ymax"],
            "curve_extent_columns": ["xmin", "xmax"],
        })

    # -------------------------------------------------------------- commits
    def committed_shards(self) -> set[int]:
        """Indices of the shards whose commit marker exists."""
        fs, root = self._paths()
        _fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
        names = fs.glob(posixpath.join(root, COMMITS_DIR, "shard-*.json"))
        return {_shard_of(n) for n in names}

    def solved_marker(self, shard_index: int) -> dict | None:
        """The commit marker of shard ``shard_index`` if the shard is committed
        solved (not given up), else ``None``. The driver asks this of a shard
        whose actor died: the actor may have committed it and died before its
        reply was sent."""
        fs, root = self._paths()
        path = posixpath.join(root, COMMITS_DIR, _shard_name(shard_index) + ".json")
        _fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
        try:
            info = _fs.read_json(fs, path)
        except FileNotFoundError:
            return None
        return None if info.get("gave_up") else info

    def commit_shard(
        self,
        shard_index: int,
        start: int,
        stop: int,
        problem_ids: Sequence[int] | np.ndarray,
        statuses: Sequence[str],
        errors: Sequence[str | None],
        results: Sequence[Result | None],
        seconds: Sequence[float] | np.ndarray | float | None = None,
        *,
        grids: np.ndarray | None = None,
        grid_extents: np.ndarray | None = None,
        input_grids: np.ndarray | None = None,
        curves: np.ndarray | None = None,
        curve_extents: np.ndarray | None = None,
        input_curves: np.ndarray | None = None,
        gave_up: str | None = None,
    ) -> dict:
        """Write and atomically commit one shard (in an actor); return its marker.

        Args:
          shard_index, start, stop: the shard; ``(start, stop)`` must equal
            :meth:`shard_range` ``(shard_index)``.
          problem_ids: ``stop - start`` ids, in store order.
          statuses: ``'ok'``, ``'invalid'`` or ``'failed'`` per problem.
          errors: the message of each invalid/failed problem (``None`` for ok).
          results: a :class:`Result` per ok problem (``None`` otherwise; a
            result given for a failed problem is recorded in ``problems/``
            but no barycenter rows are written).
          seconds: solver time per problem (or one number for all).
          grids: ``float32 [n, H, W]`` barycenter log-densities (NaN rows where
            none); ``None`` writes NaN rows.
          grid_extents: ``[n, 4]`` (xmin, xmax, ymin, ymax) per problem.
          input_grids: ``[n, J, H, W]`` input GMMs' log-densities, ``J <=
            input_grid_gmms`` (padded with NaN).
          curves, curve_extents, input_curves: the same for ``d = 1``
            problems, whose log-densities are curves: ``float32 [n, L]``,
            ``[n, 2]`` (xmin, xmax) and ``[n, J, L]``, ``L =``
            :attr:`curve_length`; ``None`` writes NaN rows. A problem has a
            grid row or a curve row, not both.
          gave_up: the shard was not solved (every attempt was lost to
            infrastructure faults) and its valid problems are ``failed`` with
            this reason; recorded in the marker, so that a resumed run solves
            it again (:meth:`prepare`).

        Rewriting a committed shard replaces it. The grids go into a group of
        this commit's own (named in the marker), written before the old marker
        is removed: an attempt that stops after its grids leaves the committed
        shard as it was, and its grids are never read.
        """
        n = self._check_shard(shard_index, start, stop)
        ids = np.asarray(problem_ids, dtype=np.int64)
        statuses, errors, secs = _check_rows(n, ids, statuses, errors, results, seconds)
        block = None if self.grid_shape is None else self._grid_block(
            n, ids, grids, grid_extents, input_grids, curves, curve_extents, input_curves)
        fs, root = self._paths()
        tmp = self._tmp(root)
        name = _shard_name(shard_index)
        commit = uuid.uuid4().hex
        grid_group = None
        if block is not None:  # into a group of this commit's own: the committed one is untouched
            grid_group = self._write_grids(shard_index, start, stop, commit, block)
        marker = posixpath.join(root, COMMITS_DIR, name + ".json")
        if fs.exists(marker):
            fs.rm(marker)
        problems = self._problems_table(shard_index, start, ids, statuses, errors, results, secs)
        barycenters = _barycenters_table(ids, statuses, results)
        _write_tables(fs, root, name, commit, tmp,
                      {"problems": problems, "barycenters": barycenters})
        counts = {s: statuses.count(s) for s in STATUSES}
        info = {"shard": shard_index, "start": start, "stop": stop, "commit": commit,
                "counts": counts, "seconds": float(np.nansum(secs)),
                "barycenter_rows": barycenters.num_rows, "committed": _now()}
        if grid_group is not None:
            info["grids"] = grid_group
        if gave_up is not None:
            info["gave_up"] = str(gave_up)
        _fs.write_json_atomic(fs, marker, info, tmp)
        return info

    def _check_shard(self, shard_index: int, start: int, stop: int) -> int:
        want = self.shard_range(shard_index)
        if (int(start), int(stop)) != want:
            raise ValueError(
                f"shard {shard_index} covers positions {want[0]}:{want[1]} "
                f"(shard_size {self.shard_size}), got {start}:{stop}"
            )
        return want[1] - want[0]

    def _grid_block(self, n, ids, grids, extents, input_grids, curves=None, curve_extents=None,
                    input_curves=None) -> dict[str, np.ndarray]:
        """The shard's grid and curve arrays, checked (before anything is written)."""
        h, w = self.grid_shape
        length = self.curve_length
        block = {
            "problem_id": np.asarray(ids, dtype=np.int64),
            "extent": _grid_rows(extents, (n, 4), "grid_extents", np.float64),
            "barycenter": _grid_rows(grids, (n, h, w), "grids"),
            "curve_extent": _grid_rows(curve_extents, (n, 2), "curve_extents", np.float64),
            "curve": _grid_rows(curves, (n, length), "curves"),
        }
        if self.input_grid_gmms:
            block["inputs"] = _input_rows(input_grids, n, self.input_grid_gmms, (h, w),
                                          "input_grids")
            block["curve_inputs"] = _input_rows(input_curves, n, self.input_grid_gmms, (length,),
                                                "input_curves")
        elif input_grids is not None or input_curves is not None:
            raise ValueError("input grids given but the writer has input_grid_gmms=0")
        return block

    def _write_grids(self, shard_index: int, start: int, stop: int, commit: str,
                     block: dict[str, np.ndarray]) -> str:
        """Write the grids of commit ``commit`` into a new group of their own; return its name."""
        name = grid_group_name(shard_index, commit)
        group = _fs.open_zarr_group(_fs.join_url(self.url, GRIDS_DIR, name), "w")
        for key, arr in block.items():
            fill = -1 if key == "problem_id" else float("nan")
            out = group.create_array(key, shape=arr.shape, chunks=arr.shape, dtype=arr.dtype,
                                     fill_value=fill, dimension_names=_GRID_DIMS[key])
            out[...] = arr
        group.attrs.update({"shard": shard_index, "start": start, "stop": stop, "commit": commit})
        return name

    def _problems_table(self, shard_index, start, ids, statuses, errors, results, secs) -> pa.Table:
        n = len(ids)

        def field(get, dtype):
            return pa.array([None if r is None else get(r) for r in results], dtype)

        columns = {
            "problem_id": pa.array(ids, pa.int64()),
            "position": pa.array(np.arange(start, start + n), pa.int64()),
            "shard": pa.array(np.full(n, shard_index), pa.int32()),
            "status": pa.array(statuses, pa.string()),
            "error": pa.array(errors, pa.string()),
            "objective": field(lambda r: float(r.objective), pa.float64()),
            "iterations": field(lambda r: int(r.iterations), pa.int32()),
            "converged": field(lambda r: bool(r.converged), pa.bool_()),
            "marginal_error": field(lambda r: float(r.marginal_error), pa.float64()),
            "restart": field(lambda r: int(r.restart), pa.int32()),
            "n_components": field(lambda r: len(r.weights), pa.int32()),
            "seconds": pa.array(secs, pa.float64()),
        }
        for key, (dtype, value) in _option_columns(self.options).items():
            columns[key] = pa.array([value] * n, dtype)
        return pa.table(columns, schema=problems_schema(self.options))

    # ------------------------------------------------------------- finalize
    def finalize(self, summary: dict | None = None) -> dict:
        """Write the manifest, last (driver, once); return it.

        The manifest records the settings, the counts by status (from the
        commit markers), the committed and missing shards, ``complete``, and
        the runner's ``summary``. Temporary files, files of shards without a
        marker and grids groups that no marker names are removed. A marker whose tables carry another commit id (two
        writers of one shard raced, e.g. a presumed-dead actor finishing late)
        is removed too, so the shard counts as missing rather than as
        committed-but-unreadable.
        """
        fs, root = self._paths()
        markers = _verified_markers(fs, root, repair=True)
        committed = sorted(markers)
        self._clean(fs, root, markers)
        counts = {s: sum(m["counts"].get(s, 0) for m in markers.values()) for s in STATUSES}
        missing = sorted(set(range(self.n_shards)) - set(committed))
        manifest = {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_VERSION,
            "finished": _now(),
            **self.settings(),
            "n_shards": self.n_shards,
            "committed_shards": len(committed),
            "missing_shards": missing,
            "gave_up_shards": sorted(k for k, m in markers.items() if m.get("gave_up")),
            "complete": not missing,
            "counts": counts,
            "solver_seconds": float(sum(m.get("seconds", 0.0) for m in markers.values())),
            "summary": _jsonable(summary or {}),
        }
        _fs.write_json_atomic(fs, posixpath.join(root, MANIFEST_FILE), manifest, self._tmp(root))
        if fs.exists(self._tmp(root)):  # only this run's temporary files
            fs.rm(self._tmp(root), recursive=True)
        tmp = posixpath.join(root, TMP_DIR)
        with contextlib.suppress(FileNotFoundError, OSError):
            if fs.exists(tmp) and not fs.ls(tmp):
                fs.rm(tmp, recursive=True)
        return manifest

    @staticmethod
    def _clean(fs, root: str, markers: dict[int, dict]) -> None:
        """Remove the tables of shards without a (verified) marker, and the grids
        groups that no marker names (attempts that did not commit)."""
        for sub in ("problems", "barycenters"):
            for path in fs.glob(posixpath.join(root, sub, "shard-*.parquet")):
                if _shard_of(path) not in markers:
                    fs.rm(path)
        named = {m.get("grids") for m in markers.values()}
        for name in _attempt_grids(fs, root):
            if name not in named:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(posixpath.join(root, GRIDS_DIR, name), recursive=True)


_GRID_DIMS = {
    "problem_id": ["problem"],
    "extent": ["problem", "xmin_xmax_ymin_ymax"],
    "barycenter": ["problem", "y", "x"],
    "inputs": ["problem", "gmm", "y", "x"],
    "curve_extent": ["problem", "xmin_xmax"],
    "curve": ["problem", "x"],
    "curve_inputs": ["problem", "gmm", "x"],
}


def _check_rows(n, ids, statuses, errors, results, seconds):
    statuses = [str(s) for s in statuses]
    errors = list(errors)
    results = list(results)
    for name, seq in (("problem_ids", ids), ("statuses", statuses), ("errors", errors),
                      ("results", results)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected {n} (the shard's size)")
    bad = sorted({s for s in statuses if s not in STATUSES})
    if bad:
        raise ValueError(f"unknown statuses {bad}; expected one of {STATUSES}")
    for i, (s, r) in enumerate(zip(statuses, results)):
        if s == "ok" and r is None:
            raise ValueError(f"problem {ids[i]} has status 'ok' but no result")
        if s != "ok" and not errors[i]:
            errors[i] = f"{s} (no message given)"
        if s == "ok":
            errors[i] = None
    if seconds is None:
        secs = np.full(n, np.nan)
    else:
        secs = np.broadcast_to(np.asarray(seconds, dtype=np.float64), (n,)).copy()
    return statuses, errors, secs


def _grid_rows(arr, shape, name, dtype=np.float32) -> np.ndarray:
    if arr is None:
        return np.full(shape, np.nan, dtype=dtype)
    arr = np.asarray(arr, dtype=dtype)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _input_rows(arr, n: int, j: int, tail: tuple[int, ...], name: str) -> np.ndarray:
    """``[n, j, *tail]`` float32 rows of input GMMs: ``arr`` ``[n, J <= j, *tail]``, NaN-padded."""
    out = np.full((n, j, *tail), np.nan, dtype=np.float32)
    if arr is not None:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim != 2 + len(tail) or arr.shape[0] != n or arr.shape[2:] != tail \
                or arr.shape[1] > j:
            raise ValueError(f"{name} must have shape ({n}, J <= {j}, "
                             f"{', '.join(map(str, tail))}), got {arr.shape}")
        out[:, : arr.shape[1]] = arr
    return out


def _barycenters_table(ids, statuses, results) -> pa.Table:
    rows = [(ids[i], r) for i, (s, r) in enumerate(zip(statuses, results)) if s == "ok"]
    if not rows:
        return barycenters_schema().empty_table()
    sizes = np.array([len(r.weights) for _, r in rows], dtype=np.int64)
    means = [np.asarray(r.means, dtype=np.float64) for _, r in rows]
    covs = [np.asarray(r.covs, dtype=np.float64) for _, r in rows]
    mean_values = np.concatenate([m.reshape(-1) for m in means])
    cov_values = np.concatenate([c.reshape(-1) for c in covs])
    mean_len = np.repeat([m.shape[1] if m.ndim == 2 else 0 for m in means], sizes)
    cov_len = mean_len * mean_len
    if int(cov_len.sum()) >= 2**31:  # list offsets are int32
        raise ValueError(f"a shard's barycenter covariances hold {int(cov_len.sum())} numbers, "
                         "more than a Parquet list column of one shard can; use a smaller "
                         "--shard-size")
    return pa.table(
        {
            "problem_id": pa.array(np.repeat([i for i, _ in rows], sizes), pa.int64()),
            "component": pa.array(np.concatenate([np.arange(k) for k in sizes]), pa.int32()),
            "weight": pa.array(np.concatenate([np.asarray(r.weights, np.float64) for _, r in rows])),
            "mean": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(mean_len)]).astype(np.int32)),
                pa.array(mean_values, pa.float64())),
            "cov": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(cov_len)]).astype(np.int32)),
                pa.array(cov_values, pa.float64())),
        },
        schema=barycenters_schema(),
    )


def _write_tables(fs, root: str, name: str, commit: str, tmp: str,
                  tables: dict[str, pa.Table]) -> None:
    """Write ``sub/name.parquet`` for each table, its footer carrying ``commit``."""
    for sub, table in tables.items():
        table = table.replace_schema_metadata({COMMIT_KEY: commit.encode()})
        _fs.write_bytes_atomic(fs, posixpath.join(root, sub, name + ".parquet"),
                               _parquet_bytes(table), tmp)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
