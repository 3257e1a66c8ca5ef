"""The driver: hands shard indices to actors, re-queues lost work, reports progress.

What flows through the driver is small: shard indices out, summary dicts
back (counts, timings, node and pid). Problem data are read and results
written by the actors themselves, so the driver's memory does not grow with
the number of problems (it holds a deque of shard indices and a few counters).

Exactly once: every shard's outputs are committed atomically and a commit is
idempotent (a rewrite replaces the same files). The driver re-queues a shard
whenever its outcome is unknown (the actor died, its node died, the task
raised), so each shard ends committed exactly once, or, after
``max_attempts`` lost attempts, committed with its valid problems ``failed``
(never silently dropped). A re-run of the same command skips committed
shards (:meth:`ResultWriter.prepare`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

from raybary.runner.options import ExecOptions, GridOptions, SolverOptions, recorded_options
from raybary.storage._fs import redact_url
from raybary.storage.errors import InputChangedError

__all__ = ["run", "RunReport", "JobIncomplete"]

log = logging.getLogger(__name__)


class JobIncomplete(RuntimeError):
    """The job stopped with shards that could not be committed."""


@dataclass
class RunReport:
    """What :func:`run` did (also stored as the manifest's ``summary``)."""

    input: str
    output: str
    n_problems: int
    n_shards: int
    shard_size: int
    shards_skipped: int = 0  # committed by an earlier run
    shards_run: int = 0  # committed by this run
    shards_given_up: int = 0  # committed as failed after max_attempts lost attempts
    shards_lost: list[int] = field(default_factory=list)  # not committed
    retries: int = 0  # lost attempts that were re-queued
    requeued_unstarted: int = 0  # queued on an actor that died before starting them
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
    shards_by_node: dict = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # messages of lost attempts (first 20)
    complete: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ progress
class _Progress:
    """One status line on stderr: problems done, problems/s, ETA, failures."""

    def __init__(self, total: int, done: int, stream: TextIO | None, interval: float = 1.0):
        self.total, self.done0, self.done = total, done, done
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else 10.0
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.shown = -1
        self.failed = self.invalid = self.retries = 0

    def update(self, n: int = 0, *, failed: int = 0, invalid: int = 0, retries: int = 0,
               force: bool = False) -> None:
        self.done += n
        self.failed += failed
        self.invalid += invalid
        self.retries += retries
        now = time.perf_counter()
        if self.stream is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        self.shown = self.done
        self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
        self.stream.flush()

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        rate = (self.done - self.done0) / el if el > 0 else 0.0
        left = self.total - self.done
        eta = _hms(left / rate) if rate > 0 else "--:--"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = f", {self.retries} retried" if self.retries else ""
        return (f"[raybary] {self.done}/{self.total} problems ({pct:5.1f}%) | "
                f"{rate:7.1f} problems/s | ETA {eta} | failed {self.failed}, "
                f"invalid {self.invalid}{extra}   ")

    def close(self) -> None:
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


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


# ------------------------------------------------------------------ Ray
def _connect(exe: ExecOptions, token=None) -> bool:
    """Start or join Ray; return whether this call started it (and must stop it).
    ``token`` (from :func:`_token_for_cluster`) only names the token in a failure."""
    import ray

    if ray.is_initialized():
        return False
    if exe.address:
        try:
            ray.init(address=exe.address, logging_level=logging.WARNING)
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            if not any(k in text for k in ("InvalidAuthToken", "UNAUTHENTICATED",
                                           "uthentication", "Failed to connect")):
                raise
            where = (f"the token from {token.source} was sent; is it this cluster's?"
                     if token is not None else
                     "no token was found (raybary looks in $RAY_AUTH_TOKEN, "
                     "$RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token)")
            raise ConnectionError(
                f"could not join the Ray cluster at {exe.address}. Is it up and reachable? "
                "If it uses token authentication (the default of `ray start --head` since "
                f"Ray 2.59): {where}") from None
    else:
        # address="local": always a fresh, private Ray, never one found via
        # RAY_ADDRESS or /tmp/ray (that is what --address auto is for).
        # worker_niceness 0: Ray starts workers at nice 15 by default, which on a
        # busy laptop hands the solver's CPU to anything else running.
        ray.init(address="local", num_cpus=exe.local_cpus(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False,
                 _system_config={"worker_niceness": 0})
    return True


def _token_for_cluster():
    """Resolve the Ray auth token as ``raybary submit`` does and, when there is
    one and ``RAY_AUTH_MODE`` is unset, turn on Ray's token mode for this
    process (Ray sends a token only in that mode). Returns the token or None."""
    import os

    from raybary.jobs.auth import TokenError, resolve_token

    try:
        token = resolve_token()
    except TokenError as e:
        raise ConnectionError(str(e)) from None
    if token is not None and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", token.value)
    return token


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
        stream: TextIO | None = sys.stderr,
        on_shard: Callable[[dict], None] | None = None) -> RunReport:
    """Solve every problem of ``input_url`` into ``output_url``; return a :class:`RunReport`.

    Starts an embedded local Ray unless Ray is already initialised in this
    process or ``exe.address`` is set. Raises
    :class:`~raybary.storage.ResultsConflictError` if ``output_url`` holds
    results of other options (unless ``exe.overwrite``) and
    :class:`JobIncomplete` if some shards could not be committed (the
    manifest is written either way; a re-run finishes the job).
    ``on_shard(summary)`` is called on the driver after each committed shard
    (the summary has the shard, counts, timings, ``pid`` and ``node``).
    """
    from raybary.storage import ResultWriter, open_store

    solver = (solver or SolverOptions()).resolved()
    grid = grid or GridOptions()
    exe = exe or ExecOptions()
    # before Ray is imported: it reads RAY_AUTH_MODE once
    token = _token_for_cluster() if exe.address else None
    if not exe.progress:
        stream = None
    t0 = time.perf_counter()
    store = open_store(input_url)  # metadata only
    ids = store.problem_ids()
    shard_ids = [(ids[a], ids[b - 1]) for a, b in store.shards(exe.shard_size) if b > a]
    writer = ResultWriter(output_url, n_problems=store.n_problems, shard_size=exe.shard_size,
                          grid_shape=grid.shape, input_grid_gmms=grid.input_gmms,
                          options=recorded_options(solver, grid), input_url=store.url,
                          input_fingerprint=store.fingerprint(), input_shards=shard_ids)
    writer.acquire_lease()  # one run per OUTPUT
    keeper = _LeaseKeeper(writer)
    try:
        return _run_leased(writer, store, solver, grid, exe, stream, on_shard, t0, token)
    finally:
        keeper.stop()
        writer.release_lease()


def _run_leased(writer, store, solver: SolverOptions, grid: GridOptions, exe: ExecOptions,
                stream, on_shard, t0: float, token=None) -> RunReport:
    import ray

    from raybary.runner.actor import make_actor

    committed = writer.prepare(overwrite=exe.overwrite)
    report = RunReport(input=redact_url(store.url), output=redact_url(writer.url),
                       n_problems=store.n_problems,
                       n_shards=writer.n_shards, shard_size=writer.shard_size,
                       shards_skipped=len(committed))
    todo: collections.deque[tuple[int, str]] = collections.deque(
        (i, "solve") for i in range(writer.n_shards) if i not in committed)
    done_before = sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in committed)
    progress = _Progress(store.n_problems, done_before, stream)
    if stream is not None and committed:
        stream.write(f"[raybary] resuming: {len(committed)} of {writer.n_shards} shards "
                     f"({done_before} problems) already committed in {writer.url}\n")
    if stream is not None and writer.retried_gave_up:
        stream.write(f"[raybary] solving again {len(writer.retried_gave_up)} shards that gave up "
                     f"last time (shards {writer.retried_gave_up[:10]})\n")

    started = False
    slots: list[dict] = []
    try:
        if todo:
            started = _connect(exe, token)
            n_actors = min(exe.actors or _default_actors(exe), len(todo))
            report.actors = n_actors

            def new_actor():
                return make_actor(exe, store.url, writer, solver, grid)

            slots = [_slot(new_actor(), 0) for _ in range(n_actors)]
            _schedule(slots, todo, new_actor, exe, report, progress, t0, on_shard)
    except (JobIncomplete, InputChangedError) as e:
        stopped = e
    else:
        stopped = None
    finally:
        for s in slots:
            try:
                ray.kill(s["actor"], no_restart=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
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
    report.driver_peak_rss_mb = _peak_rss_mb()
    report.errors = report.errors[:20]
    manifest = writer.finalize(report.to_dict())
    report.counts = manifest["counts"]
    report.complete = bool(manifest["complete"])
    report.shards_lost = list(manifest["missing_shards"])


RETRY_BACKOFF_S = 1.0  # first wait before a shard whose task raised is tried again
FAULT_ATTEMPTS = 6  # attempts at a shard whose task raises (waits 1+2+4+8+16 s in all)
STUCK_AFTER_S = 60.0  # the run stops on failures in a row only after this long without success


class _LeaseKeeper:
    """Refreshes the run's lease on OUTPUT from a daemon thread."""

    def __init__(self, writer) -> None:
        import threading

        from raybary.storage.results import LEASE_HEARTBEAT_S

        self.writer, self.period = writer, LEASE_HEARTBEAT_S
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raybary-lease", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.period):
            try:
                if not self.writer.heartbeat():
                    log.error("another run has taken over %s; this run's commits may be "
                              "overwritten", self.writer.url)
                    return
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried
                log.warning("could not refresh the lease on %s: %s", self.writer.url, e)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _slot(actor, gen: int) -> dict:
    """An actor slot; ``ready`` is the pending ``info()`` call until the actor
    runs (it gets shards only then), ``None`` after."""
    return {"actor": actor, "gen": gen, "ready": actor.info.remote(), "since": time.monotonic(),
            "warned": False}


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


def _schedule(slots, todo, new_actor, exe: ExecOptions, report: RunReport,
              progress: _Progress, t0: float, on_shard) -> None:
    """Keep ``exe.in_flight`` shards queued on each running actor until ``todo`` is empty.

    An actor gets shards only once it runs (its ``info()`` call returned), so
    shards never wait on an actor that cannot be placed. While none runs for
    ``exe.placement_timeout()`` seconds, the run fails naming what the actors
    ask for and what the cluster has; actors that stay unplaced while others
    run are reported once and get no work.
    """
    import ray
    from ray.exceptions import RayActorError

    inflight: dict = {}  # ref -> (slot index, generation, shard, kind, submission number)
    counter = itertools.count()
    attempts: collections.Counter = collections.Counter()  # lost solve attempts per shard
    give_up: collections.Counter = collections.Counter()  # lost attempts to commit it as failed
    stuck = 0  # failures since the last success
    max_stuck = max(10, 3 * len(slots) + exe.max_attempts)
    last_success = time.monotonic()
    fault_attempts = max(exe.max_attempts, FAULT_ATTEMPTS)
    timeout = exe.placement_timeout()
    none_running_since = time.monotonic()

    def replace(k: int) -> None:
        try:
            ray.kill(slots[k]["actor"], no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        slots[k] = _slot(new_actor(), slots[k]["gen"] + 1)
        report.actor_replacements += 1

    def check_placement() -> None:
        nonlocal none_running_since, stuck
        pending = {s["ready"]: k for k, s in enumerate(slots) if s["ready"] is not None}
        if pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in done:
                k = pending[ref]
                try:
                    ray.get(ref)
                    slots[k]["ready"] = None
                except RayActorError as e:  # its constructor failed, or its node died
                    stuck += 1
                    report.errors.append(f"actor could not start ({str(e).splitlines()[0][:200]})")
                    if stuck > max_stuck:
                        raise JobIncomplete("actors keep failing to start; last errors:\n  "
                                            + "\n  ".join(report.errors[-5:])) from None
                    replace(k)
        now = time.monotonic()
        if any(s["ready"] is None for s in slots):
            none_running_since = now
            for s in slots:
                if s["ready"] is not None and not s["warned"] and now - s["since"] > timeout:
                    s["warned"] = True
                    log.warning("an actor (%s) could not be placed in %.0f s; going on without it",
                                exe.actor_request(), now - s["since"])
        elif now - none_running_since > timeout:
            raise JobIncomplete(_placement_message(exe, now - none_running_since, len(slots)))

    def submit(k: int) -> None:
        shard, kind = todo.popleft()
        actor = slots[k]["actor"]
        if kind == "solve":
            ref = actor.run_shard.remote(shard)
        else:
            ref = actor.fail_shard.remote(shard, kind[len("fail:"):])
        inflight[ref] = (k, slots[k]["gen"], shard, kind, next(counter))

    delayed: list[tuple[float, int, str]] = []  # (due time, shard, kind): retries backing off

    def again(shard: int, kind: str, backoff: bool) -> None:
        if backoff:  # a fault that may pass (storage, memory): wait 1, 2, 4, ... 30 s
            n = attempts[shard] + give_up[shard]
            delayed.append((time.monotonic() + min(RETRY_BACKOFF_S * 2 ** (n - 1), 30.0),
                            shard, kind))
        else:
            todo.append((shard, kind))

    def lost(shard: int, kind: str, why: str, backoff: bool = False) -> None:
        report.errors.append(f"shard {shard}: {why}")
        if kind != "solve":  # committing it as failed did not work either
            give_up[shard] += 1
            if give_up[shard] < (fault_attempts if backoff else exe.max_attempts):
                again(shard, kind, backoff)
            else:
                log.error("shard %d could not be committed: %s", shard, why)
            return
        attempts[shard] += 1
        if attempts[shard] < (fault_attempts if backoff else exe.max_attempts):
            again(shard, "solve", backoff)
            report.retries += 1
            progress.update(retries=1)
        else:
            msg = (f"not solved: {attempts[shard]} attempts at this shard were lost "
                   f"(last: {why[:300]})")
            todo.append((shard, "fail:" + msg))

    while todo or inflight or delayed:
        now = time.monotonic()
        todo.extend((shard, kind) for due, shard, kind in delayed if due <= now)
        delayed[:] = [d for d in delayed if d[0] > now]
        check_placement()
        for k in range(len(slots)):
            if slots[k]["ready"] is not None:
                continue
            while todo and sum(1 for v in inflight.values() if v[0] == k) < exe.in_flight:
                submit(k)
        waiting = list(inflight) + [s["ready"] for s in slots if s["ready"] is not None]
        if not waiting:
            time.sleep(0.05)  # only backed-off retries left
            continue
        ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
        ready = [r for r in ready if r in inflight]
        progress.update()
        for ref in ready:
            if ref not in inflight:  # dropped when its actor was replaced
                continue
            k, gen, shard, kind, seq = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as e:
                stuck += 1
                why = f"actor died ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                # An actor runs its tasks one at a time in submission order, so of
                # the shards it still had, the first submitted was the one running:
                # that attempt counts; the others never started and go back first.
                dead = [(seq, shard, kind)]
                for r2, (k2, g2, s2, kind2, seq2) in list(inflight.items()):
                    if k2 == k and g2 == gen:
                        del inflight[r2]
                        try:  # finished before the actor died?
                            if ray.wait([r2], timeout=0)[0]:
                                out2 = ray.get(r2)
                                _record(out2, report, progress, t0)
                                if on_shard is not None:
                                    on_shard(out2)
                                continue
                        except Exception:  # noqa: BLE001 - lost with the actor
                            pass
                        dead.append((seq2, s2, kind2))
                dead.sort()
                lost(dead[0][1], dead[0][2], why)
                for _, s2, kind2 in reversed(dead[1:]):
                    todo.appendleft((s2, kind2))
                if slots[k]["gen"] == gen:  # replace the actor
                    replace(k)
                    report.requeued_unstarted += len(dead) - 1
            except InputChangedError as e:  # no retry: every shard would mix two inputs
                raise InputChangedError(_cause_message(e)) from None
            except Exception as e:  # noqa: BLE001 - the task raised: retry, then give up
                stuck += 1
                lost(shard, kind, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}",
                     backoff=True)
            else:
                stuck = 0
                last_success = time.monotonic()
                _record(out, report, progress, t0)
                if on_shard is not None:
                    on_shard(out)
            if stuck > max_stuck and time.monotonic() - last_success > STUCK_AFTER_S:
                raise JobIncomplete(
                    f"{stuck} shard attempts in a row failed; giving up. Last errors:\n  "
                    + "\n  ".join(report.errors[-5:]))


def _cause_message(e: Exception) -> str:
    """The message of the exception a Ray task raised, without Ray's traceback."""
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).strip()


def _record(out: dict, report: RunReport, progress: _Progress, t0: float) -> None:
    n = out["stop"] - out["start"]
    c = out["counts"]
    report.shards_run += 1
    report.shards_given_up += int(bool(out.get("gave_up")))
    report.problems_run += n
    for s in ("ok", "invalid", "failed"):
        report.counts_run[s] += int(c.get(s, 0))
    for key in report.step_seconds:
        report.step_seconds[key] += float(out.get(key, 0.0))
    if report.time_to_first_shard_s is None:
        report.time_to_first_shard_s = time.perf_counter() - t0
    report.actor_peak_rss_mb = max(report.actor_peak_rss_mb, float(out.get("peak_rss_mb", 0.0)))
    node = out.get("node", "?")
    report.shards_by_node[node] = report.shards_by_node.get(node, 0) + 1
    if out.get("pid") not in report.pids:
        report.pids.append(out.get("pid"))
    progress.update(n, failed=int(c.get("failed", 0)), invalid=int(c.get("invalid", 0)),
                    force=True)
