"""Results: an output directory written shard by shard, atomically (``raybary.results/1``).

Layout of ``OUT/``::

    _layout.json                   settings of the run (written by prepare)
    problems/shard-000012.parquet   one row per problem of shard 12
    barycenters/shard-000012.parquet  one row per barycenter component
    grids.zarr/                     log-density grids, rows = store positions
    _commits/shard-000012.json     commit marker of shard 12 (written last)
    _manifest.json                 what was run, counts by status (written last of all)
    _tmp/                          temporary files (removed by finalize)

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
                            grids=g, grid_extents=e, input_grids=gi)
    writer.finalize({"wall_seconds": ...})     # driver, once, last

A commit removes the shard's old marker, writes its grid rows (chunks are
``shard_size`` problems, so writers never share a chunk), writes each table to
``_tmp/`` and renames it onto its fixed name, then writes the marker. A
reader that follows the markers (:func:`read_results`) never sees half a
shard, and a rewritten shard replaces the old one (same file names, same grid
rows): never a duplicate.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
import posixpath
import re
import socket
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.errors import InputChangedError, ResultsConflictError
from raybary.types import Result

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "STATUSES",
    "ResultWriter",
    "Results",
    "Grids",
    "read_results",
    "summarize",
]

RESULTS_FORMAT = "raybary.results"
RESULTS_VERSION = 1
GRIDS_FORMAT = "raybary.grids"
STATUSES = ("ok", "invalid", "failed")
LAYOUT_FILE = "_layout.json"
MANIFEST_FILE = "_manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
LEASE_FILE = "_lease.json"
LEASE_HEARTBEAT_S = 20.0  # the driver refreshes its lease this often
LEASE_STALE_S = 120.0  # a lease without a heartbeat for this long is taken over
LEASE_SETTLE_S = 0.3  # wait before reading a new lease back
COMMIT_KEY = b"raybary.commit"
_SETTINGS = ("n_problems", "shard_size", "grid_shape", "input_grid_gmms", "options", "input_url")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (so settings compare equal after a round trip)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_fs._json_default))


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def _shard_of(path: str) -> int:
    """The shard index in a file name ``.../shard-000012.<ext>``."""
    return int(posixpath.basename(path).split(".")[0][len("shard-"):])


# ------------------------------------------------------------------ schemas
def _option_columns(options: dict) -> dict[str, tuple[pa.DataType, Any]]:
    """``opt_<key>`` columns: scalar options typed, others as JSON text."""
    out = {}
    for key, value in sorted(options.items()):
        name = "opt_" + re.sub(r"\W", "_", str(key))
        if isinstance(value, bool):
            out[name] = (pa.bool_(), value)
        elif isinstance(value, int):
            out[name] = (pa.int64(), value)
        elif isinstance(value, float):
            out[name] = (pa.float64(), value)
        elif isinstance(value, str):
            out[name] = (pa.string(), value)
        else:
            out[name] = (pa.string(), json.dumps(value, sort_keys=True))
    return out


def problems_schema(options: dict | None = None) -> pa.Schema:
    """Schema of ``problems/``: one row per problem."""
    fields = [
        ("problem_id", pa.int64()),
        ("position", pa.int64()),
        ("shard", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("objective", pa.float64()),
        ("iterations", pa.int32()),
        ("converged", pa.bool_()),
        ("marginal_error", pa.float64()),
        ("restart", pa.int32()),
        ("n_components", pa.int32()),
        ("seconds", pa.float64()),
    ]
    fields += [(k, t) for k, (t, _) in _option_columns(options or {}).items()]
    return pa.schema(fields)


def barycenters_schema() -> pa.Schema:
    """Schema of ``barycenters/``: one row per barycenter component."""
    return pa.schema(
        [
            ("problem_id", pa.int64()),
            ("component", pa.int32()),
            ("weight", pa.float64()),
            ("mean", pa.list_(pa.float64())),
            ("cov", pa.list_(pa.float64())),
        ]
    )


# ------------------------------------------------------------------ writer
class ResultWriter:
    """Writes one run's results; picklable (holds the URL and settings only).

    Args:
      url: the output directory (local path or fsspec URL).
      n_problems: problems in the input store (grid rows = store positions).
      shard_size: problems per shard; shard ``i`` is positions
        ``i*shard_size : min((i+1)*shard_size, n_problems)``.
      grid_shape: ``(H, W)`` of the log-density grids, or ``None`` for no grids.
      input_grid_gmms: store the input GMMs' grids too, up to this many GMMs
        per problem (``0``: none); ``inputs`` is ``[P, input_grid_gmms, H, W]``.
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
        h, w = self.grid_shape
        p, s = max(self.n_problems, 0), self.shard_size
        group = _fs.open_zarr_group(_fs.join_url(self.url, "grids.zarr"), "w")
        nan = float("nan")
        group.create_array("problem_id", shape=(p,), chunks=(s,), dtype="int64", fill_value=-1)
        group.create_array("extent", shape=(p, 4), chunks=(s, 4), dtype="float64", fill_value=nan,
                           dimension_names=["problem", "xmin_xmax_ymin_ymax"])
        group.create_array("barycenter", shape=(p, h, w), chunks=(s, h, w), dtype="float32",
                           fill_value=nan, dimension_names=["problem", "y", "x"])
        if self.input_grid_gmms:
            j = self.input_grid_gmms
            group.create_array("inputs", shape=(p, j, h, w), chunks=(s, j, h, w),
                               dtype="float32", fill_value=nan,
                               dimension_names=["problem", "gmm", "y", "x"])
        group.attrs.update({
            "format": GRIDS_FORMAT, "format_version": RESULTS_VERSION,
            "values": "log-density",
            "layout": "row i = store position i; grid[i, r, c] is the log-density at "
                      "(x_c, y_r), x = linspace(xmin, xmax, W), y = linspace(ymin, ymax, H)",
            "extent_columns": ["xmin", "xmax", "ymin", "ymax"],
        })

    # -------------------------------------------------------------- commits
    def committed_shards(self) -> set[int]:
        """Indices of the shards whose commit marker exists."""
        fs, root = self._paths()
        _fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
        names = fs.glob(posixpath.join(root, COMMITS_DIR, "shard-*.json"))
        return {_shard_of(n) for n in names}

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
          gave_up: the shard was not solved (every attempt was lost to
            infrastructure faults) and its valid problems are ``failed`` with
            this reason; recorded in the marker, so that a resumed run solves
            it again (:meth:`prepare`).

        Rewriting a committed shard replaces it.
        """
        n = self._check_shard(shard_index, start, stop)
        ids = np.asarray(problem_ids, dtype=np.int64)
        statuses, errors, secs = _check_rows(n, ids, statuses, errors, results, seconds)
        fs, root = self._paths()
        tmp = self._tmp(root)
        name = _shard_name(shard_index)
        marker = posixpath.join(root, COMMITS_DIR, name + ".json")
        if fs.exists(marker):
            fs.rm(marker)
        if self.grid_shape is not None:
            self._write_grids(start, stop, ids, grids, grid_extents, input_grids)
        commit = uuid.uuid4().hex
        problems = self._problems_table(shard_index, start, ids, statuses, errors, results, secs)
        barycenters = _barycenters_table(ids, statuses, results)
        for sub, table in (("problems", problems), ("barycenters", barycenters)):
            table = table.replace_schema_metadata({COMMIT_KEY: commit.encode()})
            _fs.write_bytes_atomic(fs, posixpath.join(root, sub, name + ".parquet"),
                                   _parquet_bytes(table), tmp)
        counts = {s: statuses.count(s) for s in STATUSES}
        info = {"shard": shard_index, "start": start, "stop": stop, "commit": commit,
                "counts": counts, "seconds": float(np.nansum(secs)),
                "barycenter_rows": barycenters.num_rows, "committed": _now()}
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

    def _write_grids(self, start, stop, ids, grids, extents, input_grids) -> None:

        n, (h, w) = stop - start, self.grid_shape
        group = _fs.open_zarr_group(_fs.join_url(self.url, "grids.zarr"), "r+")
        group["problem_id"][start:stop] = ids
        group["barycenter"][start:stop] = _grid_rows(grids, (n, h, w), "grids")
        group["extent"][start:stop] = _grid_rows(extents, (n, 4), "grid_extents", np.float64)
        if self.input_grid_gmms:
            j = self.input_grid_gmms
            block = np.full((n, j, h, w), np.nan, dtype=np.float32)
            if input_grids is not None:
                arr = np.asarray(input_grids, dtype=np.float32)
                if arr.ndim != 4 or arr.shape[0] != n or arr.shape[2:] != (h, w) or arr.shape[1] > j:
                    raise ValueError(
                        f"input_grids must have shape ({n}, J <= {j}, {h}, {w}), got {arr.shape}"
                    )
                block[:, : arr.shape[1]] = arr
            group["inputs"][start:stop] = block
        elif input_grids is not None:
            raise ValueError("input_grids given but the writer has input_grid_gmms=0")

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
        the runner's ``summary``. Temporary files and files of shards without a
        marker are removed. A marker whose tables carry another commit id (two
        writers of one shard raced, e.g. a presumed-dead actor finishing late)
        is removed too, so the shard counts as missing rather than as
        committed-but-unreadable.
        """
        fs, root = self._paths()
        markers = _verified_markers(fs, root, repair=True)
        committed = sorted(markers)
        self._clean(fs, root, set(committed))
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
    def _clean(fs, root: str, committed: set[int]) -> None:
        for sub in ("problems", "barycenters"):
            for path in fs.glob(posixpath.join(root, sub, "shard-*.parquet")):
                if _shard_of(path) not in committed:
                    fs.rm(path)


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in _SETTINGS:
        a, b = old.get(key), new.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k, "<unset>") != b.get(k, "<unset>"):
                    diffs.append(f"options.{k}: {a.get(k, '<unset>')!r} (existing) "
                                 f"vs {b.get(k, '<unset>')!r} (now)")
        elif a != b:
            diffs.append(f"{key}: {a!r} (existing) vs {b!r} (now)")
    return diffs


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


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


