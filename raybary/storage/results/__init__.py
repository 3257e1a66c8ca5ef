"""Results: an output directory written shard by shard, atomically (``raybary.results/1``).

Its modules, re-exported here (``from raybary.storage.results import ...``):

* :mod:`~raybary.storage.results.layout`: the names, schemas, commit markers,
  lease file and input fingerprint comparison that writer and reader share;
* :mod:`~raybary.storage.results.lease`: :class:`OutputLease` (driver: one
  run per OUTPUT);
* :mod:`~raybary.storage.results.writer`: :class:`ResultWriter` (driver:
  prepare and finalise the directory);
* :mod:`~raybary.storage.results.commit`: :class:`ShardCommitter` and
  :class:`ShardGrids` (actors: commit a shard, and its plans in runs that store them);
* :mod:`~raybary.storage.results.reader`: :func:`read_results`,
  :class:`Results` (barycenters as :class:`raybary.GMM`: ``res.barycenter(pid)``,
  ``res.iter_barycenters()``), :class:`BarycenterNotFoundError`, :class:`Grids`,
  :func:`summarize`.

See ``docs/storage.md`` for the layout and the commit protocol.
"""

from __future__ import annotations

from raybary.storage.results.commit import ShardCommitter, ShardGrids
from raybary.storage.results.layout import (
    COMMIT_KEY,
    COMMITS_DIR,
    GRIDS_FORMAT,
    LAYOUT_FILE,
    LEASE_FILE,
    LEASE_HEARTBEAT_S,
    LEASE_SETTLE_S,
    LEASE_STALE_S,
    MANIFEST_FILE,
    PLANS_DIR,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    STATUSES,
    TMP_DIR,
    barycenters_schema,
    curve_length,
    input_changes,
    plans_schema,
    problems_schema,
)
from raybary.storage.results.lease import OutputLease
from raybary.storage.results.reader import (
    BarycenterNotFoundError,
    Curves,
    Grids,
    Results,
    read_results,
    summarize,
)
from raybary.storage.results.writer import ResultWriter

__all__ = [
    "Curves",
    "curve_length",
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
    "ResultWriter",
    "ShardCommitter",
    "ShardGrids",
    "OutputLease",
    "Results",
    "BarycenterNotFoundError",
    "Grids",
    "read_results",
    "summarize",
    "problems_schema",
    "barycenters_schema",
    "plans_schema",
    "PLANS_DIR",
    "input_changes",
]
