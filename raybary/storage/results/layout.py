"""The results layout (``raybary.results/1``): names, schemas, markers, lease, input checks.

This module owns what the writer and the reader agree on: the names of the
files, the Parquet schemas, the commit markers (reading them, and verifying
them against the commit ids in the tables' footers), reading the lease file,
and comparing settings and input fingerprints (:func:`input_changes`). It
writes nothing but the removal of unreadable or unverified markers (with
``repair``); :mod:`~raybary.storage.results.writer` writes,
:mod:`~raybary.storage.results.reader` reads.

Layout of ``OUT/``::

    _layout.json                   settings of the run (written by prepare)
    _lease.json                    the run writing OUT (run id, host, pid, heartbeat)
    problems/shard-000012.parquet   one row per problem of shard 12
    barycenters/shard-000012.parquet  one row per barycenter component
    plans/shard-000012.parquet      one row per plan entry, if the run stores plans (--plans)
    grids.zarr/                     log-density grids (raybary.grids/3), if the run makes grids:
      shard-000012-<commit>/          the grids of one attempt at shard 12, rows = its positions:
                                      2-D grids (barycenter, extent, inputs) of d >= 2 problems,
                                      curves (curve, curve_extent, curve_inputs) of d = 1 ones
    _commits/shard-000012.json     commit marker of shard 12 (written last): its commit id,
                                   and the grids group of that commit
    _manifest.json                 what was run, counts by status (written last of all)
    _tmp/                          temporary files (removed by finalize)

Grids are tied to the commit: each attempt at a shard writes its grids into a
group of its own, named by its commit id, before it touches the shard's
tables or marker; the marker names that group, and readers take a shard's
grids from there only. An attempt that never commits (a presumed-dead actor
finishing late, a crash) leaves a group that no marker names: it is never
read, and :meth:`~raybary.storage.results.ResultWriter.finalize` removes it.

Curves: a ``d = 1`` problem has a log-density curve of :func:`curve_length`
points instead of a 2-D grid; :meth:`Results.curves` reads them as
:meth:`Results.grids <raybary.storage.results.Results.grids>` reads grids.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import posixpath
import re
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.types import STATUSES

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "GRIDS_FORMAT",
    "STATUSES",
    "LAYOUT_FILE",
    "MANIFEST_FILE",
    "COMMITS_DIR",
    "TMP_DIR",
    "LEASE_FILE",
    "LEASE_HEARTBEAT_S",
    "LEASE_STALE_S",
    "LEASE_SETTLE_S",
    "COMMIT_KEY",
    "DEFAULT_TABLES",
    "GRIDS_DIR",
    "GRIDS_VERSION",
    "grid_group_name",
    "curve_length",
    "CURVE_ARRAYS",
    "problems_schema",
    "barycenters_schema",
    "plans_schema",
    "PLANS_DIR",
    "marker_tables",
    "input_changes",
    "result_columns",
    "SETTINGS",
    "UNREADABLE",
    "attempt_grids",
    "fresh_listing",
    "is_foreign",
    "jsonable",
    "marker_tables",
    "now_iso",
    "option_columns",
    "pid_alive",
    "read_lease",
    "read_markers",
    "run_tmp",
    "setting_differences",
    "shard_name",
    "shard_of",
    "verified_markers",
]

RESULTS_FORMAT = "raybary.results"
RESULTS_VERSION = 1
GRIDS_FORMAT = "raybary.grids"
# 3: one group per commit, holding grids and the curves of d = 1 problems
# (1 and 2 were development versions, never released, and are not read)
GRIDS_VERSION = 3
GRIDS_DIR = "grids.zarr"
PLANS_DIR = "plans"  # the plans' tables, in runs that store them
LAYOUT_FILE = "_layout.json"
MANIFEST_FILE = "_manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
LEASE_FILE = "_lease.json"
LEASE_HEARTBEAT_S = 20.0  # the driver refreshes its lease this often
LEASE_STALE_S = 120.0  # a lease without a heartbeat for this long is taken over
LEASE_SETTLE_S = 0.3  # wait before reading a new lease back
COMMIT_KEY = b"raybary.commit"
#: The Parquet tables of each shard of a ``raybary run`` (``plans`` too in a run
#: with plans; a distance job's are ``("distances",)``; a marker of other
#: tables lists them under ``tables``).
DEFAULT_TABLES = ("problems", "barycenters")
# "plans" is recorded only when true (results without it read as no plans)
SETTINGS = ("n_problems", "shard_size", "grid_shape", "input_grid_gmms", "options", "input_url",
            "plans")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (so settings compare equal after a round trip)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_fs._json_default))


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def shard_of(path: str) -> int:
    """The shard index in a file name ``.../shard-000012.<ext>``."""
    return int(posixpath.basename(path).split(".")[0][len("shard-"):])


def grid_group_name(shard: int, commit: str) -> str:
    """The name, inside ``grids.zarr``, of the grids written by commit ``commit`` of ``shard``."""
    return f"{shard_name(shard)}-{commit}"


#: A grids group of one attempt at a shard (see :func:`grid_group_name`).
_GRID_GROUP = re.compile(r"shard-\d{6,}-[0-9a-f]{32}")


# ------------------------------------------------------------------ curves (d = 1)
#: The arrays of a grids group that hold the curves of ``d = 1`` problems.
CURVE_ARRAYS = ("curve", "curve_extent", "curve_inputs")


def curve_length(grid_shape) -> int:
    """Points of a ``d = 1`` problem's curve in a run with grids ``(H, W)``: ``max(H, W)``."""
    return int(max(int(grid_shape[0]), int(grid_shape[1])))


