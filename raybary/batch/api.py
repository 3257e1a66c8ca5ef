"""The public solver API: ``solve`` over lists of ragged problems (the runner
calls it on whole shards).

This is the glue between NumPy problems and the jitted JAX solver: it buckets
problems by padded shape, pads, runs :func:`raybary.solvers.barycenter.solve_batch`
per bucket and batch chunk, undoes the normalisation and keeps the best of the
restarts.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from raybary.batch.padding import Bucket, bucket_of, next_pow2, pad_problems
from raybary.types import Problem, Result

__all__ = ["solve", "DEFAULT_RELATIVE_EPSILON", "configure_jax"]

DEFAULT_RELATIVE_EPSILON = 3e-4
_JAX_CONFIGURED = False


def configure_jax() -> None:
    """Turn on JAX's persistent compilation cache (``RAYBARY_JAX_CACHE`` or
    ``~/.cache/raybary/jax``) unless the user already set a cache directory."""
    global _JAX_CONFIGURED
    if _JAX_CONFIGURED:
        return
    import jax

    if not jax.config.jax_compilation_cache_dir:
        path = os.environ.get(
            "RAYBARY_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "raybary", "jax")
        )
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _JAX_CONFIGURED = True


SMALL_BATCH = 64  # batches at most this big are solved in one call
SLOTS = 1024  # slots of the working batch (problems solved at once)
REFILL_BLOCKS = 4  # loop blocks per call between two refills
MIN_WIDTH = 2  # the narrowest batch a tail moves to
EAGER_WIDTH = 128  # ... at once down to this width; narrower by the rent-or-buy rule
TAIL_CALL_SLOTS = 1024  # with none waiting, a call runs REFILL_BLOCKS * this / width blocks
SHRINK_AFTER_S = 1.5  # a tail moves to a batch not yet compiled after this long (~1/3 of a compile)
NARROW_BELOW = 512  # a bucket with fewer rows runs in a lane a quarter its size ...
NARROW_LANE = 64  # ... of at least this many slots (_lane_width)
_COMPILED: set = set()  # (problem shapes, width, config) run in this process
_TAIL_SECONDS: dict = defaultdict(float)  # time tails spent at a program key, over all calls
MAP_HEADROOM = 20_000  # memory maps kept free for new programs (about 8 solver programs)
_CACHE_CLEARS = [0]  # times _keep_map_room dropped the compiled programs (tests read it)


def _memory_maps() -> tuple[int, int] | None:
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


def _keep_map_room() -> None:
    """Drop every compiled program before the process runs out of memory maps.

    XLA's CPU backend maps each compiled program's code in many pieces: about
    1,800 maps per solver program of d <= 2 and 2,500 of d = 5 (measured with
    jaxlib 0.10.2), and Linux allows ``vm.max_map_count`` maps per process
    (65,530 by default). Past about 30 programs in one process (a long run over
    many shapes, or many ``solve`` calls), the next compile would abort the
    process ("LLVM ERROR: Unable to allocate section memory"). So once fewer
    than :data:`MAP_HEADROOM` remain, ``jax.clear_caches()`` drops them all (the
    maps go with them); a program needed again is traced again and loaded
    from the persistent compilation cache (about a second, not a compile).
    Called only before a compile: reading ``/proc/self/maps`` takes ~50 ms
    when the maps are many.
    """
    maps = _memory_maps()
    if maps is None or maps[1] - maps[0] >= MAP_HEADROOM:
        return
    import jax

    jax.clear_caches()
    _COMPILED.clear()
    _CACHE_CLEARS[0] += 1


def _tree_map(fn, *trees):
    import jax

    return jax.tree_util.tree_map(fn, *trees)


def _take(tree, idx):
    return _tree_map(lambda x: x[idx], tree)


class _Queue:
    """Rows of a batch waiting for a slot, and the finished states."""

    def __init__(self, initial, final, size: int):
        self.initial, self.final, self.size = initial, final, size
        self.next = 0
        self.slot_blocks = 0

    def take(self, count: int) -> np.ndarray:
        rows = np.arange(self.next, min(self.size, self.next + count))
        self.next += len(rows)
        return rows

    def empty(self) -> bool:
        return self.next >= self.size

    def store(self, rows: np.ndarray, state, slots: np.ndarray, blocks: int) -> None:
        _tree_map(lambda f, x: f.__setitem__(rows, x[slots]), self.final, state)
        self.slot_blocks += blocks


def _program_key(batch, width: int, config) -> tuple:
    shapes = tuple((x.shape[1:], x.dtype.str) for x in batch)
    return shapes, width, config


def _lane(queue: _Queue, problems, config, width: int) -> None:
    """Solve rows from ``queue`` in ``width`` slots, refilling finished ones.

    Between calls of ``REFILL_BLOCKS`` blocks, finished problems leave and
    waiting ones take their slots (their initial states were computed up
    front). Once none waits and at most an eighth of the slots are busy (the
    tail: a few slow problems), the busy ones move to a batch an eighth the
    size (sizes stay powers of two: few compiles): at once down to
    ``EAGER_WIDTH`` or if that program already ran in this process, else
    once tails at this width have taken ``SHRINK_AFTER_S`` in all (over this
    and earlier calls), about a third of what compiling the narrower program
    costs: short tails never pay for a compile, and long or repeated ones
    waste at most a fraction of one (a rent-or-buy rule that buys early,
    since a program once compiled serves every later tail of the process and,
    through the persistent cache, of later ones: on the ragged benchmark,
    4 s -> 1.5 s took the compiled rate from 68 to 90-109 problems/s side by
    side, with no extra compile in a runner's first shard).
    """
    from raybary.solvers import barycenter as bc

    first = queue.take(width)
    if not len(first):
        return
    rows = np.full(width, -1)  # row in each slot; -1: free (its state is marked done)
    rows[: len(first)] = first
    safe = np.maximum(rows, first[0])
    state, batch = _take(queue.initial, safe), _take(problems, safe)
    state.done[rows < 0] = True
    while True:
        started = time.perf_counter()
        before = state.blocks.copy()
        # Nothing to refill from: run longer per call (narrow batches are cheap per block).
        blocks = REFILL_BLOCKS * max(1, TAIL_CALL_SLOTS // width if queue.empty() else 1)
        key = _program_key(batch, width, config)
        compiling = key not in _COMPILED  # this call's time is mostly the compile, not the tail
        if compiling:
            _keep_map_room()
        state = _tree_map(np.array, bc.run_batch(state, batch, config, blocks))
        _COMPILED.add(key)
        ended = np.flatnonzero(state.done & (rows >= 0))
        queue.store(rows[ended], state, ended, width * int(np.max(state.blocks - before)))
        rows[ended] = -1
        free = np.flatnonzero(rows < 0)
        new = queue.take(len(free))
        if len(new):
            slots = free[: len(new)]
            _tree_map(lambda x, y, i=slots, j=new: x.__setitem__(i, y[j]), state, queue.initial)
            _tree_map(lambda x, y, i=slots, j=new: x.__setitem__(i, y[j]), batch, problems)
            rows[slots] = new
        busy = np.flatnonzero(rows >= 0)
        if len(busy) == 0:
            return
        if len(busy) <= width // 8 and width // 8 >= MIN_WIDTH and queue.empty():
            if not compiling:
                _TAIL_SECONDS[key] += time.perf_counter() - started
            if (width // 8 < EAGER_WIDTH
                    and _program_key(batch, width // 8, config) not in _COMPILED
                    and _TAIL_SECONDS[key] < SHRINK_AFTER_S):
                continue
            width //= 8
            kept = np.concatenate([busy, np.full(width - len(busy), busy[0])])
            state, batch = _take(state, kept), _take(batch, kept)
            rows = np.concatenate([rows[busy], np.full(width - len(busy), -1)])
            state.done[len(busy):] = True


def _lane_width(size: int, rows: int, slots: int | None) -> int:
    """Slots of the lane that solves ``rows`` problems of a padded batch of ``size``.

    Up to ``slots`` (default :data:`SLOTS`), but a bucket of fewer than
    :data:`NARROW_BELOW` rows gets a power of two about a quarter its rows (at
    least :data:`NARROW_LANE`): a lane as wide as its bucket has nothing to
    refill finished slots from, and idles while its slowest problems finish.
    On the ragged benchmark (four buckets of ~256 rows, side by side): idle
    slot share 0.62 -> 0.29, 134-151 -> 184-186 problems/s compiled, first call
    on an empty cache 60 -> 45 s (narrow lanes need fewer tail programs).
    Larger buckets keep wide lanes: on tutorial-sized problems the per-call
    cost of a narrow lane outweighs its idle slots (one shard of 1,000:
    882-1,203/s at 1,024 slots, 1,044-1,055/s at 256).
    """
    width = min(size, slots or SLOTS)
    if rows < NARROW_BELOW:
        width = min(width, max(NARROW_LANE, next_pow2(rows // 4 + 1) // 2))
    return width


def _solve_arrays(arrays: dict, config, dtype: str, slots: int | None = None,
                  stats: dict | None = None, count: int | None = None) -> dict[str, np.ndarray]:
    """Solve a padded batch by continuous batching.

    A vmapped loop runs until its slowest member is done. So only ``slots``
    problems run at a time, and finished problems' slots are refilled from
    the waiting ones (:func:`_lane`). Each problem's arithmetic does not
    depend on its slot or its neighbours, so results do not depend on either.

    (Two lanes in two threads, one per core, were 1.5x faster on 2 cores,
    but concurrent executions deadlocked inside XLA's CPU runtime on ragged
    batches with jaxlib 0.10.2, so there is one lane.)

    ``stats``, if given, receives ``slot_blocks``: the loop blocks run, summed
    over the slots (busy or not), the measure of work done against work needed.
    Only the first ``count`` rows (default: all) are solved; the rest are
    filler from padding the batch to a power of two, returned as initialised.
    """
    import jax
    import jax.numpy as jnp

    from raybary.solvers import barycenter as bc

    configure_jax()
    with jax.enable_x64(dtype == "float64"):
        problems = bc.PaddedProblem(**{k: np.asarray(v) for k, v in arrays.items()})
        size = problems.weights.shape[0]
        whole = ("init, finish", _program_key(problems, size, config))
        if whole not in _COMPILED:  # new shapes: init_batch and finish_batch compile
            _keep_map_room()
            _COMPILED.add(whole)
        stats = {} if stats is None else stats
        stats.setdefault("slot_blocks", 0)
        if size <= SMALL_BATCH:
            device = _tree_map(jnp.asarray, problems)
            state = bc.run_batch(bc.init_batch(device, config), device, config, 1 << 30)
            stats["slot_blocks"] += size * int(np.max(np.asarray(state.blocks)))
            out = bc.finish_batch(state, device)
            return {k: np.asarray(v) for k, v in out._asdict().items()}
        initial = _tree_map(np.array, bc.init_batch(_tree_map(jnp.asarray, problems), config))
        queue = _Queue(initial, _tree_map(np.copy, initial), min(size, count or size))
        _lane(queue, problems, config, _lane_width(size, queue.size, slots))
        stats["slot_blocks"] += queue.slot_blocks
        out = bc.finish_batch(_tree_map(jnp.asarray, queue.final),
                              _tree_map(jnp.asarray, problems))
        return {k: np.asarray(v) for k, v in out._asdict().items()}


def _check_dtype(dtype: str) -> str:
    dtype = np.dtype(dtype).name
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dtype


def _validate(problems: Sequence[Problem], dtype: str) -> list[str]:
    """Messages of the invalid problems (ids = positions), for a solve in ``dtype``."""
    from raybary.validation import problems_errors

    return [e for e in problems_errors(problems, dtype=dtype) if e is not None]


def solve(
    problems: Problem | Sequence[Problem],
    *,
    bar_size: int | Sequence[int],
    epsilon: float | None = None,
    relative_epsilon: float | None = None,
    init: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
    restarts: int = 1,
    learn_weights: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    ids: Sequence[int] | None = None,
    max_iterations: int | None = None,
    tol: float | None = None,
    batch_size: int = 4096,
    config=None,
    validate: bool = True,
    progress: Callable[[int], None] | None = None,
    stats: dict | None = None,
) -> list[Result]:
    r"""Wasserstein barycenters (MW2, Bures ground cost) of many GMM problems at once.

    Args:
      problems: one :class:`~raybary.Problem` or a sequence of them; ragged
        (different d, J, K_j) is fine.
      bar_size: barycenter components ``n``, one for all or one per problem.
      epsilon: absolute entropic regularisation, in squared units of the data
        (the tutorial's ``epsilon=0.1``).
      relative_epsilon: regularisation relative to the mean cost between the
        initial barycenter and the inputs (scale-free). The default, when
        neither is given, is ``relative_epsilon=3e-4``: the same for data of
        any scale, and small enough that the exact MW2 objective of the
        barycenter is within ~4e-5 of POT's exact fixed point on the
        tutorial's problems and below OTT-JAX's at the tutorial's
        ``epsilon=0.1`` (the atoms sit at a stationary point, so the blur of
        the plans costs only second order), while Sinkhorn converges in about
        a thousand iterations in all. ``1e-3`` is about 1.5x faster at gaps
        of ~5e-5; the tutorial's absolute ``0.1`` (~4e-5 relative) matches
        POT to 1e-7 in float64, but is slower. Give at most one of the two.
      init: ``None`` (k-means++ seeding over the input components by Bures
        cost) or one ``(means (n, d), covs (n, d, d))`` pair (or ``None``) per
        problem. A given init is used for restart 0.
      restarts: initialisations solved per problem inside the same batch; the
        lowest objective wins. Restarts alternate k-means++ (even) and
        components drawn by mass with replacement (odd), which puts several
        atoms on heavy components.
      learn_weights: also optimise the barycenter's component weights (the
        objective is then at most that of uniform weights).
      dtype: ``"float32"`` (default) or ``"float64"``.
      seed: seed of the k-means++ draws (results are reproducible).
      ids: a stable integer id per problem (default: its position). The
        draws of problem ``i`` depend only on ``seed`` and ``ids[i]``, so its
        initialisation does not depend on the call, batch or position that
        solved it (``raybary run`` passes the store's ``problem_id``).
      max_iterations, tol: outer iterations and relative objective tolerance
        (defaults of :class:`~raybary.SolverConfig`).
      batch_size: problems per compiled call (rounded to a power of two).
      config: a :class:`~raybary.SolverConfig` to start from instead of the
        defaults (which depend on ``dtype``). Its ``relative_epsilon`` flag is
        always set from ``epsilon``/``relative_epsilon``, and
        ``learn_weights=True``, ``max_iterations`` and ``tol``, when given,
        replace its fields.
      validate: check the inputs first (:mod:`raybary.validation`, with the
        conditioning ``dtype`` can represent) and raise ``ValueError`` naming
        every bad problem.
      progress: called with the number of problems finished after each chunk.
      stats: if a dict, it receives the solver's work counters: ``slot_blocks``
        (loop blocks run, summed over batch slots, busy or idle) and
        ``plan_block`` (plan iterations per block); their product against
        the sum of ``extra["sinkhorn_iterations"]`` is the share of slot
        iterations that did no needed work (``raybary bench`` prints it).

    Returns:
      One :class:`~raybary.Result` per problem, in order.
    """
    from raybary.solvers.barycenter import SolverConfig

    if isinstance(problems, Problem):
        problems = [problems]
    problems = list(problems)
    P = len(problems)
    if P == 0:
        return []
    dtype = _check_dtype(dtype)
    if epsilon is not None and relative_epsilon is not None:
        raise ValueError("give epsilon (absolute) or relative_epsilon, not both")
    if epsilon is None and relative_epsilon is None:
        relative_epsilon = DEFAULT_RELATIVE_EPSILON
    eps_value = relative_epsilon if relative_epsilon is not None else epsilon
    if not np.isfinite(eps_value) or eps_value <= 0:
        raise ValueError(f"epsilon must be a positive finite number, got {eps_value}")
    sizes = [int(bar_size)] * P if np.isscalar(bar_size) else [int(s) for s in bar_size]
    if len(sizes) != P:
        raise ValueError(f"bar_size has {len(sizes)} entries for {P} problems")
    if any(s < 1 for s in sizes):
        raise ValueError(f"bar_size must be at least 1, got {min(sizes)}")
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    ids = np.arange(P, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (P,):
        raise ValueError(f"ids has shape {ids.shape} for {P} problems")
    inits = [None] * P if init is None else list(init)
    if len(inits) != P:
        raise ValueError(f"init has {len(inits)} entries for {P} problems")
    for i, (ini, n, p) in enumerate(zip(inits, sizes, problems)):
        if ini is not None:
            m, c = np.asarray(ini[0]), np.asarray(ini[1])
            if m.shape != (n, p.dim) or c.shape != (n, p.dim, p.dim):
                raise ValueError(
                    f"init of problem {i}: expected means ({n}, {p.dim}) and covs "
                    f"({n}, {p.dim}, {p.dim}), got {m.shape} and {c.shape}"
                )
    if validate:
        errors = _validate(problems, dtype)
        if errors:
            raise ValueError("invalid problems:\n  " + "\n  ".join(errors))

    if config is None:
        config = SolverConfig(relative_epsilon=relative_epsilon is not None)
        if dtype == "float64":
            config = replace(config, tol=1e-9, sinkhorn_tol=1e-8, sinkhorn_max_iterations=1000)
    config = replace(config, relative_epsilon=relative_epsilon is not None)
    if learn_weights:
        config = replace(config, learn_weights=True)
    if max_iterations is not None:
        config = replace(config, max_iterations=int(max_iterations))
    if tol is not None:
        config = replace(config, tol=float(tol))

    # Every (problem, restart) pair is one row of some bucket.
    rows: dict[Bucket, list[tuple[int, int]]] = defaultdict(list)
    for i, p in enumerate(problems):
        b = bucket_of(p, sizes[i])
        for r in range(restarts):
            rows[b].append((i, r))

    rows = _merge_small(rows)
    if stats is not None:
        stats["plan_block"] = config.plan_block
    best: list[Result | None] = [None] * P
    done = 0
    for bucket in sorted(rows):
        items = rows[bucket]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = min(next_pow2(len(chunk)), next_pow2(batch_size))
            keys = np.array(
                [_key_words(seed, int(ids[i]), restarts, r) for i, r in chunk],
                np.uint32,
            )
            arrays, norm = pad_problems(
                [problems[i] for i, _ in chunk],
                [sizes[i] for i, _ in chunk],
                bucket,
                batch,
                epsilons=[eps_value] * len(chunk),
                relative_epsilon=relative_epsilon is not None,
                inits=[inits[i] if r == 0 else None for i, r in chunk],
                keys=keys,
                dtype=np.dtype(dtype),
                restarts=[r for _, r in chunk],
            )
            out = _solve_arrays(arrays, config, dtype, stats=stats, count=len(chunk))
            for row, (i, r) in enumerate(chunk):
                res = _to_result(out, row, sizes[i], problems[i].dim, norm, r)
                if best[i] is None or _better(res, best[i]):
                    best[i] = res
            finished = len({i for i, _ in chunk})
            done += finished
            if progress is not None:
                progress(done)
    return best  # type: ignore[return-value]


def _key_words(seed: int, problem_id: int, restarts: int, restart: int) -> list[int]:
    """PRNG key data of one (problem, restart): the seed with the id's high
    bits, and the id's low bits with the restart."""
    low = (problem_id * restarts + restart) & 0xFFFFFFFF
    high = (problem_id * restarts + restart) >> 32
    return [(seed + high * 0x9E3779B1) & 0xFFFFFFFF, low]


MERGE_BELOW = 4096  # buckets of one dimension with fewer rows than this share one program


def _merge_small(rows: dict) -> dict:
    """Merge the small buckets of each dimension into one, their elementwise
    max: a compile costs about as much as solving a few thousand problems in
    a bucket twice the needed size, which is about the most the coarse
    classes of :func:`raybary.batch.padding.bucket_of` pad to."""
    groups: dict[int, list[Bucket]] = defaultdict(list)
    for b in rows:
        groups[b.d].append(b)
    merged: dict[Bucket, list] = {}
    for d, buckets in groups.items():
        small = [b for b in buckets if len(rows[b]) < MERGE_BELOW]
        for b in buckets:
            if b not in small or len(small) == 1:
                merged[b] = rows[b]
        if len(small) > 1:
            big = Bucket(d, max(b.n for b in small), max(b.J for b in small),
                         max(b.L for b in small), max(b.K for b in small))
            merged.setdefault(big, [])
            merged[big] = merged[big] + [item for b in sorted(small) for item in rows[b]]
    return merged


def _better(a: Result, b: Result) -> bool:
    if a.status != b.status:
        return a.status == "ok"
    return bool(a.objective < b.objective)


def _to_result(out: dict, row: int, n: int, d: int, norm, restart: int) -> Result:
    c, s = norm.center[row, :d], norm.scale[row]
    weights = out["weights"][row, :n].astype(np.float64)
    means = out["means"][row, :n, :d].astype(np.float64) * s + c
    covs = out["covs"][row, :n, :d, :d].astype(np.float64) * s**2
    objective = float(out["objective"][row]) * s**2
    finite = (
        np.isfinite(objective)
        and np.all(np.isfinite(weights))
        and np.all(np.isfinite(means))
        and np.all(np.isfinite(covs))
    )
    return Result(
        weights=weights,
        means=means,
        covs=covs,
        objective=objective,
        converged=bool(out["converged"][row]),
        iterations=int(out["iterations"][row]),
        marginal_error=float(out["marginal_error"][row]),
        restart=restart,
        status="ok" if finite else "failed",
        error=None if finite else "solver produced non-finite values",
        extra={
            "sinkhorn_iterations": int(out["sinkhorn_iterations"][row]),
            "epsilon": float(out["epsilon"][row]) * s**2,
        },
    )
