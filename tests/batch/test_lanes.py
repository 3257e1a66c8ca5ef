"""Continuous batching (raybary.batch.engine): a lane of slots refilled from a
queue gives the one-shot batch's results row by row; the lane's width rule,
the tail's rent-or-buy shrink rule and the engines' separate bookkeeping.

One padded batch (100 tutorial problems in the tutorial's bucket, 128 rows,
float32 and the float32 defaults, as raybary.solve pads them), so the lane's
programs are the ones raybary.solve runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raybary.batch import engine as eng
from raybary.batch.padding import Bucket, pad_problems
from raybary.solvers import barycenter as bc
from raybary.storage.generate import tutorial_problems

COUNT, ROWS, SLOTS = 100, 128, 64
CONFIG = bc.SolverConfig.for_dtype("float32")
BUCKET = Bucket(d=2, n=6, J=3, L=12, K=8)


@pytest.fixture(scope="module")
def arrays():
    problems = tutorial_problems(COUNT, seed=3)
    out, _ = pad_problems(problems, [6] * COUNT, BUCKET, ROWS, epsilons=[3e-4] * COUNT,
                          relative_epsilon=True, inits=[None] * COUNT,
                          keys=np.array([[0, i] for i in range(COUNT)], np.uint32),
                          dtype=np.dtype("float32"))
    return out


@pytest.fixture(scope="module")
def one_shot(arrays):
    """The whole batch in one call (every row, filler included)."""
    out = bc.solve_batch(bc.PaddedProblem(**{k: jnp.asarray(v) for k, v in arrays.items()}),
                         CONFIG)
    return {k: np.asarray(v) for k, v in out._asdict().items()}


@pytest.fixture(scope="module")
def lane(arrays):
    """The batch through a fresh engine's lane of 64 slots; the default engine's
    programs before and after."""
    engine = eng.Engine()
    before = set(eng.default_engine().compiled)
    stats = {}
    out = engine.solve_arrays(arrays, CONFIG, "float32", count=COUNT, stats=stats, slots=SLOTS)
    return engine, out, stats, before


def test_a_lane_of_64_slots_equals_the_one_shot_solve_row_by_row(lane, one_shot):
    """Each problem's arithmetic does not depend on its slot, its neighbours or
    when its update runs (the lane updates at most a quarter of its 64 slots
    per block, the one-shot batch a quarter of 128), so every real row agrees.

    float32, because these are the programs raybary.solve runs. Compared
    bitwise: XLA does each row's elementwise arithmetic the same at widths 64
    and 128 (so it is on CPU: every row, every field). A backend whose fusion
    changed with the width could round a row differently and, over a dozen
    outer iterations, move it by more than a few ulps (or its last convergence
    test by one iteration); so 97% of the rows must be identical and the rest
    only reach the same objective (1e-4, far above float32 rounding, far
    below the gaps between the tutorial's local optima)."""
    _, out, _, _ = lane
    assert eng.lane_width(ROWS, COUNT, SLOTS) == SLOTS < ROWS and ROWS > eng.SMALL_BATCH
    assert set(out) == set(one_shot) == set(bc.BarycenterOutput._fields)
    real = slice(0, COUNT)
    identical = np.ones(COUNT, bool)
    for name, a in out.items():
        b = one_shot[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        identical &= np.all((a[real] == b[real]).reshape(COUNT, -1), axis=1)
    assert np.mean(identical) >= 0.97, np.flatnonzero(~identical)
    np.testing.assert_allclose(out["objective"][real], one_shot["objective"][real], rtol=1e-4)
    assert out["weights"].dtype == np.float32
    assert np.mean(out["converged"][real]) > 0.9 and np.all(out["iterations"][real] >= 1)
    # Filler rows are not solved: returned as initialised (the one-shot solves them).
    assert np.all(out["iterations"][COUNT:] == 0) and not np.any(out["converged"][COUNT:])
    assert np.all(one_shot["iterations"][COUNT:] >= 1)


class RecordingQueue(eng._Queue):
    """The lane's queue, recording what leaves the lane at each call's end."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[tuple[int, int, list[int]]] = []  # (width, slot blocks, rows)

    def store(self, rows, state, slots, blocks):
        self.calls.append((state.done.shape[0], blocks, rows.tolist()))
        super().store(rows, state, slots, blocks)


def test_rows_leave_the_lane_once_and_slot_blocks_count_the_work(arrays, lane):
    """Engine.lane directly (as solve_arrays runs it): every real row leaves
    exactly once, done; the filler rows never enter; ``slot_blocks`` covers
    every block each row spent in a slot (``state.blocks`` counts them, done
    or not, from its initial 0) and is at most the calls' widths times the
    blocks each call may run."""
    engine, out, stats, _ = lane
    with jax.enable_x64(False):
        problems = bc.PaddedProblem(**{k: np.asarray(v) for k, v in arrays.items()})
        initial = jax.tree_util.tree_map(
            np.array, bc.init_batch(jax.tree_util.tree_map(jnp.asarray, problems), CONFIG))
        queue = RecordingQueue(initial, jax.tree_util.tree_map(np.copy, initial), problems, COUNT)
        engine.lane(queue, CONFIG, SLOTS)
    left = [r for _, _, rows in queue.calls for r in rows]
    assert sorted(left) == list(range(COUNT))
    final = queue.final
    assert np.all(final.done[:COUNT]) and not np.any(final.done[COUNT:])
    np.testing.assert_array_equal(final.iteration[:COUNT], out["iterations"][:COUNT])
    assert queue.slot_blocks == sum(blocks for _, blocks, _ in queue.calls)
    assert queue.slot_blocks == stats["slot_blocks"]
    assert np.sum(final.blocks[:COUNT]) <= queue.slot_blocks
    assert np.all(final.blocks[:COUNT] >= 1)
    for width, blocks, _ in queue.calls:
        assert width in (SLOTS, SLOTS // 8) and blocks % width == 0
        assert 1 <= blocks // width <= eng.REFILL_BLOCKS * eng.TAIL_CALL_SLOTS // width
    assert queue.slot_blocks <= sum(w * eng.REFILL_BLOCKS * max(1, eng.TAIL_CALL_SLOTS // w)
                                    for w, _, _ in queue.calls)
    # Refilling pays: fewer slot blocks than 128 rows run to the slowest one's end.
    assert queue.slot_blocks < ROWS * int(np.max(final.blocks[:COUNT]))


@pytest.mark.parametrize("size, rows, slots, width", [
    (128, 100, 64, 64),  # the lane above
    (128, 100, 32, 32),  # never wider than the slots
    (512, 300, 1024, eng.NARROW_LANE),  # a small bucket: narrow lane
    (512, 511, 1024, eng.NARROW_LANE),
    (1024, 512, 1024, 1024),  # from NARROW_BELOW rows on: as wide as allowed
    (4096, 4096, 1024, 1024),
    (2048, 600, 4096, 2048),  # never wider than the batch
    (64, 10, 1024, 64),
    (32, 30, 1024, 32),
])
def test_lane_width(size, rows, slots, width):
    assert eng.lane_width(size, rows, slots) == width


def test_lane_width_rule():
    """Small buckets get lanes of at least NARROW_LANE (within size and slots)
    and at most about a quarter of their rows beyond that; large ones
    min(size, slots)."""
    for size in (64, 128, 256, 512, 1024, 4096):
        for slots in (64, 256, 1024):
            for rows in range(1, size + 1, 7):
                w = eng.lane_width(size, rows, slots)
                assert w <= min(size, slots)
                if rows >= eng.NARROW_BELOW:
                    assert w == min(size, slots)
                else:
                    assert w >= min(size, slots, eng.NARROW_LANE)
                    assert w <= max(eng.NARROW_LANE, rows // 4 + 1)
                    assert w & (w - 1) == 0  # a power of two: few compiles


def test_shrink_rent_or_buy(arrays):
    """A tail moves at once to a batch of at least EAGER_WIDTH, or to one this
    engine has already compiled; else only once tails at its program have taken
    SHRINK_AFTER_S in all."""
    problems = bc.PaddedProblem(**arrays)
    engine = eng.Engine(compilation_cache=False)
    key, wide = eng.program_key(problems, 1024, CONFIG), eng.program_key(problems, 128, CONFIG)
    narrow = eng.program_key(problems, 16, CONFIG)
    assert eng.EAGER_WIDTH == 128
    assert engine._shrink(key, wide, 128)  # eager, not compiled, no tail time
    assert not engine._shrink(wide, narrow, 16)
    engine.tail_seconds[key] = 10 * eng.SHRINK_AFTER_S  # time at another program
    assert not engine._shrink(wide, narrow, 16)
    engine.tail_seconds[wide] = 0.9 * eng.SHRINK_AFTER_S
    assert not engine._shrink(wide, narrow, 16)
    engine.tail_seconds[wide] += 0.1 * eng.SHRINK_AFTER_S
    assert engine._shrink(wide, narrow, 16)
    fresh = eng.Engine(compilation_cache=False)
    fresh.compiled.add(narrow)
    assert fresh._shrink(wide, narrow, 16)  # already compiled: no compile to pay for
    assert not fresh._shrink(wide, eng.program_key(problems, 8, CONFIG), 8)
    # The key is the whole program: another config is another program.
    other = eng.program_key(problems, 16, bc.SolverConfig(max_iterations=5))
    assert not fresh._shrink(wide, other, 16)


def test_engines_keep_their_own_programs(lane):
    engine, _, _, default_before = lane
    assert engine.compiled  # the lane's programs, noted by the engine that ran them
    assert any(isinstance(k, tuple) and k[1] == SLOTS for k in engine.compiled)
    assert eng.Engine().compiled == set() and eng.Engine().tail_seconds == {}
    assert eng.default_engine() is eng.default_engine() is eng.engine_of(None)
    assert eng.default_engine() is not engine and eng.engine_of(engine) is engine
    assert set(eng.default_engine().compiled) == default_before


@pytest.mark.parametrize("backend", ["cpu", "CPU"])
def test_lane_rule_on_a_cpu(backend):
    """The CPU keeps the lanes docs/performance.md measures: 1,024 slots,
    refilled every 4 blocks, tails down to 2 slots, eagerly to 128, initial
    states in one call."""
    rule = eng.lane_rule(backend)
    assert rule == eng.CPU_LANES == eng.LaneRule()
    assert (rule.slots, rule.refill_blocks, rule.tail_call_slots, rule.min_width,
            rule.eager_width, rule.init_width, rule.batch_size) == (
        eng.SLOTS, eng.REFILL_BLOCKS, eng.TAIL_CALL_SLOTS, eng.MIN_WIDTH, eng.EAGER_WIDTH,
        None, eng.BATCH_SIZE) == (1024, 4, 1024, 2, 128, None, 4096)
    from raybary.batch.api import DEFAULT_BATCH_SIZE

    assert DEFAULT_BATCH_SIZE == rule.batch_size
    assert rule.blocks_per_call(1024, waiting=True) == 4
    assert rule.blocks_per_call(128, waiting=False) == 32
    assert rule.blocks_per_call(4096, waiting=False) == 4


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm", "tpu", "GPU"])
def test_lane_rule_on_an_accelerator(backend):
    """A GPU or TPU gets far wider lanes and far fewer calls: 2**16 to 2**18
    slots, more blocks per call than the CPU, tails that stop (and move at
    once) at a width narrower ones would save nothing at, so that one
    size's programs are known in advance, and chunks of 2**20 problems by
    default to refill from; powers of two throughout."""
    rule = eng.lane_rule(backend)
    assert rule == eng.ACCELERATOR_LANES
    assert 1 << 16 <= rule.slots <= 1 << 18
    assert rule.refill_blocks > eng.CPU_LANES.refill_blocks
    assert rule.eager_width == rule.min_width >= 1 << 10
    assert rule.init_width == rule.slots and rule.batch_size == 1 << 20  # raybary.solve's default
    for width in (rule.slots, rule.min_width, rule.tail_call_slots, rule.init_width,
                  rule.batch_size):
        assert width & (width - 1) == 0
    assert rule.blocks_per_call(rule.slots, waiting=True) == rule.refill_blocks
    assert rule.blocks_per_call(rule.min_width, waiting=False) == (
        rule.refill_blocks * rule.tail_call_slots // rule.min_width)
    # the widths a tail of the widest lane runs at: 2**17, 2**14, 2**11
    widths, w = [], rule.slots
    while w >= rule.min_width:
        widths.append(w)
        w //= 8
    assert len(widths) <= 3


def test_engine_resolves_its_lanes():
    """Engine(): the backend's rule, resolved at first use (this machine has
    a CPU); slots= replaces the rule's slots; lanes= gives one outright."""
    assert jax.default_backend() == "cpu"
    assert eng.Engine().lanes == eng.CPU_LANES and eng.Engine().slots == 1024
    assert eng.Engine(slots=256).lanes == eng.LaneRule(slots=256)
    gpu = eng.Engine(lanes=eng.ACCELERATOR_LANES)
    assert gpu.lanes is eng.ACCELERATOR_LANES and gpu.slots == 1 << 17
    assert eng.Engine(lanes=eng.ACCELERATOR_LANES, slots=64).slots == 64


def test_an_accelerator_shaped_rule_gives_the_one_shot_results(arrays, one_shot):
    """The accelerator's rule, shrunk to this batch (64 slots, 8 blocks per
    call, initial states 64 rows at a time, no narrower lanes), runs the
    same arithmetic: every real row as the one-shot batch (as in the first
    test); the counters agree with the rule."""
    from dataclasses import replace

    rule = replace(eng.ACCELERATOR_LANES, slots=SLOTS, refill_blocks=8, tail_call_slots=SLOTS,
                   min_width=SLOTS, eager_width=SLOTS, init_width=SLOTS)
    stats = {}
    out = eng.Engine(lanes=rule).solve_arrays(arrays, CONFIG, "float32", count=COUNT,
                                              stats=stats)
    identical = np.ones(COUNT, bool)
    for name, a in out.items():
        identical &= np.all((a[:COUNT] == one_shot[name][:COUNT]).reshape(COUNT, -1), axis=1)
    assert np.mean(identical) >= 0.97, np.flatnonzero(~identical)
    np.testing.assert_allclose(out["objective"][:COUNT], one_shot["objective"][:COUNT], rtol=1e-4)
    assert np.all(out["iterations"][COUNT:] == 0)
    assert 1 <= stats["calls"] <= stats["blocks"] <= 8 * stats["calls"]
    assert stats["slot_blocks"] == SLOTS * stats["blocks"]  # one width throughout
    assert stats["run_seconds"] > 0


# ------------------------------------------------------------------ lanes in threads
def test_lane_count_rule():
    engine = eng.Engine(workers=4)
    assert engine.workers == 4
    assert engine.lane_count(1000, 2) == 4              # up to the workers ...
    assert engine.lane_count(130, 5) == 2               # ... each of at least NARROW_LANE rows
    assert engine.lane_count(100, 2) == 1
    assert engine.lane_count(10_000, 9) == 1             # LAPACK's eigh above d = 8: one lane
    assert eng.Engine(workers=1).lane_count(10_000, 2) == 1
    with pytest.raises(ValueError, match="workers must be at least 1"):
        eng.Engine(workers=0)


def test_cpu_workers_follow_what_the_process_is_given(monkeypatch):
    monkeypatch.setenv("RAYBARY_SOLVER_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert eng.cpu_workers() == 3
    monkeypatch.delenv("RAYBARY_SOLVER_THREADS")
    assert eng.cpu_workers() == 5                        # what Ray sets for an actor's CPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    assert eng.cpu_workers() >= 1


class ThreadRecordingEngine(eng.Engine):
    """An engine recording the threads its lanes ran in."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads: set[str] = set()

    def lane(self, *args, **kw):
        import threading

        self.threads.add(threading.current_thread().name)
        return super().lane(*args, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_two_lanes_in_threads_give_the_one_lane_results(arrays, dtype):
    """Two lanes share the queue, each in a thread of its own: every row leaves
    once, and each problem's arithmetic is what one lane does (float64: each
    thread enters JAX's x64 mode, which is per thread)."""
    with jax.enable_x64(dtype == "float64"):
        cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        config = bc.SolverConfig.for_dtype(dtype)
        stats1, stats2 = {}, {}
        one = eng.Engine(workers=1).solve_arrays(cast, config, dtype, stats=stats1, slots=SLOTS)
        two_engine = ThreadRecordingEngine(workers=2)
        assert two_engine.lane_count(ROWS, 2) == 2
        two = two_engine.solve_arrays(cast, config, dtype, stats=stats2, slots=SLOTS)
    assert two["objective"].dtype == np.dtype(dtype)
    assert np.all(two["iterations"] >= 1)                 # every row solved once
    np.testing.assert_allclose(two["objective"], one["objective"], rtol=1e-4)
    # the same barycenters, to far below the gaps between local optima (a row
    # rounded differently at another width may stop an iteration apart)
    scale = np.abs(one["means"]).max()
    np.testing.assert_allclose(two["means"], one["means"], rtol=1e-4, atol=1e-4 * scale)
    assert len(two_engine.threads) == 2 and all(t.startswith("raybary-lane")
                                                   for t in two_engine.threads)


def test_lane_xla_flags_and_the_actors_environment(monkeypatch):
    from raybary.runner.actor import actor_env
    from raybary.runner.options import ExecOptions

    assert eng.lane_xla_flags("") == "--xla_cpu_multi_thread_eigen=false"
    assert eng.lane_xla_flags("--a=1") == "--a=1 --xla_cpu_multi_thread_eigen=false"
    kept = "--xla_cpu_multi_thread_eigen=true"
    assert eng.lane_xla_flags(kept) == kept  # the user's say stands
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    env = actor_env(ExecOptions(cpus_per_actor=2))
    assert env["RAYBARY_SOLVER_THREADS"] == env["OMP_NUM_THREADS"] == "2"
    assert env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert actor_env(ExecOptions(cpus_per_actor=0.5))["RAYBARY_SOLVER_THREADS"] == "1"
    gpu = actor_env(ExecOptions(gpus_per_actor=1))
    assert "RAYBARY_SOLVER_THREADS" not in gpu and "JAX_PLATFORMS" not in gpu
    assert actor_env(ExecOptions(actor_env={"RAYBARY_SOLVER_THREADS": "4"}))[
        "RAYBARY_SOLVER_THREADS"] == "4"
