"""The driver's bookkeeping as named types: shard tasks, the actor pool, tasks in flight.

* :class:`ShardTask` — what to do with one shard (solve it, or commit its
  problems as failed) and how many tries at that shard were lost before;
* :class:`ActorPool` — the run's actors, one per :class:`Slot`, with the
  verbs the driver needs (add, remove, replace, pick an actor with room,
  submit, in-flight counts, kill), in the spirit of Ray Data's actor pool;
* :class:`TaskRecord` — a task submitted to an actor: which slot, in what
  order, since when.

Ray is imported by the methods that call it, not by this module: the driver
imports this before it sets ``RAY_AUTH_MODE`` (which Ray reads once, on import).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["TaskKind", "ShardTask", "Slot", "TaskRecord", "ActorPool", "finished_result"]

ActorHandle = Any  # ray.actor.ActorHandle of a ShardWorker
ObjectRef = Any  # ray.ObjectRef


class TaskKind(enum.Enum):
    """What a task does with its shard."""

    SOLVE = "solve"  # read, solve, grid and commit it (ShardWorker.run_shard)
    FAIL = "fail"  # commit its valid problems as failed, unsolved (ShardWorker.fail_shard)


@dataclass(frozen=True)
class ShardTask:
    """One try at a shard.

    ``attempt`` counts the tries of this kind (1 = the first); ``lost_before``
    the tries at this shard, of either kind, lost before this one. ``message``
    is what a :attr:`TaskKind.FAIL` task records as the problems' error.
    """

    shard: int
    kind: TaskKind = TaskKind.SOLVE
    message: str = ""
    attempt: int = 1
    lost_before: int = 0

    def submit(self, actor: ActorHandle) -> ObjectRef:
        """Start this task on ``actor``; returns the reference to its
        :class:`~raybary.runner.shard.ShardSummary`."""
        if self.kind is TaskKind.SOLVE:
            return actor.run_shard.remote(self.shard)
        return actor.fail_shard.remote(self.shard, self.message)

    def retry(self) -> ShardTask:
        """The next try of the same kind, once this one is lost."""
        return replace(self, attempt=self.attempt + 1, lost_before=self.lost_before + 1)

    def give_up(self, message: str) -> ShardTask:
        """A task that commits the shard as failed with ``message``, once this one is lost."""
        return ShardTask(self.shard, TaskKind.FAIL, message, attempt=1,
                         lost_before=self.lost_before + 1)


@dataclass(eq=False)
class Slot:
    """A place in the pool and the actor in it. ``ready`` is the pending
    ``info()`` call until the actor runs (it gets tasks only then), ``None``
    after; ``since`` when the actor was started; ``warned`` whether the
    driver said that it could not be placed."""

    actor: ActorHandle
    ready: ObjectRef | None
    since: float = field(default_factory=time.monotonic)
    warned: bool = False

    @property
    def running(self) -> bool:
        return self.ready is None


@dataclass(frozen=True, eq=False)
class TaskRecord:
    """A task in flight: on the actor of ``slot``, submitted ``seq``-th, at ``started``
    (``time.monotonic()``)."""

    task: ShardTask
    slot: Slot
    seq: int
    started: float


def _kill(actor: ActorHandle) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - best effort: it may be dead already
        pass


class ActorPool:
    """The run's actors and the tasks in flight on them.

    ``new_actor()`` starts one actor. An actor is *pending* until its
    ``info()`` call returns (:meth:`poll_started`), then *running*; only
    running actors are picked for tasks, so no task waits on an actor that
    cannot be placed. A replaced actor's slot is a new :class:`Slot`, so the
    records of tasks sent to the old one still name the old one.
    """

    def __init__(self, new_actor: Callable[[], ActorHandle], size: int = 0) -> None:
        self._new_actor = new_actor
        self.slots: list[Slot] = []
        self._tasks: dict[ObjectRef, TaskRecord] = {}
        self._seq = itertools.count()
        for _ in range(size):
            self.add()

    # ------------------------------------------------------------ actors
    def _start(self) -> Slot:
        actor = self._new_actor()
        return Slot(actor, actor.info.remote())

    def add(self) -> Slot:
        """Start one more actor; it is pending until it runs."""
        slot = self._start()
        self.slots.append(slot)
        return slot

    def remove(self, slot: Slot) -> None:
        """Kill ``slot``'s actor and drop the slot (its tasks stay recorded, see :meth:`take`)."""
        self.slots.remove(slot)
        _kill(slot.actor)

    def replace(self, slot: Slot) -> Slot:
        """Kill ``slot``'s actor and start a new one in its place; returns the new slot."""
        i = self.slots.index(slot)
        _kill(slot.actor)  # first: its resources go to the new one
        self.slots[i] = new = self._start()
        return new

    def holds(self, slot: Slot) -> bool:
        """Whether ``slot`` is still in the pool (not removed or replaced)."""
        return any(s is slot for s in self.slots)

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.running]

    def pending(self) -> list[Slot]:
        return [s for s in self.slots if not s.running]

    def poll_started(self) -> list[tuple[Slot, Exception]]:
        """Mark the pending actors whose ``info()`` returned as running; return the
        ``(slot, error)`` of those that failed to start (their constructor raised,
        or their node died). Does not wait."""
        import ray
        from ray.exceptions import RayActorError

        pending = {s.ready: s for s in self.pending()}
        if not pending:
            return []
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        failed = []
        for ref in done:
            slot = pending[ref]
            try:
                ray.get(ref)
            except RayActorError as e:
                failed.append((slot, e))
            else:
                slot.ready = None
        return failed

    def kill_all(self) -> None:
        """Kill every actor of the pool (the tasks' records are kept)."""
        for slot in self.slots:
            _kill(slot.actor)

    # ------------------------------------------------------------ tasks
    def in_flight(self, slot: Slot | None = None) -> int:
        """Tasks in flight on ``slot``'s actor, or on all actors."""
        if slot is None:
            return len(self._tasks)
        return sum(1 for rec in self._tasks.values() if rec.slot is slot)

    def pick(self, limit: int) -> Slot | None:
        """The first running actor with fewer than ``limit`` tasks in flight, if any."""
        return next((s for s in self.running() if self.in_flight(s) < limit), None)

    def submit(self, slot: Slot, task: ShardTask) -> ObjectRef:
        """Start ``task`` on ``slot``'s actor and record it."""
        ref = task.submit(slot.actor)
        self._tasks[ref] = TaskRecord(task, slot, next(self._seq), time.monotonic())
        return ref

    def pop(self, ref: ObjectRef) -> TaskRecord | None:
        """The record of the task behind ``ref``, no longer in flight; ``None`` if it
        was not (e.g. taken with its actor's other tasks by :meth:`take`)."""
        return self._tasks.pop(ref, None)

    def take(self, slot: Slot) -> list[tuple[ObjectRef, TaskRecord]]:
        """Every task in flight on ``slot``'s actor, in submission order, no longer in flight."""
        mine = sorted(((ref, rec) for ref, rec in self._tasks.items() if rec.slot is slot),
                      key=lambda item: item[1].seq)
        for ref, _ in mine:
            del self._tasks[ref]
        return mine

    def wait(self, timeout: float) -> list[ObjectRef]:
        """Wait up to ``timeout`` seconds until a task finishes or a pending actor
        starts; return the finished tasks' references (still in flight until :meth:`pop`)."""
        import ray

        refs = list(self._tasks) + [s.ready for s in self.pending()]
        if not refs:  # nothing to wait on (only backed-off retries left)
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return [r for r in ready if r in self._tasks]


def finished_result(ref: ObjectRef) -> Any | None:
    """The value of a task that already finished successfully, else ``None`` (still
    running, or it raised). Does not wait."""
    import ray

    try:
        if ray.wait([ref], timeout=0)[0]:
            return ray.get(ref)
    except Exception:  # noqa: BLE001 - lost with its actor
        pass
    return None