_UNREADABLE = (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError, pa.ArrowException)


def _read_markers(fs, root: str, *, repair: bool = False) -> dict[int, dict]:
    """Commit markers by shard. A marker that cannot be read (empty or cut
    short, e.g. by a power loss) means its shard is not committed: one
    warning line says so, and with ``repair`` the marker is removed so that
    a resumed run redoes the shard."""
    out = {}
    _fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
    for path in fs.glob(posixpath.join(root, COMMITS_DIR, "shard-*.json")):
        try:
            info = _fs.read_json(fs, path)
            shard = int(info["shard"])
            if shard != _shard_of(path) or not isinstance(info.get("commit"), str):
                raise ValueError("marker does not match its file name")
        except FileNotFoundError:  # removed by a concurrent rewrite
            continue
        except _UNREADABLE as e:
            what = "redone by this run" if repair else "left out (a re-run redoes it)"
            warnings.warn(f"commit marker {posixpath.basename(path)} cannot be read "
                          f"({type(e).__name__}): shard {_shard_of(path)} is not committed; "
                          f"{what}", stacklevel=3)
            if repair:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path)
            continue
        out[shard] = info
    return out


def _fresh_listing(fs, path: str) -> None:
    """Drop fsspec's cached listing of ``path`` (object stores cache listings;
    a marker written by an actor must not be missed)."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid: assume alive
    return True


def _read_lease(fs, root: str) -> dict | None:
    try:
        lease = _fs.read_json(fs, posixpath.join(root, LEASE_FILE))
    except FileNotFoundError:
        return None
    except _UNREADABLE:  # cut short: treat as stale
        return {"run_id": "?", "heartbeat": 0.0}
    return lease if isinstance(lease, dict) else {"run_id": "?", "heartbeat": 0.0}


def input_changes(old: dict | None, new: dict | None, old_shards=None, new_shards=None,
                  limit: int = 5) -> list[str]:
    """What differs between two input fingerprints (and per-shard id ranges);
    empty if they match or either is unknown (results of older versions)."""
    out: list[str] = []
    if old is not None and new is not None:
        if old.get("n_problems") != new.get("n_problems"):
            out.append(f"problems: {old.get('n_problems')} then, {new.get('n_problems')} now")
        before = {f[0]: f[1:] for f in old.get("files", [])}
        after = {f[0]: f[1:] for f in new.get("files", [])}
        for name in sorted(set(before) | set(after)):
            if name not in after:
                out.append(f"file {name}: removed")
            elif name not in before:
                out.append(f"file {name}: added")
            elif list(before[name]) != list(after[name]):
                (s0, t0), (s1, t1) = before[name], after[name]
                what = f"size {s0} -> {s1}" if s0 != s1 else f"modified ({t0} -> {t1})"
                out.append(f"file {name}: {what}")
    if old_shards is not None and new_shards is not None:
        diff = [i for i, (a, b) in enumerate(zip(old_shards, new_shards)) if list(a) != list(b)]
        if len(old_shards) != len(new_shards):
            out.append(f"shards: {len(old_shards)} then, {len(new_shards)} now")
        for i in diff[:limit]:
            out.append(f"shard {i}: problem ids {old_shards[i][0]}..{old_shards[i][1]} then, "
                       f"{new_shards[i][0]}..{new_shards[i][1]} now")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _verified_markers(fs, root: str, *, repair: bool) -> dict[int, dict]:
    """The markers whose two tables carry the marker's commit id (footers only are read).

    With ``repair``, the other markers are removed: their shards are redone by
    a resumed run and count as missing in the manifest.
    """
    out = {}
    for shard, info in _read_markers(fs, root, repair=repair).items():
        name = _shard_name(shard) + ".parquet"
        ok = True
        for sub in ("problems", "barycenters"):
            try:
                with fs.open(posixpath.join(root, sub, name), "rb") as f:
                    meta = pq.read_schema(f).metadata or {}
            except FileNotFoundError:
                meta = {}
            except _UNREADABLE as e:
                warnings.warn(f"{sub}/{name} cannot be read ({type(e).__name__}): shard {shard} "
                              "is not committed" + ("; redone by this run" if repair else ""),
                              stacklevel=2)
                meta = {}
            ok = ok and meta.get(COMMIT_KEY, b"").decode() == info.get("commit")
        if ok:
            out[shard] = info
        elif repair:
            marker = posixpath.join(root, COMMITS_DIR, _shard_name(shard) + ".json")
            if fs.exists(marker):
                fs.rm(marker)
    return out


# ------------------------------------------------------------------ reading
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
    """

    url: str
    problems: Any
    barycenters: Any
    layout: dict
    manifest: dict | None
    committed_shards: list[int]

    @property
    def complete(self) -> bool:
        """Whether the run finished with every shard committed."""
        return bool(self.manifest and self.manifest.get("complete"))

    def grids(self, start: int = 0, stop: int | None = None, *, inputs: bool = False) -> Grids:
        """Load grid rows ``start:stop`` (store positions) from ``grids.zarr``."""

        if self.layout.get("grid_shape") is None:
            raise ValueError(f"{self.url} has no grids (the run had no grid_shape)")
        group = _fs.open_zarr_group(_fs.join_url(self.url, "grids.zarr"), "r")
        stop = self.layout["n_problems"] if stop is None else stop
        ids = group["problem_id"][start:stop]
        extent = group["extent"][start:stop]
        bary = group["barycenter"][start:stop]
        inp = group["inputs"][start:stop] if inputs and "inputs" in group else None
        shard = np.arange(start, stop) // self.layout["shard_size"]
        stale = ~np.isin(shard, self.committed_shards)
        if stale.any():
            ids[stale], extent[stale], bary[stale] = -1, np.nan, np.nan
            if inp is not None:
                inp[stale] = np.nan
        return Grids(ids, extent, bary, inp)


