"""The distance job's driver: :func:`run_distances` (``raybary distances``).

A distance job is a run of another kind of work through the same machinery
as ``raybary run`` (:func:`raybary.runner.driver.run_job`): one lease per
OUTPUT, shards committed atomically and exactly once by the
:class:`~raybary.storage.results.ShardCommitter` protocol, markers, resume,
a manifest, the same scheduler and fault handling (lost actors replaced and
their shards re-queued, faults retried with backoff, shards that keep
failing committed ``failed``). What differs is the work: the input is a
:class:`~raybary.storage.gmm_store.GMMStore`, a shard is a tile (or a range
of rows of a pairs file) of :mod:`raybary.storage.pairs`, the actors are
:class:`~raybary.runner.actor.DistanceWorker` s
(:mod:`raybary.runner.pairs_shard`) and each shard commits one table,
``distances/`` (``i, j, mw2, converged, status, error``), read back by
:func:`raybary.storage.results.distances.read_distances`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TextIO

from raybary.runner.driver import Job, RunReport, _Storage, run_job
from raybary.runner.join import auth_env_restored
from raybary.runner.options import ExecOptions, SolverOptions
from raybary.runner.shard import ShardSummary
from raybary.storage._fs import absolute_local
from raybary.storage.pairs import DEFAULT_TILE

__all__ = ["run_distances", "distance_options"]


def distance_options(solver: SolverOptions | None) -> SolverOptions:
    """The solver options of a distance job: ``epsilon`` or ``relative_epsilon``
    (default :data:`~raybary.batch.distances.DEFAULT_MW2_RELATIVE_EPSILON`, filled
    in so that it is recorded), ``dtype``, and the plan solver's
    ``max_iterations`` and ``tol``; the barycenter's options are not used."""
    from raybary.batch.distances import DEFAULT_MW2_RELATIVE_EPSILON

    solver = solver or SolverOptions()
    if solver.epsilon is None and solver.relative_epsilon is None:
        solver = replace(solver, relative_epsilon=DEFAULT_MW2_RELATIVE_EPSILON)
    return solver


def _recorded(solver: SolverOptions, pairs, tile: int | None) -> dict:
    """What the layout records and a re-run compares (``None`` left out)."""
    out = {"job": "distances", "pairs": pairs.describe(), "dtype": solver.dtype,
           "epsilon": solver.epsilon, "relative_epsilon": solver.relative_epsilon,
           "max_iterations": solver.max_iterations, "tol": solver.tol, "tile": tile}
    return {k: v for k, v in out.items() if v is not None}


def run_distances(input_url: str, output_url: str, solver: SolverOptions | None = None,
                  exe: ExecOptions | None = None, *, pairs: str = "all",
                  tile: int = DEFAULT_TILE,
                  storage_options: Mapping[str, Any] | None = None,
                  output_storage_options: Mapping[str, Any] | None = None,
                  stream: TextIO | None = sys.stderr,
                  on_shard: Callable[[ShardSummary], None] | None = None,
                  _worker: type | None = None) -> RunReport:
    """Compute :math:`MW_2^2` of pairs of the GMMs of the GMM store ``input_url``
    into ``output_url``; return a :class:`~raybary.runner.driver.RunReport`
    (its ``n_problems``, ``problems_run``, ... count pairs).

    ``pairs``: ``"all"`` (every ``i < j``, in tiles of ``tile`` GMMs a side)
    or the URL of a Parquet file with integer columns ``i`` and ``j`` (gmm
    ids; ``exe.shard_size`` rows a shard). ``solver``: :func:`distance_options`.
    Ray, storage options, errors, resume and ``_worker`` (a
    :class:`~raybary.runner.actor.DistanceWorker` subclass, for tests) are
    as :func:`raybary.runner.run`'s; a re-run with other options or pairs is
    refused unless ``exe.overwrite``.
    """
    with auth_env_restored():
        return _run_distances(input_url, output_url, distance_options(solver),
                              exe or ExecOptions(), pairs, tile, stream, on_shard, _worker,
                              _Storage.of(storage_options, output_storage_options))


def _run_distances(input_url: str, output_url: str, solver: SolverOptions, exe: ExecOptions,
                   pairs_arg: str, tile: int, stream: TextIO | None,
                   on_shard: Callable[[ShardSummary], None] | None, worker: type | None,
                   storage: _Storage) -> RunReport:
    """:func:`run_distances`, with the process's environment its own to change."""
    from raybary.runner.pairs_shard import JobInput
    from raybary.storage import ResultWriter
    from raybary.storage.gmm_store import open_gmm_store
    from raybary.storage.pairs import open_pairs
    from raybary.storage.results.distances import DISTANCES_TABLE

    input_url, output_url = absolute_local(input_url), absolute_local(output_url)
    if pairs_arg != "all":
        pairs_arg = absolute_local(pairs_arg)
    exe.join_address()  # a dashboard URL in $RAY_ADDRESS fails before anything is read
    if not exe.progress:
        stream = None
    t0 = time.perf_counter()
    store = open_gmm_store(input_url, storage_options=storage.input)
    pairs = open_pairs(pairs_arg, store.n_gmms, tile=tile, shard_size=exe.shard_size,
                       storage_options=storage.input)
    tiled = pairs_arg == "all"
    writer = ResultWriter(output_url, n_problems=pairs.n_pairs,
                          shard_size=tile if tiled else exe.shard_size,
                          options=_recorded(solver, pairs, tile if tiled else None),
                          input_url=store.url,
                          input_fingerprint=JobInput(store, pairs).fingerprint(),
                          storage_options=storage.output, tables=(DISTANCES_TABLE,),
                          shard_stops=pairs.shard_stops())

    def new_actor():
        from raybary.runner.actor import DistanceWorker, make_actor

        return make_actor(exe, worker or DistanceWorker, store.url, writer.committer, solver,
                          pairs, store.storage_options)

    job = Job(store.url, pairs.n_pairs, new_actor, unit="pairs")
    return run_job(writer, job, exe, stream, on_shard, t0)
