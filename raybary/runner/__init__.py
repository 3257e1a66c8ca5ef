"""The Ray runner: shards a problem store across actors, writes results back.

Layers: :mod:`options` (what to compute, how to spread it; no Ray),
:mod:`shard` (one shard end to end: read, solve, grids, commit; no Ray),
:mod:`actor` (the Ray actor around it), :mod:`pool` (the driver's
bookkeeping: shard tasks, the actor pool, tasks in flight), :mod:`driver`
(scheduling, retries, resume, progress), :mod:`distances` (the distance job,
on the same driver), :mod:`metrics` (what the driver and the actors report to
Ray's metrics export). See ``docs/runner.md``.
"""

from __future__ import annotations

from raybary.runner.options import ExecOptions, GridOptions, SolverOptions

__all__ = ["run", "run_distances", "RunReport", "JobIncomplete", "SolverOptions",
           "GridOptions", "ExecOptions"]


def __getattr__(name: str):
    if name in ("run", "RunReport", "JobIncomplete"):
        from raybary.runner import driver

        return getattr(driver, name)
    if name == "run_distances":
        from raybary.runner.distances import run_distances

        return run_distances
    raise AttributeError(f"module 'raybary.runner' has no attribute {name!r}")
