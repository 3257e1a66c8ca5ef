"""The driver's bookkeeping types (raybary/runner/pool.py): shard tasks as pure
data, and the actor pool's verbs on tiny real Ray actors (the session's local
Ray, ``ray_local``; the actors ask for no CPU)."""

from __future__ import annotations

import os
import time

import pytest

from raybary.runner.pool import ActorPool, ShardTask, TaskKind, finished_result


# ------------------------------------------------------------------ tasks: pure data
def test_shard_task_counts_tries_of_its_kind_and_of_the_shard():
    t = ShardTask(7)
    assert (t.kind, t.attempt, t.lost_before, t.message) == (TaskKind.SOLVE, 1, 0, "")
    t3 = t.retry().retry()
    assert (t3.shard, t3.kind, t3.attempt, t3.lost_before) == (7, TaskKind.SOLVE, 3, 2)
    fail = t3.give_up("not solved: 3 attempts")
    assert (fail.kind, fail.attempt, fail.lost_before, fail.message) == \
        (TaskKind.FAIL, 1, 3, "not solved: 3 attempts")
    again = fail.retry()  # a lost give-up commit: same message, one more lost try at the shard
    assert (again.kind, again.attempt, again.lost_before, again.message) == \
        (TaskKind.FAIL, 2, 4, "not solved: 3 attempts")
    assert t == ShardTask(7) and t.retry() != t  # values, frozen


# ------------------------------------------------------------------ pool: real actors
def _tiny_class():
    """Stands in for ShardWorker: the same method names, trivial work. Defined in a
    function so that Ray ships it by value (workers cannot import this test module)."""

    class Tiny:
        def __init__(self, fail: bool = False) -> None:
            if fail:
                raise RuntimeError("constructor failed")

        def info(self) -> int:
            return os.getpid()

        def run_shard(self, shard: int) -> tuple:
            time.sleep(0.05)
            if shard < 0:
                raise ValueError("negative shard")
            return ("solve", shard, os.getpid())

        def fail_shard(self, shard: int, message: str) -> tuple:
            return ("fail", shard, message)

    return Tiny


@pytest.fixture
def tiny(ray_local):
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_tiny_class())


#: How long a test waits for a state of Ray's (an actor up, a task done, an actor
#: dead) before it fails: generous, since a busy machine slows every step down.
DEADLINE_S = 300.0


def _until_running(pool: ActorPool, n: int, *, fail: bool = False,
                   timeout: float = DEADLINE_S) -> list:
    """Poll the pool until ``n`` actors run (or, with ``fail``, until one fails to
    start); return the (slot, error) of the failed starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = pool.poll_started()
        if failed:
            assert fail, failed[0][1]
            return failed
        if len(pool.running()) >= n and not fail:
            return []
        pool.wait(timeout=0.5)
    raise AssertionError(f"{len(pool.running())} of {n} actors running after {timeout} s")


def _drain(pool: ActorPool) -> dict:
    import ray

    out = {}
    deadline = time.monotonic() + DEADLINE_S
    while pool.in_flight() and time.monotonic() < deadline:
        for ref in pool.wait(timeout=1.0):
            rec = pool.pop(ref)
            out[rec.task.shard] = (rec, ray.get(ref))
    assert not pool.in_flight(), f"{pool.in_flight()} tasks still running after {DEADLINE_S} s"
    return out


def _until_dead(actor) -> None:
    """Call ``actor`` until a call fails because it is dead; fail the test if it
    still answers after ``DEADLINE_S``. Ray kills an actor asynchronously: a
    call sent just after ``ray.kill`` may still run and answer."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            ray.get(actor.info.remote(), timeout=DEADLINE_S)
        except ActorUnavailableError:
            pass  # unreachable for now, not known to be dead: ask again
        except RayActorError:
            return
        assert time.monotonic() < deadline, f"the actor still answers {DEADLINE_S} s after its kill"
        time.sleep(0.05)


def test_pool_picks_running_actors_with_room_and_counts_tasks(tiny):
    pool = ActorPool(tiny.remote, 2)
    try:
        assert len(pool.slots) == 2 and len(pool.pending()) == 2 and pool.pick(2) is None
        _until_running(pool, 2)
        a, b = pool.slots
        assert pool.pick(2) is a  # the first actor with room, in slot order
        refs = []
        while (slot := pool.pick(2)) is not None:
            refs.append(pool.submit(slot, ShardTask(len(refs))))
        assert len(refs) == 4 and pool.in_flight() == 4
        assert pool.in_flight(a) == pool.in_flight(b) == 2
        pool.submit(b, ShardTask(9, TaskKind.FAIL, "gave up"))
        done = _drain(pool)
        assert pool.in_flight() == 0 and pool.pop(refs[0]) is None
        assert [done[i][1][:2] for i in range(4)] == [("solve", i) for i in range(4)]
        assert done[9][1] == ("fail", 9, "gave up")
        assert done[0][0].slot is a and done[2][0].slot is b  # a got shards 0, 1; b 2, 3
        assert done[0][0].seq < done[1][0].seq < done[9][0].seq
        assert done[0][1][2] != done[2][1][2]  # two processes
    finally:
        pool.kill_all()


def test_pool_take_replace_remove_and_kill(tiny):
    import ray

    pool = ActorPool(tiny.remote, 1)
    try:
        _until_running(pool, 1)
        (a,) = pool.slots
        refs = [pool.submit(a, ShardTask(i)) for i in range(3)]
        taken = pool.take(a)  # the actor's tasks, in submission order, no longer in flight
        assert [ref for ref, _ in taken] == refs and [r.task.shard for _, r in taken] == [0, 1, 2]
        assert pool.in_flight() == 0 and pool.in_flight(a) == 0
        assert ray.get(refs[0])[:2] == ("solve", 0)
        assert finished_result(refs[0])[:2] == ("solve", 0)

        new = pool.replace(a)
        assert new is not a and pool.slots == [new] and not pool.holds(a) and pool.holds(new)
        assert not new.running  # pending until its info() returns
        _until_dead(a.actor)  # the old actor was killed
        _until_running(pool, 1)

        extra = pool.add()
        assert len(pool.slots) == 2
        pool.remove(extra)
        assert pool.slots == [new] and not pool.holds(extra)
        _until_dead(extra.actor)

        pool.kill_all()
        _until_dead(new.actor)
    finally:
        pool.kill_all()


def test_a_task_that_raised_has_no_finished_result(tiny):
    pool = ActorPool(tiny.remote, 1)
    try:
        _until_running(pool, 1)
        ref = pool.submit(pool.slots[0], ShardTask(-1))
        deadline = time.monotonic() + DEADLINE_S
        while not pool.wait(timeout=1.0):
            assert time.monotonic() < deadline, f"the task did not end in {DEADLINE_S} s"
        assert finished_result(ref) is None
    finally:
        pool.kill_all()


def test_an_actor_that_cannot_start_is_reported(tiny):
    pool = ActorPool(lambda: tiny.remote(fail=True), 1)
    try:
        failed = _until_running(pool, 1, fail=True)
        assert len(failed) == 1
        slot, error = failed[0]
        assert slot is pool.slots[0] and not slot.running
        assert "constructor failed" in str(error)
    finally:
        pool.kill_all()
