"""The solver's process state, owned by one object: :class:`Engine`.

An engine runs padded batches through the jitted solver by continuous
batching and remembers, for the process it lives in, what makes later calls
cheap: which programs it has compiled, how long tails have spent at each
program (the rent-or-buy rule of :meth:`Engine._shrink`), and JAX's
persistent compilation cache. :func:`default_engine` is the one
:func:`raybary.solve` uses unless given another; a caller that wants its own
bookkeeping (a test, a benchmark, a library embedding raybary) makes its own.

What an engine does to JAX's global configuration, once, on its first solve
(:meth:`Engine.setup`): unless JAX already has a compilation cache directory,
it sets one (``RAYBARY_JAX_CACHE``, default ``~/.cache/raybary/jax``) and
caches programs that took at least 0.1 s to compile (the grids' too), so that a later process
loads them instead of compiling (``Engine(compilation_cache=False)`` or
``RAYBARY_JAX_CACHE=off``: not); and, if JAX's backends have not started yet,
it turns XLA's intra-op CPU threading off in ``XLA_FLAGS`` (the engine runs a
lane per core instead; ``Engine(xla_flags=False)`` or
``RAYBARY_XLA_FLAGS=off``: not).

How wide its lanes are and how often it refills them is a :class:`LaneRule`
chosen by JAX's backend (:func:`lane_rule`): on a CPU, 1,024 slots refilled
every 4 loop blocks; on an accelerator (GPU, TPU), far wider lanes and far
fewer calls, since there each call is a host round trip and each loop block
costs about the same from a few thousand slots up.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from raybary.batch.padding import next_pow2
from raybary.batch.programs import Programs

__all__ = ["Engine", "LaneRule", "default_engine", "lane_rule", "cpu_workers", "lane_xla_flags",
           "CPU_LANES",
           "ACCELERATOR_LANES", "SLOTS", "SMALL_BATCH"]

SMALL_BATCH = 64  # batches at most this big are solved in one call
# The CPU's lanes (CPU_LANES below):
SLOTS = 1024  # slots of the working batch (problems solved at once)
REFILL_BLOCKS = 4  # loop blocks per call between two refills
MIN_WIDTH = 2  # the narrowest batch a tail moves to
EAGER_WIDTH = 128  # ... at once down to this width; narrower by the rent-or-buy rule
TAIL_CALL_SLOTS = 1024  # with none waiting, a call runs REFILL_BLOCKS * this / width blocks
BATCH_SIZE = 4096  # raybary.solve's default batch_size (problems per compiled call)
SHRINK_AFTER_S = 1.5  # a tail moves to a batch not yet compiled after this long (~1/3 of a compile)
NARROW_BELOW = 512  # a bucket with fewer rows runs in a lane a quarter its size ...
NARROW_LANE = 64  # ... of at least this many slots (lane_width)
MAP_HEADROOM = 20_000  # memory maps kept free for new programs (about 8 solver programs)
OFF = ("off", "0", "false", "none")  # RAYBARY_JAX_CACHE / _XLA_FLAGS / _PROGRAMS: off
CACHE_OFF = (*OFF, "")


@dataclass(frozen=True)
class LaneRule:
    """How an engine runs a batch in lanes (:meth:`Engine.lane`).

    Attributes:
      slots: the widest lane (problems solved at once).
      refill_blocks: loop blocks per call (each of ``config.plan_block`` plan
        iterations) while problems wait: finished slots are refilled between
        calls, and every call is a host round trip that moves the lane's
        state to the host and back.
      tail_call_slots: with none waiting, a call at width ``w`` runs
        ``refill_blocks * max(1, tail_call_slots // w)`` blocks (narrow
        lanes are cheap per block; a call ends anyway when all its problems
        are done).
      min_width: the narrowest lane a tail moves to (widths go down by 8x).
      eager_width: a tail moves at once to a lane at least this wide; to a
        narrower one by the rent-or-buy rule (:meth:`Engine._shrink`).
      init_width: initial states are computed this many rows at a time
        (``None``: the whole batch in one call), so that batches of several
        sizes share one compiled ``init_batch`` and its memory stays bounded.
      batch_size: :func:`raybary.solve`'s default ``batch_size`` (problems
        per compiled call; a lane refills from its call's waiting problems).
    """

    slots: int = SLOTS
    refill_blocks: int = REFILL_BLOCKS
    tail_call_slots: int = TAIL_CALL_SLOTS
    min_width: int = MIN_WIDTH
    eager_width: int = EAGER_WIDTH
    init_width: int | None = None
    batch_size: int = BATCH_SIZE

    def blocks_per_call(self, width: int, waiting: bool) -> int:
        """Loop blocks a call at ``width`` slots runs (with rows ``waiting`` or none)."""
        return self.refill_blocks * (1 if waiting else max(1, self.tail_call_slots // width))


#: A CPU: each loop block costs about its slots, calls are cheap, so narrow
#: lanes refilled often (docs/performance.md measures these).
CPU_LANES = LaneRule()
#: An accelerator (GPU, TPU): a loop block costs about the same from a few
#: thousand slots up (kernel launches) and each call moves the lane's state
#: (about 3 KB a tutorial problem) over the host link and back: lanes of
#: 2**17 slots (about 0.5 GB of state for tutorial problems), refilled every
#: 16 blocks, tails at no fewer than 2,048 slots (narrower saves nothing per
#: block), reached at once (a deterministic set of programs to compile), and
#: calls of up to 2**20 problems to refill from.
#: Not yet measured on a GPU: ``benchmarks/gpu_check.sh`` measures it.
ACCELERATOR_LANES = LaneRule(slots=1 << 17, refill_blocks=16, tail_call_slots=1 << 17,
                             min_width=1 << 11, eager_width=1 << 11, init_width=1 << 17,
                             batch_size=1 << 20)


def lane_rule(backend: str) -> LaneRule:
    """The :class:`LaneRule` of JAX backend ``backend`` (``jax.default_backend()``):
    :data:`CPU_LANES` for ``"cpu"``, else :data:`ACCELERATOR_LANES`
    (``"gpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``, ...)."""
    return CPU_LANES if backend.lower() == "cpu" else ACCELERATOR_LANES


def _tree_map(fn, *trees):
    import jax

    return jax.tree_util.tree_map(fn, *trees)


def _take(tree, idx):
    return _tree_map(lambda x: x[idx], tree)


def _put(tree, slots: np.ndarray, source, rows: np.ndarray) -> None:
    """``tree[slots] = source[rows]``, leaf by leaf, in place."""
    _tree_map(lambda x, y: x.__setitem__(slots, y[rows]), tree, source)


def program_key(batch, width: int, config) -> tuple:
    """What identifies a compiled program: the problems' shapes and dtypes,
    the batch width and the static config."""
    shapes = tuple((x.shape[1:], x.dtype.str) for x in batch)
    return shapes, width, config


def lane_width(size: int, rows: int, slots: int) -> int:
    """Slots of the lane that solves ``rows`` problems of a padded batch of ``size``.

    Up to ``slots``, but a bucket of fewer than :data:`NARROW_BELOW` rows gets
    a power of two about a quarter its rows (at least :data:`NARROW_LANE`): a
    lane as wide as its bucket has nothing to refill finished slots from and
    idles while its slowest problems finish. Larger buckets keep wide lanes,
    whose per-call cost is lower (docs/performance.md).
    """
    width = min(size, slots)
    if rows < NARROW_BELOW:
        width = min(width, max(NARROW_LANE, next_pow2(rows // 4 + 1) // 2))
    return width


def memory_maps() -> tuple[int, int] | None:
    """This process's memory maps and the most Linux allows it
    (``vm.max_map_count``); ``None`` where ``/proc`` does not say."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return used, limit


class _Queue:
    """Rows of a batch waiting for a slot, and the finished states."""

    def __init__(self, initial, final, problems, size: int):
        self.initial, self.final, self.problems, self.size = initial, final, problems, size
        self.next = 0
        self.slot_blocks = 0
        self._lock = threading.Lock()  # lanes in several threads share the queue

    def take(self, count: int) -> np.ndarray:
        with self._lock:
            rows = np.arange(self.next, min(self.size, self.next + count))
            self.next += len(rows)
        return rows

    def empty(self) -> bool:
        return self.next >= self.size

    def store(self, rows: np.ndarray, state, slots: np.ndarray, blocks: int) -> None:
        with self._lock:
            _tree_map(lambda f, x: f.__setitem__(rows, x[slots]), self.final, state)
            self.slot_blocks += blocks


class _Lane:
    """The working batch of :meth:`Engine.lane`: the row in each slot (-1:
    free, its state marked done), the slots' states and problems."""

    def __init__(self, queue: _Queue, width: int):
        first = queue.take(width)
        self.rows = np.full(width, -1)
        self.rows[: len(first)] = first
        safe = np.maximum(self.rows, first[0] if len(first) else 0)
        self.state, self.batch = _take(queue.initial, safe), _take(queue.problems, safe)
        self.state.done[self.rows < 0] = True

    @property
    def width(self) -> int:
        return len(self.rows)

    def retire(self, queue: _Queue, blocks: int) -> None:
        """Finished problems leave for ``queue.final``; waiting ones take their slots."""
        ended = np.flatnonzero(self.state.done & (self.rows >= 0))
        queue.store(self.rows[ended], self.state, ended, blocks)
        self.rows[ended] = -1
        free = np.flatnonzero(self.rows < 0)
        new = queue.take(len(free))
        if len(new):
            slots = free[: len(new)]
            _put(self.state, slots, queue.initial, new)
            _put(self.batch, slots, queue.problems, new)
            self.rows[slots] = new

    def narrow(self, width: int) -> None:
        """Move the busy slots into a batch of ``width`` slots."""
        busy = np.flatnonzero(self.rows >= 0)
        kept = np.concatenate([busy, np.full(width - len(busy), busy[0])])
        self.state, self.batch = _take(self.state, kept), _take(self.batch, kept)
        self.rows = np.concatenate([self.rows[busy], np.full(width - len(busy), -1)])
        self.state.done[len(busy):] = True


class Engine:
    """Runs padded batches through the solver and keeps its process state.

    Args:
      compilation_cache: ``True`` (default): turn on JAX's persistent
        compilation cache at ``RAYBARY_JAX_CACHE`` (default
        ``~/.cache/raybary/jax``; ``off`` turns it off) unless JAX already has
        one; a path: that directory; ``False``: leave JAX's configuration alone.
      slots: the widest working batch (problems solved at once); ``None``
        (default): that of ``lanes``.
      lanes: how batches run in lanes (:class:`LaneRule`); ``None`` (default):
        by JAX's default backend, resolved at the first solve
        (:func:`lane_rule`: 1,024 slots refilled every 4 blocks, calls of
        4,096 problems on a CPU; 131,072 slots refilled every 16 blocks,
        calls of up to 2**20 problems on a GPU or TPU).
      workers: lanes run at once, each in a thread of its own (a compiled
        call releases the GIL, so each lane keeps a core busy); ``None``
        (default): on a CPU, the cores this process is given
        (:func:`cpu_workers`), on an accelerator one.
      xla_flags: before JAX's backends start, turn off XLA's intra-op CPU
        threading (:func:`lane_xla_flags`), since the lanes are the
        parallelism; ``False`` (or ``RAYBARY_XLA_FLAGS=off``) leaves
        ``XLA_FLAGS`` alone.
      keep_programs: keep the solver's compiled programs whole, serialized,
        beside the compilation cache (:mod:`raybary.batch.programs`), so a new
        process loads them without tracing; ``False`` (or
        ``RAYBARY_PROGRAMS=off``): JAX's cache only.

    Attributes:
      compiled: program keys (:func:`program_key`) this engine has run.
      tail_seconds: time tails have spent at each program key, over all calls.
      cache_clears: times the compiled programs were dropped for memory maps.
    """

    def __init__(self, *, compilation_cache: bool | str = True, slots: int | None = None,
                 lanes: LaneRule | None = None, workers: int | None = None,
                 xla_flags: bool = True, keep_programs: bool = True) -> None:
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.compilation_cache = compilation_cache
        self.xla_flags = xla_flags
        self.keep_programs = keep_programs
        self._slots = None if slots is None else int(slots)
        self._lanes = lanes
        self._workers = None if workers is None else int(workers)
        self.compiled: set = set()
        self.tail_seconds: dict = defaultdict(float)
        self.cache_clears = 0
        self._set_up = False
        self._lock = threading.RLock()  # the bookkeeping above, shared by the lanes' threads
        self._programs: Programs | None = None

    @property
    def lanes(self) -> LaneRule:
        """The :class:`LaneRule` this engine runs with (the backend's unless given)."""
        if self._lanes is None:
            import jax

            self.setup()  # before the backend starts
            self._lanes = lane_rule(jax.default_backend())
        if self._slots is not None and self._lanes.slots != self._slots:
            self._lanes = replace(self._lanes, slots=self._slots)
        return self._lanes

    @property
    def slots(self) -> int:
        """The widest working batch (``lanes.slots``)."""
        return self.lanes.slots

    @property
    def workers(self) -> int:
        """Lanes run at once (the ``workers`` given, else by backend: see the class)."""
        if self._workers is None:
            import jax

            self.setup()  # before the backend starts
            self._workers = cpu_workers() if jax.default_backend() == "cpu" else 1
        return self._workers

    def setup(self) -> str | None:
        """Configure JAX's persistent compilation cache and, before JAX's
        backends start, XLA's CPU threading (once; see the module docstring);
        return the cache directory in use, if any."""
        import jax
        from jax._src import xla_bridge

        if not self._set_up:
            self._set_up = True
            off = os.environ.get("RAYBARY_XLA_FLAGS", "").strip().lower() in OFF
            if self.xla_flags and not off and not xla_bridge.backends_are_initialized():
                os.environ["XLA_FLAGS"] = lane_xla_flags(os.environ.get("XLA_FLAGS", ""))
            path = cache_dir(self.compilation_cache)
            if path is not None and not jax.config.jax_compilation_cache_dir:
                os.makedirs(path, exist_ok=True)
                jax.config.update("jax_compilation_cache_dir", path)
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
        return jax.config.jax_compilation_cache_dir or None

    @property
    def programs(self) -> Programs:
        """The solver's :class:`~raybary.batch.programs.Programs` (kept beside the cache)."""
        with self._lock:
            if self._programs is None:
                keep = self.keep_programs and not Programs.turned_off()
                self._programs = Programs(self.setup() if keep else None)
            return self._programs

    def run_program(self, name: str, *args, **static):
        """The solver's jitted ``name`` on ``args``, through :attr:`programs`."""
        from raybary.solvers import barycenter as bc

        return self.programs.call(name, getattr(bc, name), args, static)

    def before_compile(self, key) -> bool:
        """Note that ``key`` is about to run; return whether it is new to this
        engine (then it compiles, and the memory-map guard runs first)."""
        with self._lock:
            if key in self.compiled:
                return False
            self.keep_map_room()
            self.compiled.add(key)
            return True

    def keep_map_room(self) -> None:
        """Drop the solver's compiled programs before the process runs out of
        memory maps (XLA's CPU backend maps each program in thousands of
        pieces; Linux allows ``vm.max_map_count``, and past that the next
        compile aborts the process). Only the solver's programs are dropped,
        never the caller's; one needed again loads from the persistent cache."""
        maps = memory_maps()
        if maps is None or maps[1] - maps[0] >= MAP_HEADROOM:
            return
        from raybary.solvers import barycenter as bc

        for program in (bc.init_batch, bc.run_batch, bc.finish_batch, bc.solve_batch):
            program.clear_cache()
        if self._programs is not None:
            self._programs.clear()
        self.compiled.clear()
        self.cache_clears += 1

    def solve_arrays(self, arrays: dict, config, dtype: str, *, count: int | None = None,
                     stats: dict | None = None, slots: int | None = None) -> dict[str, np.ndarray]:
        """Solve a padded batch (the fields of
        :class:`~raybary.solvers.barycenter.PaddedProblem` as arrays).

        Only the first ``count`` rows (default: all) are solved; the rest are
        filler, returned as initialised. A batch of at most
        :data:`SMALL_BATCH` rows is solved in one call; a larger one by
        continuous batching (:meth:`lane`), at most ``slots`` (default: the
        engine's) at a time. Each problem's arithmetic does not depend on its
        slot or its neighbours, so results do not depend on either.

        ``stats`` gets, added to what it holds: ``slot_blocks``, the loop
        blocks run summed over slots; ``blocks``, the loop blocks run summed
        over calls (a lane's blocks, whatever its width); ``calls``, the calls
        of ``run_batch`` (host round trips: each moves the lane's state to the
        host and back); ``run_seconds``, the wall time of those calls,
        transfers and compiles included.
        """
        import jax
        import jax.numpy as jnp

        from raybary.solvers import barycenter as bc

        self.setup()
        stats = {} if stats is None else stats
        for name in ("slot_blocks", "blocks", "calls", "run_seconds"):
            stats.setdefault(name, 0)
        with jax.enable_x64(dtype == "float64"):
            problems = bc.PaddedProblem(**{k: np.asarray(v) for k, v in arrays.items()})
            size = problems.weights.shape[0]
            self.before_compile(("init, finish", program_key(problems, size, config)))
            device = _tree_map(jnp.asarray, problems)
            if size <= SMALL_BATCH:
                initial = self.run_program("init_batch", device, config=config)
                started = time.perf_counter()
                state = self.run_program("run_batch", initial, device, 1 << 30, config=config)
                blocks = int(np.max(np.asarray(state.blocks)))
                stats["slot_blocks"] += size * blocks
                stats["blocks"] += blocks
                stats["calls"] += 1
                stats["run_seconds"] += time.perf_counter() - started
            else:
                initial = self._initial(problems, device, config)
                queue = _Queue(initial, _tree_map(np.copy, initial), problems,
                               min(size, count or size))
                self._run_lanes(queue, config, size, slots or self.slots, stats, dtype)
                stats["slot_blocks"] += queue.slot_blocks
                state = _tree_map(jnp.asarray, queue.final)
            out = self.run_program("finish_batch", state, device)
            return {k: np.asarray(v) for k, v in out._asdict().items()}

    def _initial(self, problems, device, config):
        """The initial states of a batch, on the host: ``init_batch`` on the
        whole batch, or ``lanes.init_width`` rows at a time."""

        size = problems.weights.shape[0]
        step = self.lanes.init_width
        if step is None or size <= step:
            return _tree_map(np.array, self.run_program("init_batch", device, config=config))
        self.before_compile(("init", program_key(problems, step, config)))
        parts = [_tree_map(np.asarray, self.run_program("init_batch", _take(device, slice(i, i + step)),
                                                        config=config))
                 for i in range(0, size, step)]
        return _tree_map(lambda *x: np.concatenate(x), *parts)

    def _run_lanes(self, queue: _Queue, config, size: int, slots: int, stats: dict,
                   dtype: str) -> None:
        """Solve ``queue`` in :meth:`lane_count` lanes of :func:`lane_width` slots
        each, one thread per lane when there are several."""
        count = self.lane_count(queue.size, queue.problems.means.shape[-1])
        width = lane_width(size, -(-queue.size // count), slots)
        if count == 1:
            self.lane(queue, config, width, stats=stats)
            return

        def run() -> None:
            import jax

            with jax.enable_x64(dtype == "float64"):  # JAX's config is per thread
                self.lane(queue, config, width, stats=stats)

        with ThreadPoolExecutor(count, thread_name_prefix="raybary-lane") as pool:
            for future in [pool.submit(run) for _ in range(count)]:
                future.result()

    def lane_count(self, rows: int, dim: int) -> int:
        """Lanes for ``rows`` problems of dimension ``dim``: up to :attr:`workers`,
        each of at least :data:`NARROW_LANE` rows; one where the solver's
        program calls LAPACK (``dim`` above
        :data:`~raybary.geometry.bures.JACOBI_MAX_DIM`): concurrent executions
        of such programs deadlock XLA's CPU runtime."""
        from raybary.geometry.bures import JACOBI_MAX_DIM

        if dim > JACOBI_MAX_DIM:
            return 1
        return max(1, min(self.workers, rows // NARROW_LANE))

    def lane(self, queue: _Queue, config, width: int, *, stats: dict | None = None) -> None:
        """Solve the rows of ``queue`` in ``width`` slots, refilling finished ones.

        Between calls of ``lanes.refill_blocks`` blocks, finished problems
        leave and waiting ones take their slots (their initial states were
        computed up front). Once none waits and at most an eighth of the slots
        are busy (the tail: a few slow problems), the busy ones move to a
        batch an eighth the size (at least ``lanes.min_width``) when
        :meth:`_shrink` says so (sizes stay powers of two: few compiles).
        ``stats`` gets ``blocks``, ``calls`` and ``run_seconds`` added (as in
        :meth:`solve_arrays`).
        """

        if queue.empty():
            return
        rule = self.lanes
        lane = _Lane(queue, width)
        if not np.any(lane.rows >= 0):  # other lanes took every row
            return
        while True:
            started = time.perf_counter()
            before = lane.state.blocks.copy()
            # Nothing to refill from: run longer per call (narrow batches are cheap per block).
            blocks = rule.blocks_per_call(lane.width, waiting=not queue.empty())
            key = program_key(lane.batch, lane.width, config)
            compiling = self.before_compile(key)
            lane.state = _tree_map(np.array, self.run_program("run_batch", lane.state, lane.batch,
                                                              blocks, config=config))
            ran = int(np.max(lane.state.blocks - before))
            if stats is not None:
                with self._lock:
                    stats["calls"] = stats.get("calls", 0) + 1
                    stats["blocks"] = stats.get("blocks", 0) + ran
                    stats["run_seconds"] = (stats.get("run_seconds", 0)
                                            + time.perf_counter() - started)
            lane.retire(queue, lane.width * ran)
            busy = int(np.sum(lane.rows >= 0))
            if busy == 0:
                return
            narrower = lane.width // 8
            if busy <= narrower and narrower >= rule.min_width and queue.empty():
                with self._lock:
                    if not compiling:  # a call that compiled is not tail time
                        self.tail_seconds[key] += time.perf_counter() - started
                    shrink = self._shrink(key, program_key(lane.batch, narrower, config),
                                          narrower)
                if shrink:
                    lane.narrow(narrower)

    def _shrink(self, key, narrower_key, narrower: int) -> bool:
        """Whether a tail at program ``key`` moves to the ``narrower`` one: at
        once down to ``lanes.eager_width`` (:data:`EAGER_WIDTH` on a CPU) or
        if that program already ran, else
        once tails at ``key`` have taken :data:`SHRINK_AFTER_S` in all (about
        a third of a compile). A rent-or-buy rule that buys early: a program
        once compiled serves every later tail of the process and, through the
        persistent cache, of later ones, while short tails never pay for a
        compile."""
        return (narrower >= self.lanes.eager_width or narrower_key in self.compiled
                or self.tail_seconds[key] >= SHRINK_AFTER_S)


def cache_dir(setting: bool | str) -> str | None:
    """The compilation cache directory of an engine's ``compilation_cache``
    setting (see :class:`Engine`): None where it is off."""
    if setting is False:
        return None
    if isinstance(setting, str):
        return setting
    path = os.environ.get("RAYBARY_JAX_CACHE")
    if path is not None and path.strip().lower() in CACHE_OFF:
        return None
    return path or os.path.join(os.path.expanduser("~"), ".cache", "raybary", "jax")


def lane_xla_flags(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with XLA's intra-op CPU thread pool
    off, unless they already say: with a lane per core, XLA's own threads only
    compete with the lanes (and even one lane ran faster without them)."""
    if "xla_cpu_multi_thread_eigen" in flags:
        return flags
    return (flags + " --xla_cpu_multi_thread_eigen=false").strip()


def cpu_workers() -> int:
    """The cores this process is given: ``RAYBARY_SOLVER_THREADS``, else
    ``OMP_NUM_THREADS`` (what Ray sets to a task's or actor's CPUs), else the
    CPUs the process may run on."""
    for name in ("RAYBARY_SOLVER_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@functools.cache
def default_engine() -> Engine:
    """The engine :func:`raybary.solve` uses when given none (one per process)."""
    return Engine()


def engine_of(engine: Engine | None) -> Engine:
    """``engine``, or the process's :func:`default_engine`."""
    return default_engine() if engine is None else engine

