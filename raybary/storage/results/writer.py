"""The driver's side of a results directory: :class:`ResultWriter`.

Three roles, three objects:

* :class:`~raybary.storage.results.lease.OutputLease` (the driver, for the
  whole run): one run per OUTPUT;
* :class:`ResultWriter` (the driver, at the start and the end): prepares the
  directory (:meth:`ResultWriter.prepare`: the layout, what is committed
  already) and finalises it (:meth:`ResultWriter.finalize`: the manifest,
  removing what no commit marker names);
* :class:`~raybary.storage.results.commit.ShardCommitter` (each actor, one
  shard at a time): writes and commits shards.

Usage (the runner)::

    writer = ResultWriter(out, n_problems=store.n_problems, shard_size=1000,
                          grid_shape=(100, 100), input_grid_gmms=3,
                          options=solver_options, input_url=store.url)
    writer.lease.acquire()                     # driver, first
    done = writer.prepare()                    # driver, once; returns committed shards
    committer = writer.committer               # picklable: sent to the actors
    for i in range(writer.n_shards):           # each in some actor
        if i in done: continue
        committer.commit_shard(i, outcome, grids)   # a BatchOutcome and ShardGrids
    writer.finalize({"wall_seconds": ...})     # driver, once, last
    writer.lease.release()

The names, schemas and markers all three follow are in
:mod:`~raybary.storage.results.layout`; the commit protocol is described in
:mod:`~raybary.storage.results.commit`.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from raybary.storage import _fs
from raybary.storage.errors import ResultsConflictError
from raybary.storage.options import StorageOptions
from raybary.storage.results.commit import ShardCommitter
from raybary.storage.results.layout import (
    COMMITS_DIR,
    DEFAULT_TABLES,
    GRIDS_DIR,
    GRIDS_FORMAT,
    GRIDS_VERSION,
    LAYOUT_FILE,
    MANIFEST_FILE,
    PLANS_DIR,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    SETTINGS,
    STATUSES,
    TMP_DIR,
    attempt_grids,
    fresh_listing,
    input_changes,
    is_foreign,
    jsonable,
    now_iso,
    run_tmp,
    setting_differences,
    shard_name,
    shard_of,
    verified_markers,
)
from raybary.storage.results.lease import OutputLease

__all__ = ["ResultWriter"]


class ResultWriter:
    """Prepares and finalises one run's results directory (the driver's role).

    Args:
      url: the output directory (local path or fsspec URL).
      n_problems: problems in the input store (grid rows = store positions).
      shard_size: problems per shard; shard ``i`` is positions
        ``i*shard_size : min((i+1)*shard_size, n_problems)``.
      grid_shape: ``(H, W)`` of the log-density grids, or ``None`` for no grids;
        ``d = 1`` problems get curves of ``max(H, W)`` points instead.
      input_grid_gmms: store the input GMMs' grids (and curves) too, up to
        this many GMMs per problem (``0``: none).
      options: the solver options (JSON-able); recorded in the layout, the
        manifest and as ``opt_<key>`` columns of ``problems/``.
      input_url: the input store's URL, recorded.
      input_fingerprint: the input's :meth:`ProblemStore.fingerprint`, and
      input_shards: each shard's first and last problem id: recorded, and a
        resume against an input that differs in either is refused.
      plans: also store each problem's plans (``plans/``, one row per plan
        entry); recorded, so a resume with the other choice is refused.
      storage_options: the output's fsspec storage options (used by the
        lease, the writer and, through the committer, the actors; never
        recorded).
      tables: the Parquet tables of each shard (``problems``, ``barycenters``
        for a barycenter run, and ``plans`` with ``plans``; ``distances`` for
        a distance job); recorded in the layout.
      shard_stops: each shard's stop position, for shards of unequal sizes
        (a distance job's tiles); default ``shard_size`` positions each.

    Attributes:
      run_id: this run's id (its lease and its ``_tmp/`` folder).
      lease: the run's :class:`~raybary.storage.results.lease.OutputLease`.
      committer: the picklable :class:`~raybary.storage.results.commit.ShardCommitter`
        the actors commit shards with.
      retried_gave_up: the shards that gave up in an earlier run and are solved
        again (set by :meth:`prepare`).
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
        storage_options: Mapping[str, Any] | None = None,
        tables: Sequence[str] = DEFAULT_TABLES,
        shard_stops: Sequence[int] | None = None,
        plans: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        if input_grid_gmms and grid_shape is None:
            raise ValueError("input_grid_gmms needs a grid_shape")
        self.url = _fs.strip_url(str(url))
        self.storage_options = StorageOptions.of(storage_options)
        self.run_id = uuid.uuid4().hex[:16]
        self.committer = ShardCommitter(
            url=self.url, run_id=self.run_id, n_problems=int(n_problems),
            shard_size=int(shard_size),
            grid_shape=None if grid_shape is None else (int(grid_shape[0]), int(grid_shape[1])),
            input_grid_gmms=int(input_grid_gmms), options=jsonable(options or {}),
            input_url=input_url, input_fingerprint=input_fingerprint,
            input_shards=None if input_shards is None else [[int(a), int(b)]
                                                            for a, b in input_shards],
            storage_options=self.storage_options,
            tables=tuple(tables) + ((PLANS_DIR,) if plans and PLANS_DIR not in tables else ()),
            shard_stops=None if shard_stops is None else tuple(int(s) for s in shard_stops),
            plans=bool(plans))
        self.lease = OutputLease(self.url, self.run_id, self.storage_options)
        self.retried_gave_up: list[int] = []

    def __getattr__(self, name: str):
        """The run's settings (``n_problems``, ``shard_size``, ``grid_shape``,
        ``input_grid_gmms``, ``options``, ``input_url``, ``input_fingerprint``,
        ``input_shards``) and shard geometry (``n_shards``, ``shard_range``,
        ``curve_length``) are the committer's."""
        if name in _FROM_COMMITTER:
            return getattr(self.committer, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def settings(self) -> dict:
        """The settings recorded in the layout and compared on a re-run."""
        out = {k: getattr(self, k) for k in SETTINGS}
        if not out["plans"]:  # as results written before plans existed
            del out["plans"]
        if out.get("input_url"):  # never record credentials
            out["input_url"] = _fs.redact_url(out["input_url"])
        return jsonable(out)

    def _paths(self):
        return _fs.url_to_fs(self.url, self.storage_options)

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
                diffs = setting_differences({k: old.get(k) for k in SETTINGS}, self.settings())
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
                    markers = verified_markers(fs, root, repair=True)
                    # shards that gave up (infrastructure faults) are solved again
                    self.retried_gave_up = sorted(k for k, m in markers.items()
                                                  if m.get("gave_up"))
                    return {k for k, m in markers.items() if not m.get("gave_up")}
            elif is_foreign(fs, root):
                raise ResultsConflictError(
                    f"{self.url} exists, is not empty and is not a raybary results directory "
                    f"(no {LAYOUT_FILE}); raybary does not write into or delete it, even with "
                    "--overwrite: choose a new or empty OUTPUT"
                )
            fs.rm(root, recursive=True)
            self.lease.rewrite()  # it went with the old results
        for sub in (*self.tables, COMMITS_DIR, TMP_DIR):
            fs.makedirs(posixpath.join(root, sub), exist_ok=True)
        if self.grid_shape is not None:
            self._create_grids()
        layout = {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                  "created": now_iso(), "n_shards": self.n_shards, **self.settings(),
                  "tables": list(self.tables)}
        if self.input_fingerprint is not None:
            layout["input_fingerprint"] = self.input_fingerprint
        if self.input_shards is not None:
            layout["input_shards"] = self.input_shards
        _fs.write_json_atomic(fs, posixpath.join(root, LAYOUT_FILE), layout,
                              run_tmp(root, self.run_id))
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

    def _check_not_input(self, fs, root: str) -> None:
        """Refuse an output that is, contains or lies inside the input store.

        The input is looked at with the output's storage options, and only
        when both have the same protocol (the input's own options may differ;
        resolving a path needs none)."""
        if not self.input_url:
            return
        protocol = fsspec.core.split_protocol(self.input_url)[0] or "file"
        if protocol not in _fs.fs_protocols(fs):
            return
        try:
            in_fs, in_root = _fs.url_to_fs(self.input_url, self.storage_options)
        except (ImportError, ValueError):  # not resolvable here: not the output's
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
        each attempt at a shard adds a group of its own (:class:`ShardCommitter`)."""
        h, w = self.grid_shape
        group = _fs.open_zarr_group(_fs.join_url(self.url, GRIDS_DIR), "w", self.storage_options)
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
        fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
        names = fs.glob(posixpath.join(root, COMMITS_DIR, "shard-*.json"))
        return {shard_of(n) for n in names}

    def solved_marker(self, shard_index: int) -> dict | None:
        """The commit marker of shard ``shard_index`` if the shard is committed
        solved (not given up), else ``None``. The driver asks this of a shard
        whose actor died: the actor may have committed it and died before its
        reply was sent."""
        fs, root = self._paths()
        path = posixpath.join(root, COMMITS_DIR, shard_name(shard_index) + ".json")
        fresh_listing(fs, posixpath.join(root, COMMITS_DIR))
        try:
            info = _fs.read_json(fs, path)
        except FileNotFoundError:
            return None
        return None if info.get("gave_up") else info

    # ------------------------------------------------------------- finalize
    def finalize(self, summary: dict | None = None) -> dict:
        """Write the manifest, last (driver, once); return it.

        The manifest records the settings, the counts by status (from the
        commit markers), the committed and missing shards, ``complete``, and
        the runner's ``summary``. Temporary files, files of shards without a
        marker and grids groups that no marker names are removed. A marker
        whose tables carry another commit id (two writers of one shard raced, e.g. a presumed-dead actor finishing late)
        is removed too, so the shard counts as missing rather than as
        committed-but-unreadable.
        """
        fs, root = self._paths()
        markers = verified_markers(fs, root, repair=True)
        committed = sorted(markers)
        self._clean(fs, root, markers, self.tables)
        counts = {s: sum(m["counts"].get(s, 0) for m in markers.values()) for s in STATUSES}
        missing = sorted(set(range(self.n_shards)) - set(committed))
        manifest = {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_VERSION,
            "finished": now_iso(),
            **self.settings(),
            "n_shards": self.n_shards,
            "committed_shards": len(committed),
            "missing_shards": missing,
            "gave_up_shards": sorted(k for k, m in markers.items() if m.get("gave_up")),
            "complete": not missing,
            "counts": counts,
            "solver_seconds": float(sum(m.get("seconds", 0.0) for m in markers.values())),
            "summary": jsonable(summary or {}),
        }
        mine = run_tmp(root, self.run_id)
        _fs.write_json_atomic(fs, posixpath.join(root, MANIFEST_FILE), manifest, mine)
        if fs.exists(mine):  # only this run's temporary files
            fs.rm(mine, recursive=True)
        tmp = posixpath.join(root, TMP_DIR)
        with contextlib.suppress(FileNotFoundError, OSError):
            if fs.exists(tmp) and not fs.ls(tmp):
                fs.rm(tmp, recursive=True)
        return manifest

    @staticmethod
    def _clean(fs, root: str, markers: dict[int, dict], tables: Sequence[str]) -> None:
        """Remove the ``tables`` of shards without a (verified) marker, and the grids
        groups that no marker names (attempts that did not commit)."""
        for sub in tables:
            for path in fs.glob(posixpath.join(root, sub, "shard-*.parquet")):
                if shard_of(path) not in markers:
                    fs.rm(path)
        named = {m.get("grids") for m in markers.values()}
        for name in attempt_grids(fs, root):
            if name not in named:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(posixpath.join(root, GRIDS_DIR, name), recursive=True)


_FROM_COMMITTER = frozenset({
    "n_problems", "shard_size", "grid_shape", "input_grid_gmms", "options", "input_url",
    "input_fingerprint", "input_shards", "n_shards", "shard_range", "curve_length",
    "tables", "shard_stops", "plans",
})