def read_results(path: str, *, as_: str = "pandas") -> Results:
    """Read the committed shards of an output directory.

    Args:
      path: the output directory (local path or fsspec URL).
      as_: ``"pandas"`` (DataFrames) or ``"pyarrow"`` (Tables).

    Only shards with a commit marker are read, and only files whose commit id
    matches the marker (a shard being rewritten meanwhile is left out), so a
    reader never sees half a shard or a duplicate. The directories can also be
    read directly, e.g. ``duckdb.sql("SELECT * FROM 'OUT/problems/*.parquet'")``,
    once the manifest exists.
    """
    if as_ not in ("pandas", "pyarrow"):
        raise ValueError("as_ must be 'pandas' or 'pyarrow'")
    url = _fs.strip_url(str(path))
    fs, root = _fs.url_to_fs(url)
    layout_path = posixpath.join(root, LAYOUT_FILE)
    if not fs.exists(layout_path):
        raise FileNotFoundError(f"{url} is not a raybary results directory (no {LAYOUT_FILE})")
    layout = _fs.read_json(fs, layout_path)
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    manifest = _fs.read_json(fs, manifest_path) if fs.exists(manifest_path) else None
    problems, barycenters, committed = [], [], []
    for shard, info in sorted(_read_markers(fs, root).items()):
        tables = _read_shard(fs, root, shard, info["commit"])
        if tables is None:
            continue
        committed.append(shard)
        problems.append(tables[0])
        barycenters.append(tables[1])
    p = _concat(problems, problems_schema(layout.get("options") or {}))
    b = _concat(barycenters, barycenters_schema())
    if as_ == "pandas":
        p, b = p.to_pandas(), b.to_pandas()
    return Results(url, p, b, layout, manifest, committed)


def _read_shard(fs, root: str, shard: int, commit: str) -> tuple[pa.Table, pa.Table] | None:
    out = []
    for sub in ("problems", "barycenters"):
        path = posixpath.join(root, sub, _shard_name(shard) + ".parquet")
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            table = None
        except _UNREADABLE as e:
            warnings.warn(f"{sub}/{posixpath.basename(path)} cannot be read "
                          f"({type(e).__name__}): shard {shard} left out (a re-run redoes it)",
                          stacklevel=3)
            return None
        meta = (table.schema.metadata or {}) if table is not None else {}
        if meta.get(COMMIT_KEY, b"").decode() != commit:
            warnings.warn(f"shard {shard} is being rewritten; left out", stacklevel=3)
            return None
        out.append(table.replace_schema_metadata(None))
    return out[0], out[1]


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


# ------------------------------------------------------------------ summary
def summarize(path: str, *, top: int = 5) -> str:
    """A text summary of an output directory (what ``raybary show`` prints)."""
    res = read_results(path)
    p = res.problems
    lines = [f"results {res.url} ({RESULTS_FORMAT}/{RESULTS_VERSION})"]
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
