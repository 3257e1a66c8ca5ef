"""One shard, start to finish: read, solve, evaluate grids, commit (no Ray here).

:func:`process_shard` is what a Ray actor runs for each shard descriptor; it
is plain Python so it can be tested and profiled without Ray. The problem
data stay in this process: the caller gets back a small :class:`ShardSummary`.

Failure isolation is :func:`raybary.batch.outcome.solve_outcome`'s: invalid
problems come back from the store as ``None`` with a message (``invalid``), a
problem the solver raises on is ``failed`` alone, the rest are solved.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raybary.batch.outcome import SolveFn, solve_outcome
from raybary.options import SolverOptions
from raybary.runner.options import GridOptions
from raybary.storage.results import ShardGrids
from raybary.types import Problem, Result

__all__ = ["process_shard", "fail_shard", "shard_grids", "blank_shard_grids", "problem_extents", "ShardSummary",
           "peak_rss_mb", "current_rss_mb"]


@dataclass(frozen=True)
class ShardSummary:
    """What an actor sends back for a committed shard (small, whatever the shard's size).

    ``counts``: the shard's problems by status (``ok``, ``invalid``,
    ``failed``); ``*_s``: seconds of each step; ``pid``, ``node`` and
    ``peak_rss_mb``: the process that did it (``node`` is set by the actor);
    ``gave_up``: committed as failed without solving (:func:`fail_shard`).
    """

    shard: int
    start: int
    stop: int
    counts: dict[str, int] = field(default_factory=dict)
    read_s: float = 0.0
    solve_s: float = 0.0
    grid_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0
    pid: int = 0
    node: str = "?"
    peak_rss_mb: float = 0.0
    gave_up: bool = False

    @property
    def n_problems(self) -> int:
        return self.stop - self.start


def summary_from_marker(marker: dict) -> ShardSummary:
    """The summary of a shard committed by an actor that died before replying,
    rebuilt from its commit marker (no step timings, process or node)."""
    return ShardSummary(shard=int(marker["shard"]), start=int(marker["start"]),
                        stop=int(marker["stop"]), counts=dict(marker["counts"]),
                        solve_s=float(marker.get("seconds", 0.0)))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (its peak where ``/proc`` does
    not say)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------ grids
def problem_extents(problem: Problem, dims: tuple[int, int] = (0, 1),
                    barycenter: Result | None = None) -> np.ndarray:
    """Grid extent of a problem: ``(xmin, xmax, ymin, ymax)`` on coordinates
    ``dims``, or ``(xmin, xmax)`` for a ``d = 1`` problem (its curve).

    The window shows every input GMM and the ``barycenter`` (if given) whole:
    each component's mean +- 3 standard deviations, and all of the region
    where ``-log p`` is below 10, plus 5 % on each side
    (:func:`raybary.density.covering_extent`). The barycenter's grid and the
    inputs' grids use the same extent, so they line up.
    """
    from raybary.density import covering_extent

    gmms = [(g.weights, g.means, g.covs) for g in problem.gmms]
    if barycenter is not None and len(barycenter.weights):
        gmms.append((barycenter.weights, barycenter.means, barycenter.covs))
    return covering_extent(gmms, (0,) if problem.dim == 1 else tuple(dims))


def blank_shard_grids(n: int, grid: GridOptions, curve_length: int | None = None) -> ShardGrids:
    """The grids of ``n`` problems before any is evaluated: NaN everywhere (what
    a problem without a barycenter or an evaluable input keeps). Curves have
    ``curve_length`` points (default ``max(H, W)``)."""
    h, w = grid.shape
    length = int(curve_length or max(h, w))
    j = grid.input_gmms
    return ShardGrids(np.full((n, h, w), np.nan, np.float32), np.full((n, 4), np.nan),
                      np.full((n, j, h, w), np.nan, np.float32) if j else None,
                      np.full((n, length), np.nan, np.float32), np.full((n, 2), np.nan),
                      np.full((n, j, length), np.nan, np.float32) if j else None)


def shard_grids(problems: Sequence[Problem | None], results: Sequence[Result | None],
                statuses: Sequence[str], grid: GridOptions,
                curve_length: int | None = None) -> ShardGrids:
    """Grids (``d >= 2``) and curves (``d = 1``) of one shard: a :class:`ShardGrids`.

    Rows stay NaN where there is none: invalid problems, ``grid.dims``
    outside ``d``; the barycenter's row is NaN where the problem is not
    ``ok``. Extents are ``grid.bounds`` (its ``xmin, xmax`` for curves) or
    :func:`problem_extents` of the inputs and, for ``ok`` problems, the
    barycenter. Curves have ``curve_length`` points (default ``max(H, W)``).
    """
    from raybary.runner.grids import rows_log_densities

    n, j = len(problems), grid.input_gmms
    out = blank_shard_grids(n, grid, curve_length)
    length = out.curve.shape[1]
    by_dim: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        if p is not None and (p.dim == 1 or max(grid.dims) < p.dim):
            by_dim.setdefault(p.dim, []).append(i)
    for d, rows in sorted(by_dim.items()):
        if d == 1:
            extents, bary, inputs = out.curve_extent, out.curve, out.curve_inputs
            fixed = None if grid.bounds is None else grid.bounds[:2]
            dims, shape = (0,), (1, length)
        else:
            extents, bary, inputs = out.extent, out.barycenter, out.inputs
            fixed, dims, shape = grid.bounds, grid.dims, grid.shape
        ok = [i for i in rows if statuses[i] == "ok"]
        rows_log_densities(problems, results, rows, ok, dims, fixed, extents,
                           bary.reshape(n, *shape),  # views: curves are 1 x L grids
                           None if inputs is None else inputs.reshape(n, j, *shape))
    return out


# ------------------------------------------------------------------ shards
def process_shard(store, committer, shard_index: int, solver: SolverOptions, grid: GridOptions,
                  *, solve_fn: SolveFn | None = None) -> ShardSummary:
    """Read, validate, solve, grid and commit shard ``shard_index``; return a summary.

    ``store`` is a :class:`~raybary.storage.ProblemStore`, ``committer`` the
    run's :class:`~raybary.storage.results.ShardCommitter`. The summary holds
    the shard index, its range, counts by status and the seconds of each step.
    """
    t0 = time.perf_counter()
    shard = _read(store, committer, shard_index, solver.dtype)
    t_read = time.perf_counter()
    outcome = solve_outcome(shard.problem_ids, shard.problems, shard.errors, solver,
                            solve_fn=solve_fn)
    t_solve = time.perf_counter()
    grids = None
    if committer.grid_shape is not None:
        grids = shard_grids(shard.problems, outcome.results, outcome.statuses, grid,
                            committer.curve_length)
    t_grid = time.perf_counter()
    info = committer.commit_shard(shard_index, outcome, grids)
    t_end = time.perf_counter()
    return ShardSummary(shard_index, shard.start, shard.stop, info["counts"],
                        read_s=t_read - t0, solve_s=t_solve - t_read, grid_s=t_grid - t_solve,
                        commit_s=t_end - t_grid, total_s=t_end - t0, pid=os.getpid(),
                        peak_rss_mb=peak_rss_mb())


def fail_shard(store, committer, shard_index: int, solver: SolverOptions,
               message: str) -> ShardSummary:
    """Commit shard ``shard_index`` without solving: valid problems get status
    ``failed`` with ``message`` (used when solving it kept killing processes),
    invalid ones keep their validation message (read for the run's dtype, as
    :func:`process_shard` reads it, so a problem is ``invalid`` either way)."""
    shard = _read(store, committer, shard_index, solver.dtype)
    outcome = solve_outcome(shard.problem_ids, shard.problems, shard.errors, solver,
                            give_up=message)
    info = committer.commit_shard(shard_index, outcome, gave_up=message)
    return ShardSummary(shard_index, shard.start, shard.stop, info["counts"], pid=os.getpid(),
                        peak_rss_mb=peak_rss_mb(), gave_up=True)


def _read(store, committer, shard_index: int, dtype: str):
    """Shard ``shard_index`` of ``store``, validated for ``dtype``, after checking
    that the input is still the run's."""
    start, stop = committer.shard_range(shard_index)
    shard = store.read(start, stop, dtype=dtype)
    committer.check_input(store, shard_index, shard.problem_ids)
    return shard
