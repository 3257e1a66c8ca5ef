"""The driver: hands shard tasks to actors, re-queues lost work, reports progress.

What flows through the driver is small: shard tasks out
(:class:`~raybary.runner.pool.ShardTask`), summaries back
(:class:`~raybary.runner.shard.ShardSummary`: counts, timings, node and pid).
Problem data are read and results written by the actors themselves, so the
driver's memory grows with the number of shards, not of problems: per shard
a queued task and its first and last problem id (looked up ``ID_BLOCK`` ids
at a time; from Parquet, a row group's ids at a time at least), plus the
pool of actors and a few counters. The one exception is the input store's
own index: a Parquet store keeps a few numbers per row group and, if its
rows are not sorted by ``problem_id``, its sorted distinct ids (8 bytes per
problem), built when the driver looks up the shards' ids.

Exactly once: every shard's outputs are committed atomically and a commit is
idempotent (a rewrite replaces the same files). The driver re-queues a shard
whenever its outcome is unknown, so each shard ends committed exactly once,
or committed with its valid problems ``failed`` (never silently dropped):

* an attempt lost to a dead actor or node is re-queued at once (the actor is
  replaced; shards queued behind it on that actor never started and go back
  first, without counting), up to ``max_attempts`` lost attempts; an
  attempt that committed its shard before its actor died (the reply was lost
  with the process) counts as committed: the driver reads the shard's marker;
* an attempt whose task raised (a storage fault, ...) is retried after
  waits of 1, 2, 4, ... s (at most 30 s), up to ``max(max_attempts,
  FAULT_ATTEMPTS)`` lost attempts (6 by default);
* both kinds count toward one total per shard; past the limit the shard is
  committed with its valid problems ``failed`` ("not solved: N attempts at
  this shard were lost"), a commit that is retried the same way; a shard
  whose give-up commit is lost too stays uncommitted (:class:`JobIncomplete`).

(:data:`~raybary.runner.options.MAX_ATTEMPTS_HELP` says the same for
``--max-attempts``.) Failures in a row stop the run only after
``STUCK_AFTER_S`` without any success. A re-run of the same command skips
committed shards (:meth:`ResultWriter.prepare`) and solves given-up ones again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from raybary.errors import RaybaryError
from raybary.runner.join import auth_env_restored, connect
from raybary.runner.metrics import DriverMetrics, run_tags
from raybary.runner.options import (
    FAULT_ATTEMPTS,
    MAX_BACKOFF_S,
    RETRY_BACKOFF_S,
    ExecOptions,
    GridOptions,
    SolverOptions,
    recorded_options,
)
from raybary.runner.pool import (
    ActorPool,
    ShardTask,
    Slot,
    TaskKind,
    TaskRecord,
    finished_result,
)
from raybary.runner.shard import ShardSummary, current_rss_mb, peak_rss_mb, summary_from_marker
from raybary.storage._fs import absolute_local, redact_url
from raybary.storage.errors import InputChangedError
from raybary.storage.options import StorageOptions

if TYPE_CHECKING:
    from raybary.storage import ProblemStore, ResultWriter

__all__ = ["run", "run_job", "Job", "RunReport", "JobIncomplete"]

log = logging.getLogger(__name__)

STUCK_AFTER_S = 60.0  # the run stops on failures in a row only after this long without success
ID_BLOCK = 65_536  # problem ids read at a time to find each shard's first and last id


class JobIncomplete(RaybaryError, RuntimeError):
    """The job stopped with shards that could not be committed (exit status 1)."""


@dataclass
class RunReport:
    """What :func:`run` did (also stored as the manifest's ``summary``)."""

    input: str
    output: str
    n_problems: int
    n_shards: int
    shard_size: int
    shards_skipped: int = 0  # committed by an earlier run
    problems_skipped: int = 0  # ... holding this many problems
    shards_run: int = 0  # committed by this run
    shards_given_up: int = 0  # committed as failed after max_attempts lost attempts
    shards_lost: list[int] = field(default_factory=list)  # not committed
    retries: int = 0  # lost attempts that were re-queued
    requeued_unstarted: int = 0  # queued on an actor that died before starting them
    replies_lost: int = 0  # committed by an actor that died before its reply was sent
    actor_replacements: int = 0
    actors: int = 0
    counts_run: dict = field(default_factory=lambda: {"ok": 0, "invalid": 0, "failed": 0})
    counts: dict = field(default_factory=dict)  # whole output (from the manifest)
    problems_run: int = 0
    wall_s: float = 0.0
    problems_per_s: float = 0.0
    time_to_first_shard_s: float | None = None
    step_seconds: dict = field(default_factory=lambda: {"read_s": 0.0, "solve_s": 0.0,
                                                        "grid_s": 0.0, "commit_s": 0.0})
    driver_peak_rss_mb: float = 0.0
    actor_peak_rss_mb: float = 0.0
    shards_by_node: dict = field(default_factory=dict)  # Ray node id -> shards committed
    cluster: dict = field(default_factory=dict)  # the Ray it ran on: join.RayUsed.to_dict()
    pids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # messages of lost attempts (first 20)
    complete: bool = False
    run_id: str = ""  # the run's id: its lease, and the ``run`` tag of its metrics
    # how the run went as it grew: one entry as 10%, 50% and all of its problems are in
    milestones: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def add_shard(self, out: ShardSummary, t0: float) -> None:
        """Count a shard committed by this run (``t0``: when the run started)."""
        self.shards_run += 1
        self.shards_given_up += int(out.gave_up)
        self.problems_run += out.n_problems
        for status in self.counts_run:
            self.counts_run[status] += int(out.counts.get(status, 0))
        for step in self.step_seconds:
            self.step_seconds[step] += float(getattr(out, step))
        if self.time_to_first_shard_s is None:
            self.time_to_first_shard_s = time.perf_counter() - t0
        self.actor_peak_rss_mb = max(self.actor_peak_rss_mb, out.peak_rss_mb)
        self._milestone(time.perf_counter() - t0)
        if out.pid:  # 0: rebuilt from the marker of a shard whose reply was lost
            self.shards_by_node[out.node] = self.shards_by_node.get(out.node, 0) + 1
            if out.pid not in self.pids:
                self.pids.append(out.pid)


    def _milestone(self, elapsed: float) -> None:
        """Record rate and memory when the run passes 10%, 50% and 100% of the
        problems it has to solve (a run that scales keeps both flat)."""
        todo = self.n_problems - self.problems_skipped
        reached = [m["fraction"] for m in self.milestones]
        for fraction in MILESTONES:
            if fraction not in reached and self.problems_run >= fraction * max(todo, 1):
                self.milestones.append({
                    "fraction": fraction, "problems": self.problems_run,
                    "elapsed_s": elapsed,
                    "problems_per_s": self.problems_run / elapsed if elapsed > 0 else 0.0,
                    "driver_rss_mb": current_rss_mb(), "actor_peak_rss_mb": self.actor_peak_rss_mb})


MILESTONES = (0.1, 0.5, 1.0)  # fractions of a run's problems at which RunReport records how it went


# ------------------------------------------------------------------ progress
class _Progress:
    """One status line on stderr: problems (or ``unit``) done, per second, ETA, failures."""

    def __init__(self, total: int, done: int, stream: TextIO | None, interval: float = 1.0,
                 unit: str = "problems"):
        self.total, self.done0, self.done, self.unit = total, done, done, unit
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else 10.0
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.shown = -1
        self.failed = self.invalid = self.retries = 0
        self.metrics: DriverMetrics | None = None  # the same numbers, on Ray's metrics export

    def update(self, n: int = 0, *, failed: int = 0, invalid: int = 0, retries: int = 0,
               force: bool = False) -> None:
        self.done += n
        self.failed += failed
        self.invalid += invalid
        self.retries += retries
        if self.metrics is not None:
            self.metrics.observe(self.done, self.total, self.rate())
        now = time.perf_counter()
        if self.stream is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        self.shown = self.done
        self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
        self.stream.flush()

    def rate(self) -> float:
        """Problems per second committed since the run started."""
        el = time.perf_counter() - self.t0
        return (self.done - self.done0) / el if el > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        left = self.total - self.done
        eta = _hms(left / rate) if rate > 0 else "--:--"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = f", {self.retries} retried" if self.retries else ""
        return (f"[raybary] {self.done}/{self.total} {self.unit} ({pct:5.1f}%) | "
                f"{rate:7.1f} {self.unit}/s | ETA {eta} | failed {self.failed}, "
                f"invalid {self.invalid}{extra}   ")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.observe(self.done, self.total, self.rate())
        if self.stream is not None and self.shown != self.done:
            self.update(force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


# ------------------------------------------------------------------ Ray
def _shard_boundary_ids(store: ProblemStore, shards: list[tuple[int, int]],
                        block: int = ID_BLOCK) -> list[tuple[int, int]]:
    """The first and last problem id of each non-empty shard ``(start, stop)`` of ``store``.

    Rule: ids are read with ``store.problem_ids`` one block of ``block``
    positions at a time, only the blocks that hold a shard's first or last
    position. Reason: the driver's memory must not grow with the number of
    problems.
    """
    shards = [(a, b) for a, b in shards if b > a]
    by_block: dict[int, list[int]] = {}
    for pos in sorted({p for a, b in shards for p in (a, b - 1)}):
        by_block.setdefault(pos // block, []).append(pos)
    ids: dict[int, int] = {}
    for k, positions in by_block.items():
        start = k * block
        got = store.problem_ids(start, min(start + block, store.n_problems))
        ids.update((pos, int(got[pos - start])) for pos in positions)
    return [(ids[a], ids[b - 1]) for a, b in shards]


def _default_actors(exe: ExecOptions) -> int:
    import ray

    res = ray.cluster_resources()
    if exe.gpus_per_actor > 0:
        n = math.floor(res.get("GPU", 0) / exe.gpus_per_actor + 1e-9)
    elif exe.cpus_per_actor > 0:
        n = math.floor(res.get("CPU", 1) / exe.cpus_per_actor + 1e-9)
    else:
        n = int(res.get("CPU", 1))
    return max(n, 1)


# ------------------------------------------------------------------ run
def run(input_url: str, output_url: str, solver: SolverOptions | None = None,
        grid: GridOptions | None = None, exe: ExecOptions | None = None, *,
        storage_options: Mapping[str, Any] | None = None,
        output_storage_options: Mapping[str, Any] | None = None,
        stream: TextIO | None = sys.stderr,
        on_shard: Callable[[ShardSummary], None] | None = None,
        _worker: type | None = None) -> RunReport:
    """Solve every problem of ``input_url`` into ``output_url``; return a :class:`RunReport`.

    Uses the Ray already initialised in this process, else joins the cluster
    that ``exe.address`` or ``$RAY_ADDRESS`` names, else starts a private
    local Ray (:mod:`raybary.runner.join` has the rules; the report's
    ``cluster`` says which). Raises
    :class:`~raybary.storage.ResultsConflictError` if ``output_url`` holds
    results of other options (unless ``exe.overwrite``) and
    :class:`JobIncomplete` if some shards could not be committed (the
    manifest is written either way; a re-run finishes the job).
    ``on_shard(summary)`` is called on the driver after each committed shard
    with its :class:`~raybary.runner.shard.ShardSummary` (shard, counts,
    timings, ``pid`` and ``node``).

    ``storage_options`` go to the fsspec filesystems of the input and the
    output (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for
    ``s3://``); ``output_storage_options``, if given, to the output's instead
    (not merged: another bucket's credentials). The driver and every actor
    use them (the actors get them as arguments: they do not see this
    process's environment); no value is recorded or printed.

    A cluster is sent a token only if it wants one (found in
    ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``);
    Ray's token mode is then on in this process for the run only:
    ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` are as they were when it returns
    or raises.

    ``_worker`` (private, for tests): the actor class, a subclass of
    :class:`~raybary.runner.actor.ShardWorker` that injects faults (default:
    ``ShardWorker``); an argument, not an environment variable, so that no
    user setting can reach it.
    """
    with auth_env_restored():  # joining may turn Ray's token mode on or off
        return _run(input_url, output_url, solver, grid, exe, stream, on_shard, _worker,
                    _Storage.of(storage_options, output_storage_options))


class _Storage(NamedTuple):
    """The storage options of a run's input and output."""

    input: StorageOptions
    output: StorageOptions

    @classmethod
    def of(cls, options, output_options) -> _Storage:
        given = StorageOptions.of(options)
        return cls(given, given if output_options is None else StorageOptions.of(output_options))


def _run(input_url: str, output_url: str, solver: SolverOptions | None,
         grid: GridOptions | None, exe: ExecOptions | None, stream: TextIO | None,
         on_shard: Callable[[ShardSummary], None] | None, worker: type | None,
         storage: _Storage) -> RunReport:
    """:func:`run`, with the process's environment its own to change."""
    from raybary.storage import ResultWriter, open_store

    # Actors of a Ray started elsewhere (--address, or already running) have
    # their own working directory: they get local paths absolute.
    input_url, output_url = absolute_local(input_url), absolute_local(output_url)
    solver = (solver or SolverOptions()).resolved()
    grid = grid or GridOptions()
    exe = exe or ExecOptions()
    exe.join_address()  # a dashboard URL in $RAY_ADDRESS fails before anything is read
    if not exe.progress:
        stream = None
    t0 = time.perf_counter()
    store = open_store(input_url, storage_options=storage.input)  # metadata only
    shard_ids = _shard_boundary_ids(store, store.shards(exe.shard_size))
    writer = ResultWriter(output_url, n_problems=store.n_problems, shard_size=exe.shard_size,
                          grid_shape=grid.shape, input_grid_gmms=grid.input_gmms,
                          options=recorded_options(solver, grid), input_url=store.url,
                          input_fingerprint=store.fingerprint(), input_shards=shard_ids,
                          storage_options=storage.output, plans=grid.plans)

    def new_actor():
        from raybary.runner.actor import ShardWorker, make_actor

        return make_actor(exe, worker or ShardWorker, store.url, writer.committer, solver, grid,
                          store.storage_options)

    return run_job(writer, Job(store.url, store.n_problems, new_actor), exe, stream, on_shard, t0)


class Job(NamedTuple):
    """What :func:`run_job` schedules, whatever the work: the input's URL (for
    the report), the number of items (problems, or a distance job's pairs:
    the shards' positions), how to start one actor (a
    :class:`~raybary.runner.actor.ShardWorker` or subclass, whose
    ``run_shard``/``fail_shard`` commit through the writer's committer), and
    the items' name in the progress line."""

    input_url: str
    n_items: int
    new_actor: Callable[[], Any]
    unit: str = "problems"


def run_job(writer: ResultWriter, job: Job, exe: ExecOptions, stream: TextIO | None,
            on_shard: Callable[[ShardSummary], None] | None, t0: float) -> RunReport:
    """Run ``job`` into ``writer``'s OUTPUT under its lease: the one scheduler,
    fault handling, resume and manifest of every kind of run (the module
    docstring). ``t0``: when the run started (``time.perf_counter()``)."""
    writer.lease.acquire()  # one run per OUTPUT
    keeper = _LeaseKeeper(writer.lease)
    try:
        return _run_leased(writer, job, exe, stream, on_shard, t0)
    finally:
        keeper.stop()
        writer.lease.release()


def _run_leased(writer, job: Job, exe: ExecOptions, stream, on_shard, t0: float) -> RunReport:
    import ray

    committed = writer.prepare(overwrite=exe.overwrite)
    report = RunReport(input=redact_url(job.input_url), output=redact_url(writer.url),
                       n_problems=job.n_items,
                       n_shards=writer.n_shards, shard_size=writer.shard_size,
                       shards_skipped=len(committed), run_id=writer.run_id)
    todo: collections.deque[ShardTask] = collections.deque(
        ShardTask(i) for i in range(writer.n_shards) if i not in committed)
    done_before = sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in committed)
    report.problems_skipped = done_before
    progress = _Progress(job.n_items, done_before, stream, unit=job.unit)
    if stream is not None and committed:
        stream.write(f"[raybary] resuming: {len(committed)} of {writer.n_shards} shards "
                     f"({done_before} {job.unit}) already committed in {writer.url}\n")
    if stream is not None and writer.retried_gave_up:
        stream.write(f"[raybary] solving again {len(writer.retried_gave_up)} shards that gave up "
                     f"last time (shards {writer.retried_gave_up[:10]})\n")

    started = False
    pool: ActorPool | None = None
    try:
        if todo:
            used = connect(exe)
            started, report.cluster = used.started, used.to_dict()
            if stream is not None:
                stream.write(used.line() + "\n")
                stream.flush()
            progress.metrics = DriverMetrics(run_tags(writer.run_id, writer.url), report)
            n_actors = min(exe.actors or _default_actors(exe), len(todo))
            report.actors = n_actors
            pool = ActorPool(job.new_actor, n_actors)
            _Scheduler(pool, todo, exe, report, progress, t0, on_shard, writer).run()
    except (JobIncomplete, InputChangedError) as e:
        stopped = e
    else:
        stopped = None
    finally:
        if pool is not None:
            pool.kill_all()
        if pool is not None or not todo:  # not after a failure to join: its error says it
            progress.close()
        if started:
            ray.shutdown()

    if stopped is not None:  # the run stops, but the manifest says where it stands
        report.errors.append(str(stopped).splitlines()[0][:300])
        with contextlib.suppress(Exception):
            _finish_report(report, writer, t0)
        raise stopped
    _finish_report(report, writer, t0)
    if not report.complete:
        raise JobIncomplete(
            f"{len(report.shards_lost)} of {report.n_shards} shards could not be committed "
            f"(shards {report.shards_lost[:10]}{'...' if len(report.shards_lost) > 10 else ''}); "
            f"last errors: {report.errors[-3:]}; run the same command again to finish the job",
        ) from None
    return report


def _finish_report(report: RunReport, writer, t0: float) -> None:
    """Timings into ``report``, then the manifest (counts, missing shards) back into it."""
    report.wall_s = time.perf_counter() - t0
    report.problems_per_s = report.problems_run / report.wall_s if report.wall_s > 0 else 0.0
    report.driver_peak_rss_mb = peak_rss_mb()
    report.errors = report.errors[:20]
    manifest = writer.finalize(report.to_dict())
    report.counts = manifest["counts"]
    report.complete = bool(manifest["complete"])
    report.shards_lost = list(manifest["missing_shards"])


class _LeaseKeeper:
    """Refreshes the run's lease on OUTPUT from a daemon thread."""

    def __init__(self, lease) -> None:
        import threading

        from raybary.storage.results import LEASE_HEARTBEAT_S

        self.lease, self.period = lease, LEASE_HEARTBEAT_S
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raybary-lease", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.period):
            try:
                if not self.lease.heartbeat():
                    log.error("another run has taken over %s; this run's commits may be "
                              "overwritten", self.lease.url)
                    return
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried
                log.warning("could not refresh the lease on %s: %s", self.lease.url, e)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _placement_message(exe: ExecOptions, waited: float, n_slots: int) -> str:
    import ray

    def fmt(res: dict) -> str:
        keys = [k for k in sorted(res) if not k.startswith(("node:", "memory",
                                                            "object_store_memory"))]
        return ", ".join(f"{res[k]:g} {k}" for k in keys) or "nothing"

    try:
        total, free = fmt(ray.cluster_resources()), fmt(ray.available_resources())
    except Exception:  # noqa: BLE001 - the message matters more than the numbers
        total = free = "unknown"
    return (f"no actor could be started in {waited:.0f} s: {n_slots} actors asked for "
            f"{exe.actor_request()} each; the cluster has {total} in all, {free} free. "
            "Ask for fewer or smaller actors (--actors, --cpus-per-actor, "
            "--gpus-per-actor), add nodes, or wait longer (--placement-timeout).")


class _Scheduler:
    """Keeps ``exe.in_flight`` shard tasks queued on each running actor of ``pool``
    until ``todo`` is empty, and decides what happens to lost ones (the module
    docstring says what).

    An actor gets tasks only once it runs (its ``info()`` call returned), so
    shards never wait on an actor that cannot be placed. While none runs for
    ``exe.placement_timeout()`` seconds, the run fails naming what the actors
    ask for and what the cluster has; actors that stay unplaced while others
    run are reported once and get no work.
    """

    def __init__(self, pool: ActorPool, todo: collections.deque[ShardTask], exe: ExecOptions,
                 report: RunReport, progress: _Progress, t0: float,
                 on_shard: Callable[[ShardSummary], None] | None, writer: ResultWriter) -> None:
        self.pool, self.todo, self.exe, self.writer = pool, todo, exe, writer
        self.report, self.progress, self.t0, self.on_shard = report, progress, t0, on_shard
        self.delayed: list[tuple[float, ShardTask]] = []  # (due time, task): backing off
        self.stuck = 0  # failures since the last success
        self.max_stuck = max(10, 3 * len(pool.slots) + exe.max_attempts)
        self.last_success = time.monotonic()
        self.fault_attempts = max(exe.max_attempts, FAULT_ATTEMPTS)
        self.timeout = exe.placement_timeout()
        self.none_running_since = time.monotonic()

    def run(self) -> None:
        """Schedule until every shard is committed or given up; raises :class:`JobIncomplete`
        when the run cannot go on, :class:`InputChangedError` when the input changed."""
        while self.todo or self.pool.in_flight() or self.delayed:
            self._release_delayed()
            self._check_placement()
            while self.todo and (slot := self.pool.pick(self.exe.in_flight)) is not None:
                self.pool.submit(slot, self.todo.popleft())
            finished = self.pool.wait(timeout=1.0)
            self.progress.update()
            for ref in finished:
                rec = self.pool.pop(ref)
                if rec is None:  # taken with its actor's other tasks when that actor died
                    continue
                self._collect(ref, rec)
                if self.stuck > self.max_stuck and \
                        time.monotonic() - self.last_success > STUCK_AFTER_S:
                    raise JobIncomplete(
                        f"{self.stuck} shard attempts in a row failed; giving up. Last errors:\n  "
                        + "\n  ".join(self.report.errors[-5:]))

    # ------------------------------------------------------------ actors
    def _replace(self, slot: Slot) -> None:
        self.pool.replace(slot)
        self.report.actor_replacements += 1

    def _check_placement(self) -> None:
        for slot, error in self.pool.poll_started():  # its constructor failed, or its node died
            self.stuck += 1
            self.report.errors.append(
                f"actor could not start ({str(error).splitlines()[0][:200]})")
            if self.stuck > self.max_stuck:
                raise JobIncomplete("actors keep failing to start; last errors:\n  "
                                    + "\n  ".join(self.report.errors[-5:])) from None
            self._replace(slot)
        now = time.monotonic()
        if self.pool.running():
            self.none_running_since = now
            for slot in self.pool.pending():
                if not slot.warned and now - slot.since > self.timeout:
                    slot.warned = True
                    log.warning("an actor (%s) could not be placed in %.0f s; going on without it",
                                self.exe.actor_request(), now - slot.since)
        elif now - self.none_running_since > self.timeout:
            raise JobIncomplete(_placement_message(self.exe, now - self.none_running_since,
                                                   len(self.pool.slots)))

    # ------------------------------------------------------------ outcomes
    def _collect(self, ref, rec: TaskRecord) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            out = ray.get(ref)
        except RayActorError as e:
            self._actor_died(rec, e)
        except InputChangedError as e:  # no retry: every shard would mix two inputs
            raise InputChangedError(_cause_message(e)) from None
        except Exception as e:  # noqa: BLE001 - the task raised: retry, then give up
            self.stuck += 1
            self._lost(rec.task, f"{type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[-1][:300]}", backoff=True)
        else:
            self.stuck = 0
            self.last_success = time.monotonic()
            self._committed(out)

    def _committed(self, out: ShardSummary) -> None:
        self.report.add_shard(out, self.t0)
        self.progress.update(out.n_problems, failed=int(out.counts.get("failed", 0)),
                             invalid=int(out.counts.get("invalid", 0)), force=True)
        if self.on_shard is not None:
            self.on_shard(out)

    def _actor_died(self, rec: TaskRecord, error: Exception) -> None:
        self.stuck += 1
        why = f"actor died ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        # An actor runs its tasks one at a time in submission order, so of the
        # tasks it still had, the first submitted that did not finish was the
        # one running: that attempt counts; the others never started and go
        # back first. But a task can commit its shard and still lose its reply
        # with its process (the reply is sent after the task returns, while the
        # next task may already be killing the process): the shard's marker
        # says it is done. Then the death came after that commit, during the
        # next task or between the two: which one is not known, so no attempt
        # counts (a task that kills its actor counts once it runs first).
        unknown = []
        done_seq = -1  # the last task whose shard is committed
        for ref, other in [(None, rec), *self.pool.take(rec.slot)]:
            out = None if ref is None else finished_result(ref)  # finished before it died?
            if out is None:
                out = self._committed_without_reply(other)
                done_seq = other.seq if out is not None else done_seq
            if out is not None:
                self._committed(out)
            else:
                unknown.append(other)
        unknown.sort(key=lambda r: r.seq)
        # ran and ended before a committed one, without commit: each attempt counts
        for ran in [r for r in unknown if r.seq < done_seq]:
            self._lost(ran.task, why)
        unstarted = [r for r in unknown if r.seq > done_seq]
        if unstarted and done_seq < 0:
            self._lost(unstarted.pop(0).task, why)
        for task in reversed([r.task for r in unstarted]):
            self.todo.appendleft(task)
        if self.pool.holds(rec.slot):
            self._replace(rec.slot)
            self.report.requeued_unstarted += len(unstarted)

    def _committed_without_reply(self, rec: TaskRecord) -> ShardSummary | None:
        """The summary of ``rec``'s shard if that task committed it solved before
        its actor died (the reply was lost), else ``None``."""
        if rec.task.kind is not TaskKind.SOLVE:
            return None  # a give-up commit is cheap to redo; an old marker may say gave_up
        try:
            marker = self.writer.solved_marker(rec.task.shard)
        except Exception:  # noqa: BLE001 - storage unreadable now: treat it as lost
            return None
        if marker is None:
            return None
        self.report.replies_lost += 1
        return summary_from_marker(marker)

    def _lost(self, task: ShardTask, why: str, backoff: bool = False) -> None:
        """``task`` was lost: try again, commit the shard as failed, or (a lost
        give-up commit, too often) leave the shard uncommitted."""
        self.report.errors.append(f"shard {task.shard}: {why}")
        if task.attempt < (self.fault_attempts if backoff else self.exe.max_attempts):
            self._again(task.retry(), backoff)
            if task.kind is TaskKind.SOLVE:
                self.report.retries += 1
                self.progress.update(retries=1)
        elif task.kind is TaskKind.SOLVE:
            self.todo.append(task.give_up(f"not solved: {task.attempt} attempts at this shard "
                                          f"were lost (last: {why[:300]})"))
        else:
            log.error("shard %d could not be committed: %s", task.shard, why)

    def _again(self, task: ShardTask, backoff: bool) -> None:
        if backoff:  # a fault that may pass (storage, memory): wait 1, 2, 4, ... 30 s
            wait = min(RETRY_BACKOFF_S * 2 ** (task.lost_before - 1), MAX_BACKOFF_S)
            self.delayed.append((time.monotonic() + wait, task))
        else:
            self.todo.append(task)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        self.todo.extend(task for due, task in self.delayed if due <= now)
        self.delayed = [d for d in self.delayed if d[0] > now]


def _cause_message(e: Exception) -> str:
    """The message of the exception a Ray task raised, without Ray's traceback."""
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).strip()
