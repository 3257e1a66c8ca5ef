"""The Ray actor: holds an open store, the shard committer and a warm (jitted) solver.

Each actor is one worker process; JAX compiles on the first shard of each
bucket shape and keeps the compiled programs for the life of the process (and
in the persistent compilation cache, so a replacement actor loads instead of
recompiling). The driver sends shard indices and gets small summaries back
(:class:`~raybary.runner.shard.ShardSummary`).
"""

from __future__ import annotations

import dataclasses
import os

import ray

from raybary.runner.metrics import METRICS_ENV, ShardMetrics, run_tags
from raybary.runner.options import ExecOptions, GridOptions, SolverOptions
from raybary.runner.shard import ShardSummary, fail_shard, peak_rss_mb, process_shard

__all__ = ["ShardWorker", "DistanceWorker", "ActorInfo", "actor_env", "make_actor"]


@dataclasses.dataclass(frozen=True)
class ActorInfo:
    """An actor's process: id, Ray node id, peak memory (MiB)."""

    pid: int
    node: str
    peak_rss_mb: float


class ShardWorker:
    """Solves shards of one run; each method returns a small summary."""

    def __init__(self, store_url: str, committer, solver: SolverOptions,
                 grid: GridOptions, storage_options=None) -> None:
        from raybary.batch.api import configure_jax

        configure_jax()
        # the input's storage options come as an argument (an actor does not see
        # the driver's later environment); the committer carries the output's
        self.store = self.open_input(store_url, storage_options)
        self.committer = committer
        self.solver = solver
        self.grid = grid
        self.node_id = ray.get_runtime_context().get_node_id()
        self.metrics = ShardMetrics(run_tags(committer.run_id, committer.url))

    @staticmethod
    def open_input(store_url: str, storage_options=None):
        """The input store (a subclass reading other stores overrides this)."""
        from raybary.storage import open_store

        return open_store(store_url, storage_options=storage_options)

    def info(self) -> ActorInfo:
        """This actor's process (the driver's sign that the actor runs)."""
        return ActorInfo(os.getpid(), self.node_id, peak_rss_mb())

    def run_shard(self, shard_index: int) -> ShardSummary:
        """Solve and commit shard ``shard_index`` (:func:`~raybary.runner.shard.process_shard`)."""
        out = process_shard(self.store, self.committer, shard_index, self.solver, self.grid)
        self.metrics.shard_done(out)
        return dataclasses.replace(out, node=self.node_id)

    def fail_shard(self, shard_index: int, message: str) -> ShardSummary:
        """Commit shard ``shard_index`` as failed (:func:`~raybary.runner.shard.fail_shard`)."""
        out = fail_shard(self.store, self.committer, shard_index, self.solver, message)
        return dataclasses.replace(out, node=self.node_id)


def actor_env(exe: ExecOptions) -> dict[str, str]:
    """Environment variables of the actors' runtime_env.

    GPU actors: no preallocation (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) and,
    for a fraction of a GPU, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9 x that
    fraction, so several actors share one GPU. CPU actors: ``JAX_PLATFORMS=cpu``,
    a solver lane per CPU of the actor (``RAYBARY_SOLVER_THREADS``, at least
    one) and XLA's intra-op thread pool off (:func:`~raybary.batch.engine.lane_xla_flags`:
    the lanes are the parallelism). The driver's ``RAYBARY_JAX_CACHE``,
    ``RAYBARY_PROGRAMS`` (:mod:`~raybary.batch.programs`) and
    ``RAYBARY_METRICS`` (:mod:`~raybary.runner.metrics`), where set, are
    passed on. ``exe.actor_env`` overrides any of these.
    """
    from raybary.batch.engine import lane_xla_flags

    env: dict[str, str] = {}
    if exe.gpus_per_actor > 0:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if exe.gpus_per_actor < 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * exe.gpus_per_actor:.3f}"
    else:
        threads = str(max(1, int(exe.cpus_per_actor)))
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = lane_xla_flags(os.environ.get("XLA_FLAGS", ""))
        env["RAYBARY_SOLVER_THREADS"] = threads
        env["OMP_NUM_THREADS"] = threads
    for name in ("RAYBARY_JAX_CACHE", "RAYBARY_PROGRAMS", METRICS_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update({str(k): str(v) for k, v in exe.actor_env.items()})
    return env


def make_actor(exe: ExecOptions, worker: type[ShardWorker], *args):
    """Start one ``worker`` actor (a :class:`ShardWorker`, a
    :class:`DistanceWorker`, or a subclass that injects faults in tests) with
    the resources and environment of ``exe``; ``args`` go to its constructor
    (``store_url, committer, solver, grid or pairs, storage_options``). The
    input's storage options and the committer's (the output's) travel as the
    actor's arguments, never in its environment or its name.

    ``max_restarts=0``: the driver replaces a dead actor itself (and re-queues
    every shard that was on it), so there is one place that decides.
    """
    cls = ray.remote(worker)
    opts = dict(num_cpus=exe.cpus_per_actor, num_gpus=exe.gpus_per_actor, max_restarts=0,
                max_task_retries=0, runtime_env={"env_vars": actor_env(exe)},
                scheduling_strategy="SPREAD")
    if exe.resources:
        opts["resources"] = dict(exe.resources)
    return cls.options(**opts).remote(*args)


class DistanceWorker(ShardWorker):
    """Solves the shards of a distance job: ``pairs`` (an
    :class:`~raybary.storage.pairs.AllPairs` or
    :class:`~raybary.storage.pairs.PairsFile`) in place of a run's grid
    options, a :class:`~raybary.storage.gmm_store.GMMStore` as input
    (:mod:`raybary.runner.pairs_shard` does the work)."""

    def __init__(self, store_url: str, committer, solver: SolverOptions, pairs,
                 storage_options=None) -> None:
        super().__init__(store_url, committer, solver, None, storage_options)
        self.pairs = pairs

    @staticmethod
    def open_input(store_url: str, storage_options=None):
        from raybary.storage.gmm_store import open_gmm_store

        return open_gmm_store(store_url, storage_options=storage_options)

    def run_shard(self, shard_index: int) -> ShardSummary:
        from raybary.runner.pairs_shard import process_pairs_shard

        out = process_pairs_shard(self.store, self.pairs, self.committer, shard_index,
                                  self.solver)
        self.metrics.shard_done(out)
        return dataclasses.replace(out, node=self.node_id)

    def fail_shard(self, shard_index: int, message: str) -> ShardSummary:
        from raybary.runner.pairs_shard import process_pairs_shard

        out = process_pairs_shard(self.store, self.pairs, self.committer, shard_index,
                                  self.solver, give_up=message)
        return dataclasses.replace(out, node=self.node_id)