def option_columns(options: dict) -> dict[str, tuple[pa.DataType, Any]]:
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
        ("costs", pa.list_(pa.float64())),
        ("iterations", pa.int32()),
        ("converged", pa.bool_()),
        ("marginal_error", pa.float64()),
        ("restart", pa.int32()),
        ("n_components", pa.int32()),
        ("seconds", pa.float64()),
    ]
    fields += [(k, t) for k, (t, _) in option_columns(options or {}).items()]
    return pa.schema(fields)


def result_columns(results) -> dict[str, pa.Array]:
    """The per-result columns of ``problems/`` (and of Ray Data's result rows):
    ``objective``, ``costs`` (each input GMM's transport cost to the
    barycenter, in input order), ``iterations``, ``converged``,
    ``marginal_error``, ``restart``, ``n_components``; null where a result is
    ``None`` (``costs`` also where the result has none: a failed problem)."""

    def field(get, dtype):
        return pa.array([None if r is None else get(r) for r in results], dtype)

    def costs(r):
        return None if r.costs is None else np.asarray(r.costs, np.float64).tolist()

    return {
        "objective": field(lambda r: float(r.objective), pa.float64()),
        "costs": field(costs, pa.list_(pa.float64())),
        "iterations": field(lambda r: int(r.iterations), pa.int32()),
        "converged": field(lambda r: bool(r.converged), pa.bool_()),
        "marginal_error": field(lambda r: float(r.marginal_error), pa.float64()),
        "restart": field(lambda r: int(r.restart), pa.int32()),
        "n_components": field(lambda r: len(r.weights), pa.int32()),
    }


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


def plans_schema() -> pa.Schema:
    """Schema of ``plans/``: one row per entry of a plan of an ``ok`` problem:
    ``mass`` moved between barycenter component ``bar_component`` and
    component ``component`` of input GMM ``gmm`` (input order)."""
    return pa.schema(
        [
            ("problem_id", pa.int64()),
            ("gmm", pa.int32()),
            ("bar_component", pa.int32()),
            ("component", pa.int32()),
            ("mass", pa.float64()),
        ]
    )


# ------------------------------------------------------------------ settings
def setting_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in SETTINGS:
        a, b = old.get(key), new.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k, "<unset>") != b.get(k, "<unset>"):
                    diffs.append(f"options.{k}: {a.get(k, '<unset>')!r} (existing) "
                                 f"vs {b.get(k, '<unset>')!r} (now)")
        elif a != b:
            diffs.append(f"{key}: {a!r} (existing) vs {b!r} (now)")
    return diffs


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


# ------------------------------------------------------------------ markers and lease
UNREADABLE = (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError, pa.ArrowException)


def read_markers(fs, root: str, *, repair: bool = False) -> dict[int, dict]:
    """Commit markers by shard. A marker that cannot be read (empty or cut
    short, e.g. by a power loss) means its shard is not committed: one
    warning line says so, and with ``repair`` the marker is removed so that
    a resumed run redoes the shard."""
    out = {}
    fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
    for path in fs.glob(posixpath.join(root, COMMITS_DIR, "shard-*.json")):
        try:
            info = _fs.read_json(fs, path)
            shard = int(info["shard"])
            if shard != shard_of(path) or not isinstance(info.get("commit"), str):
                raise ValueError("marker does not match its file name")
            if info.get("grids") not in (None, grid_group_name(shard, info["commit"])):
                raise ValueError("marker names the grids of another commit")
        except FileNotFoundError:  # removed by a concurrent rewrite
            continue
        except UNREADABLE as e:
            what = "redone by this run" if repair else "left out (a re-run redoes it)"
            warnings.warn(f"commit marker {posixpath.basename(path)} cannot be read "
                          f"({type(e).__name__}): shard {shard_of(path)} is not committed; "
                          f"{what}", stacklevel=3)
            if repair:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path)
            continue
        out[shard] = info
    return out


