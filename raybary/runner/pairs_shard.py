"""One shard of a distance job, start to finish: read its GMMs, solve its pairs, commit.

:func:`process_pairs_shard` is what a :class:`~raybary.runner.actor.DistanceWorker`
runs for each shard, plain Python (no Ray) as :mod:`raybary.runner.shard` is
for a barycenter run. Each GMM the shard needs is read and validated once
(:meth:`~raybary.storage.gmm_store.GMMStore.read_gmms`, the store's rules),
however many of its pairs it is in. A pair is ``invalid`` when one of its
GMMs is (the message names the GMM and the field), when an id is not in the
store, or when its GMMs differ in dimension; the other pairs are solved
together by :func:`raybary.batch.distances.solve_pairs`. The rows,
``(i, j, mw2, converged, status, error)``, are committed as the shard's
``distances`` table by the run's committer (the barycenter run's protocol).
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from raybary.options import SolverOptions
from raybary.runner.shard import ShardSummary, peak_rss_mb
from raybary.storage.pairs import ShardPairs
from raybary.storage.results.distances import DISTANCES_TABLE, distances_schema
from raybary.types import GMM

__all__ = ["process_pairs_shard", "JobInput", "read_positions"]

#: Store positions at most between two runs of positions read as one range.
READ_GAP = 64


class JobInput(NamedTuple):
    """A distance job's input, the GMM store and its pairs: its :meth:`fingerprint`
    (the store's files, and the pairs file's) is what a resume compares."""

    store: object
    pairs: object

    def fingerprint(self) -> dict:
        out = self.store.fingerprint()
        if hasattr(self.pairs, "fingerprint_entry"):
            out["files"] = [*out["files"], self.pairs.fingerprint_entry()]
        return out


class _Read(NamedTuple):
    """GMMs read at store positions: position -> id, GMM (or ``None``), message."""

    ids: dict[int, int]
    gmms: dict[int, GMM | None]
    errors: dict[int, str | None]


def read_positions(store, positions: np.ndarray, dtype: str) -> _Read:
    """The GMMs at ``positions`` (ascending), read in ranges (positions less than
    :data:`READ_GAP` apart share one) and validated once each for ``dtype``."""
    out = _Read({}, {}, {})
    if not len(positions):
        return out
    cuts = np.flatnonzero(np.diff(positions) > READ_GAP) + 1
    for run in np.split(positions, cuts):
        lo = int(run[0])
        shard = store.read_gmms(lo, int(run[-1]) + 1, dtype=dtype)
        for p in run.tolist():
            out.ids[p] = int(shard.ids[p - lo])
            out.gmms[p] = shard.gmms[p - lo]
            out.errors[p] = shard.errors[p - lo]
    return out


class _Rows(NamedTuple):
    """The rows of a shard before solving: ids, and the pairs to solve."""

    i: np.ndarray
    j: np.ndarray
    status: list[str]
    error: list[str | None]
    todo: list[int]  # rows to solve
    pairs: list[tuple[GMM, GMM]]


def _rows(shard: ShardPairs, read: _Read) -> _Rows:
    """Each pair's ids and whether it can be solved (else ``invalid`` and why)."""
    n = len(shard)
    i = np.array([read.ids.get(int(p), -1) for p in shard.left], np.int64)
    j = np.array([read.ids.get(int(p), -1) for p in shard.right], np.int64)
    if shard.left_id is not None:  # ids as the pairs file gives them (known or not)
        i, j = shard.left_id.astype(np.int64), shard.right_id.astype(np.int64)
    rows = _Rows(i, j, ["ok"] * n, [None] * n, [], [])
    given = shard.errors or [None] * n
    for r in range(n):
        a_pos, b_pos = int(shard.left[r]), int(shard.right[r])
        why = given[r]
        if why is None:
            bad = [read.errors[p] for p in dict.fromkeys((a_pos, b_pos)) if read.errors[p]]
            why = "; ".join(bad) or None
        if why is None and read.gmms[a_pos].dim != read.gmms[b_pos].dim:
            why = (f"gmm {i[r]} (d={read.gmms[a_pos].dim}) and gmm {j[r]} "
                   f"(d={read.gmms[b_pos].dim}) differ in dimension")
        if why is None:
            rows.todo.append(r)
            rows.pairs.append((read.gmms[a_pos], read.gmms[b_pos]))
        else:
            rows.status[r], rows.error[r] = "invalid", why
    return rows


def process_pairs_shard(store, pairs, committer, shard_index: int, solver: SolverOptions,
                        *, give_up: str | None = None) -> ShardSummary:
    """Read, validate, solve and commit shard ``shard_index`` of a distance job.

    ``store``: the :class:`~raybary.storage.gmm_store.GMMStore`; ``pairs``:
    the job's :class:`~raybary.storage.pairs.AllPairs` or
    :class:`~raybary.storage.pairs.PairsFile`; ``solver``: epsilon, dtype and
    the plan solver's ``max_iterations`` and ``tol``. ``give_up``: commit the
    valid pairs ``failed`` with this message, unsolved (the driver's give-up).
    """
    from raybary.batch.distances import solve_pairs

    t0 = time.perf_counter()
    shard = pairs.shard(shard_index, store)
    read = read_positions(store, shard.positions(), solver.dtype)
    committer.check_input(JobInput(store, pairs), shard_index, np.zeros(0, np.int64))
    rows = _rows(shard, read)
    t_read = time.perf_counter()
    mw2, converged = np.full(len(shard), np.nan), [None] * len(shard)
    if give_up is not None:
        for r in rows.todo:
            rows.status[r], rows.error[r] = "failed", give_up
    elif rows.todo:
        out = solve_pairs(rows.pairs, solver, max_iterations=solver.max_iterations,
                          tol=solver.tol)
        mw2[rows.todo] = out.values
        for r, ok in zip(rows.todo, out.converged.tolist()):
            converged[r] = bool(ok)
    t_solve = time.perf_counter()
    table = pa.table({"i": rows.i, "j": rows.j, "mw2": mw2,
                      "converged": pa.array(converged, pa.bool_()),
                      "status": rows.status, "error": pa.array(rows.error, pa.string())},
                     schema=distances_schema())
    counts = {s: rows.status.count(s) for s in ("ok", "invalid", "failed")}
    info = committer.commit_tables(shard_index, {DISTANCES_TABLE: table}, counts,
                                   seconds=t_solve - t_read, gave_up=give_up)
    t_end = time.perf_counter()
    return ShardSummary(shard_index, info["start"], info["stop"], info["counts"],
                        read_s=t_read - t0, solve_s=t_solve - t_read, commit_s=t_end - t_solve,
                        total_s=t_end - t0, pid=os.getpid(), peak_rss_mb=peak_rss_mb(),
                        gave_up=give_up is not None)