def verified_markers(fs, root: str, *, repair: bool) -> dict[int, dict]:
    """The markers whose tables (:func:`marker_tables`) carry the marker's
    commit id (footers only are read) and whose grids group, if they name
    one, exists.

    With ``repair``, the other markers are removed: their shards are redone by
    a resumed run and count as missing in the manifest.
    """
    out = {}
    for shard, info in read_markers(fs, root, repair=repair).items():
        commits = [_table_commit(fs, root, sub, shard, repair)  # all read: all warn
                   for sub in marker_tables(info)]
        ok = all(c == info.get("commit") for c in commits)
        if ok and not _grids_present(fs, root, info):
            warnings.warn(f"the grids of shard {shard} ({GRIDS_DIR}/{info['grids']}) are missing: "
                          f"shard {shard} is not committed"
                          + ("; redone by this run" if repair else ""), stacklevel=2)
            ok = False
        if ok:
            out[shard] = info
        elif repair:
            marker = posixpath.join(root, COMMITS_DIR, shard_name(shard) + ".json")
            if fs.exists(marker):
                fs.rm(marker)
    return out


def marker_tables(info: dict) -> tuple[str, ...]:
    """The tables a commit marker vouches for: its ``tables``, else :data:`DEFAULT_TABLES`."""
    return tuple(info.get("tables") or DEFAULT_TABLES)


def _table_commit(fs, root: str, sub: str, shard: int, repair: bool) -> str:
    """The commit id in the footer of ``sub/shard-NNNNNN.parquet`` (``""`` if none)."""
    name = shard_name(shard) + ".parquet"
    try:
        with fs.open(posixpath.join(root, sub, name), "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except FileNotFoundError:
        meta = {}
    except UNREADABLE as e:
        warnings.warn(f"{sub}/{name} cannot be read ({type(e).__name__}): shard {shard} "
                      "is not committed" + ("; redone by this run" if repair else ""),
                      stacklevel=3)
        meta = {}
    return meta.get(COMMIT_KEY, b"").decode()


def _grids_present(fs, root: str, info: dict) -> bool:
    """Whether the grids group a marker names exists (markers naming none: yes)."""
    name = info.get("grids")
    return name is None or fs.exists(posixpath.join(root, GRIDS_DIR, name, "zarr.json"))


def attempt_grids(fs, root: str) -> list[str]:
    """The names of all grids groups of attempts in ``grids.zarr`` (committed or not)."""
    base = posixpath.join(root, GRIDS_DIR)
    fresh_listing(fs, base)
    try:
        paths = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    names = (posixpath.basename(_fs.strip_url(p)) for p in paths)
    return sorted(n for n in names if _GRID_GROUP.fullmatch(n))


def fresh_listing(fs, path: str) -> None:
    """Drop fsspec's cached listing of ``path`` (object stores cache listings;
    a marker written by an actor must not be missed)."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def read_lease(fs, root: str) -> dict | None:
    try:
        lease = _fs.read_json(fs, posixpath.join(root, LEASE_FILE))
    except FileNotFoundError:
        return None
    except UNREADABLE:  # cut short: treat as stale
        return {"run_id": "?", "heartbeat": 0.0}
    return lease if isinstance(lease, dict) else {"run_id": "?", "heartbeat": 0.0}


def run_tmp(root: str, run_id: str) -> str:
    """A run's temporary folder, ``_tmp/<run id>`` (other runs' are never touched)."""
    return posixpath.join(root, TMP_DIR, run_id)


def is_foreign(fs, root: str) -> bool:
    """A non-empty folder without our layout: not raybary results (never written into)."""
    if fs.exists(posixpath.join(root, LAYOUT_FILE)):
        return False
    names = {posixpath.basename(_fs.strip_url(p)) for p in fs.ls(root, detail=False)}
    return bool(names - {LEASE_FILE, TMP_DIR})


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid: assume alive
    return True
